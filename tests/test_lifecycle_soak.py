"""
The lifecycle soak (bench/lifecycle.py) in short, on real servers: three conversations over two
llama.cpp backends sharing one save directory behind one real daemon (socket activation), through a
same-weights restart, a drain, an upgrade to other same-shape weights at the same model path (every
conversation comes to it right after), a re-add, a SIGKILLed backend, the roll-back, and proxy
SIGTERM and SIGKILL, some of them while the turns are in flight (issue 20's proof).
Every answer is compared with a reference llama-server on the weights the answering backend ran,
asked with C{cache_prompt: false}. One run (two passes of the script) feeds every test here.
"""

from __future__ import annotations

import json

import pytest

from bench.lifecycle import soak


@pytest.fixture(scope="module")
def result(tmp_path_factory, models_dir, llama_binary):
    outcome = soak(tmp_path_factory.mktemp("lifecycle"), models_dir, llama_binary, conversations=3,
                   context_words=400, max_tokens=8, cycles=2)
    print(json.dumps({k: v for k, v in outcome.items() if k != "turns"}, indent=1))
    return outcome


def test_the_reference_is_a_checker_greedy_answers_do_not_depend_on_a_cached_prefix(result):
    assert result["deterministic_with_cached_prefix"]


def test_every_request_is_answered_but_those_in_flight_at_a_sigkill(result):
    assert result["answered"] > 0
    assert result["failed_outside_sigkill"] == 0, result["failures"]


def test_conversations_keep_their_cache_through_most_events(result):
    # the proxy SIGKILL, weights swaps and drains cost some; most later turns reuse their prefix
    assert result["kept_cache_share"] >= 0.4, result["turns"]


def test_no_answer_differs_from_the_reference_of_the_weights_that_answered(result):
    assert result["wrong_answers"] == 0, result["wrong"]
