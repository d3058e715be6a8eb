"""
A large request body is decoded and parsed in a worker thread, not on the
reactor; a small one in place; the errors are the same either way
(L{proxycache.web._body}).
"""

from __future__ import annotations

import gzip
import json
import threading

import pytest
import pytest_twisted

from proxycache.web import _body
from proxycache.web._body import IN_PLACE_BYTES, BodyReader
from proxycache.web._errors import ApiError
from tests.fakes import InProcessDaemon, chat_response, parse_response

LIMIT = 32 * 1024 * 1024


def chat(pad: int) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi " + "x" * pad}], "max_tokens": 2}).encode()


@pytest.fixture
def parsed_on(monkeypatch):
    """The thread each body was parsed on."""
    threads: list[int] = []
    parse = _body.parse_json_object

    def probe(raw):
        threads.append(threading.get_ident())
        return parse(raw)

    monkeypatch.setattr(_body, "parse_json_object", probe)
    return threads


@pytest_twisted.ensureDeferred
async def test_a_large_body_is_parsed_in_a_worker_thread(parsed_on):
    reader = BodyReader()  # the reactor's own thread pool
    small, large = chat(1000), chat(IN_PLACE_BYTES + 1)
    assert (await reader.json_object(None, small, LIMIT))["max_tokens"] == 2
    assert (await reader.json_object(None, large, LIMIT))["max_tokens"] == 2
    # gzip of a few kilobytes that inflates past the threshold: decoded and parsed off the reactor too
    inflating = gzip.compress(large)
    assert len(inflating) < IN_PLACE_BYTES
    assert (await reader.json_object(b"gzip", inflating, LIMIT))["max_tokens"] == 2
    assert (await reader.json_object(b"gzip", gzip.compress(small), LIMIT))["max_tokens"] == 2
    main = threading.get_ident()
    assert [t == main for t in parsed_on] == [True, False, False, True]


@pytest_twisted.ensureDeferred
async def test_errors_from_the_worker_thread_are_the_clients():
    reader = BodyReader()
    cases = [
        (None, b'{"messages": [' + b"1," * IN_PLACE_BYTES + b"oops", 400, "invalid_json"),
        (None, b"[" * (IN_PLACE_BYTES + 1), 400, "invalid_json"),  # nested too deep
        (b"gzip", gzip.compress(chat(IN_PLACE_BYTES + 10))[:-12], 400, "invalid_gzip"),
        (b"gzip", gzip.compress(b" " * (IN_PLACE_BYTES * 4)), 413, "body_too_large"),  # over a limit of 2x
    ]
    for encoding, raw, status, code in cases:
        with pytest.raises(ApiError) as caught:
            await reader.json_object(encoding, raw, IN_PLACE_BYTES * 2)
        assert (caught.value.status, caught.value.code) == (status, code)


def test_the_daemon_hands_a_large_body_to_a_thread_and_a_small_one_not():
    daemon = InProcessDaemon()
    answer = daemon.send("POST", "/v1/chat/completions", chat(100))
    daemon.backend.pending.pop(0).callback(chat_response({"cache_n": 0, "prompt_n": 9}))
    assert parse_response(answer.value())[0] == 200
    assert daemon.off_reactor == []
    answer = daemon.send("POST", "/v1/chat/completions", chat(IN_PLACE_BYTES))
    assert len(daemon.off_reactor) == 1
    daemon.backend.pending.pop(0).callback(chat_response({"cache_n": 0, "prompt_n": 9}))
    assert parse_response(answer.value())[0] == 200
    # a passthrough body (gzip decoded for llama.cpp) too
    daemon.send("POST", "/tokenize", gzip.compress(chat(IN_PLACE_BYTES)), {"Content-Encoding": "gzip"})
    assert len(daemon.off_reactor) == 2
