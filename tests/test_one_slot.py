"""
Every scheduled request runs on the slot the proxy leased and no other: a
body that would make llama.cpp run choices or prompts on other slots (and wipe
the conversations there) is refused where requests reach llama.cpp, whatever
route it came by; chat and /v1/completions serve several choices one by one.
In-process: a real dispatcher over a fake llama.cpp.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
from treq.testing import StubTreq
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from proxycache.config import Config
from proxycache.slots import Dispatcher, NoCache, Scheduler
from proxycache.web import BodyReader, Proxy
from tests.conftest import SMALL_LIMITS
from tests.fakes import FakeBackend, chat_response

MESSAGES = [{"role": "user", "content": "hello"}]
INFILL = {"input_prefix": "def f(", "input_suffix": "\n", "prompt": ""}


def proxy() -> tuple[StubTreq, FakeBackend]:
    clock = Clock()
    backend = FakeBackend()
    scheduler = Scheduler(clock, min_ratio=0.5, affinity_wait=5.0, max_queue=4)
    scheduler.set_backend_slots(backend.name, 2)
    dispatcher = Dispatcher(clock, scheduler, {backend.name: backend}, NoCache(), first_byte_timeout=30)
    config = attrs.evolve(Config.load({}, {}), fim_slots=0)
    web = Proxy(config, clock, dispatcher, {backend.name: backend},
                status=lambda: {}, metrics=lambda: b"", health=lambda: (True, {}),
                body_reader=BodyReader(to_thread=maybeDeferred))  # StubTreq cannot wait for a thread
    return StubTreq(web.resource()), backend


def post(treq: StubTreq, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """The answer, or (0, None) while the request waits for the fake llama.cpp."""
    answers: list[tuple[int, Any]] = []
    d = treq.post("http://proxy" + path, json.dumps(body).encode(), headers={b"content-type": [b"application/json"]})
    d.addCallback(lambda r: r.content().addCallback(lambda raw: answers.append((r.code, json.loads(raw)))))
    treq.flush()
    return answers[0] if answers else (0, None)


@pytest.mark.parametrize("path, body", [
    ("/v1/responses", {"input": "hi", "n": 2}),
    ("/v1/responses", {"input": "hi", "n_cmpl": 2}),
    ("/responses", {"input": "hi", "n": 3, "stream": True}),
    ("/infill", {**INFILL, "n": 2}),
    ("/infill", {**INFILL, "n_cmpl": 2}),
    ("/infill", {**INFILL, "n": 0}),
    ("/infill", {**INFILL, "n": "2"}),
    ("/completion", {"prompt": "hi", "n_cmpl": 2}),
    ("/v1/completions", {"prompt": ["one prompt", "another prompt"]}),
    ("/completion", {"prompt": ["one prompt", [1, 2, 3]]}),
])
def test_a_body_that_would_take_other_slots_is_refused(path, body):
    treq, backend = proxy()
    status, answer = post(treq, path, body)
    assert status == 400, answer
    assert answer["error"]["code"] in ("unsupported_n", "unsupported_prompt_list", "invalid_request"), answer
    assert backend.sent == []  # llama.cpp never saw it


@pytest.mark.parametrize("path, body", [
    ("/v1/responses", {"input": "hi", "n": 1}),
    ("/infill", {**INFILL, "n_cmpl": 1}),
    ("/v1/completions", {"prompt": ["one prompt"]}),
    ("/v1/completions", {"prompt": [1, 2, 3]}),
    ("/completion", {"prompt": ["text", 12, "more text"]}),  # mixed: one prompt
    ("/v1/messages", {"messages": MESSAGES, "max_tokens": 2, "n": 2}),  # the conversion drops it, as llama.cpp's
])
def test_one_slot_bodies_reach_llama_cpp(path, body):
    treq, backend = proxy()
    post(treq, path, body)
    assert len(backend.sent) == 1, backend.sent
    assert "n" not in backend.sent[0][1] or backend.sent[0][1]["n"] == 1


def test_chat_choices_are_still_served_one_by_one():
    treq, backend = proxy()
    d = treq.post("http://proxy/v1/chat/completions", json.dumps({"messages": MESSAGES, "n": 2}).encode())
    treq.flush()
    for _ in range(2):
        assert "n" not in backend.sent[-1][1]
        backend.pending[-1].callback(chat_response())
        treq.flush()
    codes: list[int] = []
    d.addCallback(lambda r: codes.append(r.code))
    assert (codes, len(backend.sent)) == ([200], 2)


# -- against a real llama.cpp ----------------------------------------------------

OTHER = "Something else entirely, from another client. " * 20


@pytest.mark.parametrize("path, body", [
    ("/v1/responses", {"input": OTHER, "max_output_tokens": 2, "n": 2}),
    ("/v1/responses", {"input": OTHER, "max_output_tokens": 2, "n_cmpl": 2}),
    ("/infill", {"input_prefix": OTHER, "input_suffix": "\n", "n_predict": 2, "n": 2}),
])
def test_llama_cpp_runs_extra_choices_of_every_route_on_other_slots(llama, path, body):
    """Why the rule holds for Responses and infill too: llama.cpp reads n there and wipes slot 1."""
    conversation = [{"role": "user", "content": "Slot one holds this conversation. " * 20}]
    for _ in range(2):
        held = llama.post_json("/v1/chat/completions", {"messages": conversation, "max_tokens": 2, "id_slot": 1})
    assert held["timings"]["cache_n"] > 100
    llama.post_json(path, {**body, "id_slot": 0})
    after = llama.post_json("/v1/chat/completions", {"messages": conversation, "max_tokens": 2, "id_slot": 1})
    assert after["timings"]["cache_n"] < 50


def test_no_route_lets_llama_cpp_wipe_another_conversation(llama, tmp_path):
    import openai

    from proxycache.testing import ProxyProcess, http
    from tests.conversations import User, close_to_new

    proxy = ProxyProcess(tmp_path, llama.url, fim_slots=0, **SMALL_LIMITS).start()
    try:
        client = proxy.client()
        alice = User("alice", context_words=400)
        alice.turn(client)
        assert alice.turn(client)["decision"] == "hit"
        refusals = []
        for extra in ({"n": 2}, {"n_cmpl": 2}):
            try:
                client.responses.create(model="any", input=OTHER, max_output_tokens=2, extra_body=extra)
            except openai.APIStatusError as e:
                refusals.append((e.status_code, e.code, "other slots" in e.message))
            else:
                refusals.append((200, None, False))
        body = {"input_prefix": OTHER, "input_suffix": "\n", "n_predict": 2, "n": 2}
        status, _, error = http("POST", proxy.url + "/infill", body)
        refusals.append((status, error["error"]["code"] if status != 200 else None, True))
        # One choice is served as before, next to alice.
        assert client.responses.create(model="any", input=OTHER, max_output_tokens=2, extra_body={"n": 1}).output
        after = alice.turn(client)
        # Her slot still holds her conversation (without the rule: "hit" with 0 tokens cached).
        assert after["decision"] == "hit"
        assert close_to_new(after), after
        assert refusals == [(400, "unsupported_n", True)] * 3
        status, _, error = http("POST", proxy.url + "/v1/completions", {"prompt": [OTHER, OTHER + "!"], "max_tokens": 2})
        assert (status, error["error"]["code"]) == (400, "unsupported_prompt_list")
    finally:
        proxy.stop()
