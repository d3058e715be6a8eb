"""
A request's slot class follows its size, not its count of space-separated
words: a 5 MB prompt that is one long "word" (or text without spaces: CJK,
base64, minified code) is no small request, on every API.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.fakes import FakeResponse
from tests.test_one_slot import proxy

WORD = "x" * 5_000_000  # one 5 MB "word"
BODIES = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": WORD}], "max_tokens": 2},
    "/v1/completions": {"prompt": WORD, "max_tokens": 2},
    "/completion": {"prompt": WORD, "n_predict": 2},
    "/v1/messages": {"messages": [{"role": "user", "content": WORD}], "max_tokens": 2},
    "/v1/responses": {"input": WORD, "max_output_tokens": 2},
    "/infill": {"input_prefix": WORD, "input_suffix": "\n"},
}


def decision(path: str, body: dict[str, Any]) -> bytes:
    treq, backend = proxy()
    d = treq.post("http://proxy" + path, json.dumps(body).encode(), headers={b"content-type": [b"application/json"]})
    treq.flush()
    assert len(backend.sent) == 1
    backend.pending[0].callback(FakeResponse())  # any 200 answer
    treq.flush()
    headers: list[Any] = []
    d.addCallback(lambda r: headers.append(r.headers.getRawHeaders(b"x-proxycache-decision")))
    return headers[0][0]


@pytest.mark.parametrize("path", list(BODIES))
def test_a_huge_one_word_prompt_is_not_small_on_any_api(path):
    assert decision(path, BODIES[path]) == b"miss"


def test_a_short_prompt_is_still_small():
    assert decision("/v1/completions", {"prompt": "x" * 500, "max_tokens": 2}) == b"small"


def test_a_conversation_about_one_long_word_is_cached_like_any(llama, tmp_path):
    """Against llama.cpp: a 6,000-character word is a large request whose next turn hits its slot."""
    from proxycache.testing import ProxyProcess

    # One token a byte on the test model: thresholds scaled to its 8192-token slots.
    proxy = ProxyProcess(tmp_path, llama.url, min_prefix_chars=1000, min_prefix_words=150, min_prefix_blocks=8).start()
    try:
        client = proxy.client()
        messages = [{"role": "user", "content": "Find the typo in: " + "abcdefghij" * 600}]
        turns = []
        for question in ("first", "and then?"):
            raw = client.chat.completions.with_raw_response.create(model="any", messages=messages, max_tokens=2)
            answer = raw.parse()
            turns.append((raw.headers["x-proxycache-decision"], answer.model_extra["timings"]["cache_n"]))
            messages += [{"role": "assistant", "content": answer.choices[0].message.content or ""},
                         {"role": "user", "content": question}]
        assert turns[0][0] == "miss"  # it was "small": kept off hot slots, never saved
        assert turns[1][0] == "hit" and turns[1][1] > 5_000
    finally:
        proxy.stop()
