"""
Streamed choices (C{n} > 1) in-process: the proxy behind a real
C{twisted.web} channel over a string transport (so that a client can hang up),
a real L{Dispatcher} and L{Scheduler} over a fake backend whose streams the
test sends chunk by chunk.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from proxycache.config import Config
from proxycache.slots import Dispatcher, NoCache, Scheduler
from proxycache.web import Proxy
from tests.fakes import FakeBackend, FakeResponse, StreamingResponse

MESSAGES = [{"role": "user", "content": "hello " * 50}]


def chunk(choice: dict[str, Any], id: str = "cmpl-x", **extra: Any) -> bytes:
    """One chat chunk as llama.cpp streams it (a single choice, index 0)."""
    body = {"id": id, "object": "chat.completion.chunk", "choices": [dict(choice, index=0)], **extra}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def usage_chunk(id: str, completion: int) -> bytes:
    usage = {"completion_tokens": completion, "prompt_tokens": 70, "total_tokens": 70 + completion}
    return chunk({}, id=id, usage=usage).replace(b'[{"index": 0}]', b"[]")


def answer(id: str, text: str) -> list[bytes]:
    """A whole single-choice stream, usage included."""
    return [
        chunk({"delta": {"role": "assistant", "content": text}, "finish_reason": None}, id),
        chunk({"delta": {}, "finish_reason": "length"}, id),
        usage_chunk(id, len(text)),
        b"data: [DONE]\n\n",
    ]


@attrs.define
class Client:
    """One HTTP/1.0 client connection (no chunked encoding: the body is what the proxy wrote)."""

    channel: Any
    transport: StringTransport

    @property
    def body(self) -> bytes:
        return self.transport.value().partition(b"\r\n\r\n")[2]

    def events(self) -> list[Any]:
        return [json.loads(e[6:]) if e[6:] != b"[DONE]" else "[DONE]" for e in self.body.split(b"\n\n") if e]

    def hang_up(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


class _ProxyOverStrings(SynchronousTestCase):
    """The daemon's web layer and dispatcher in front of a fake backend, clients on string transports."""

    def cache_tier(self) -> Any:
        return NoCache()

    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = FakeBackend()
        self.scheduler = Scheduler(self.clock, min_ratio=0.5, affinity_wait=5.0, max_queue=4)
        self.scheduler.set_backend_slots(self.backend.name, 1)
        self.cache = self.cache_tier()
        dispatcher = Dispatcher(self.clock, self.scheduler, {self.backend.name: self.backend}, self.cache,
                                first_byte_timeout=30)
        proxy = Proxy(
            Config.load({}, {}), self.clock, dispatcher, {self.backend.name: self.backend},
            status=lambda: {}, metrics=lambda: b"", health=lambda: (True, {}),
        )
        self.site = Site(proxy.resource(), reactor=self.clock)

    def post(self, body: dict[str, Any], path: str = "/v1/chat/completions") -> Client:
        raw = json.dumps(body).encode()
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(
            b"POST " + path.encode() + b" HTTP/1.0\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw
        )
        return Client(channel, transport)

    def stream(self, index: int) -> StreamingResponse:
        """Answer the C{index}th request sent to llama.cpp with a stream the test feeds."""
        response = StreamingResponse()
        self.backend.pending[index].callback(response)
        return response

    def serve(self, index: int, parts: list[bytes]) -> None:
        response = self.stream(index)
        for part in parts:
            response.send(part)
        response.finish()

    def assertSlotsFree(self) -> None:
        self.assertFalse(any(slot.busy for slot in self.scheduler.slots.values()))


class StreamedChoicesTests(_ProxyOverStrings):

    def test_choices_are_relayed_one_after_another_with_their_index(self) -> None:
        client = self.post({"messages": MESSAGES, "n": 3, "stream": True, "stream_options": {"include_usage": True}})
        for index, id in enumerate(["first", "second", "third"]):
            self.assertEqual(len(self.backend.sent), index + 1)  # the next choice only once this one ended
            whole = b"".join(answer(id, "abc"[: index + 1]))
            self.serve(index, [whole[:7], whole[7:]])  # an event split across reads
        events = client.events()
        self.assertEqual(events[-1], "[DONE]")
        self.assertEqual(events.count("[DONE]"), 1)
        usage = [e for e in events[:-1] if e.get("usage")]
        self.assertEqual(len(usage), 1)  # one usage chunk, summed
        self.assertEqual(usage[0]["choices"], [])
        self.assertEqual(usage[0]["usage"], {"completion_tokens": 6, "prompt_tokens": 70, "total_tokens": 76})
        choices = [e["choices"][0] for e in events[:-2]]
        self.assertEqual([c["index"] for c in choices], [0, 0, 1, 1, 2, 2])
        self.assertEqual([c["finish_reason"] for c in choices][1::2], ["length"] * 3)
        self.assertEqual({e["id"] for e in events[:-1]}, {"first"})  # one completion's stream
        for path, body, slot in self.backend.sent:  # single-choice requests on the leased slot
            self.assertEqual((path, slot, "n" in body), ("/v1/chat/completions", 0, False))
        self.assertSlotsFree()

    def _later_choice_fails(self, fail: Any) -> Client:
        client = self.post({"messages": MESSAGES, "n": 3, "stream": True})
        self.serve(0, answer("first", "a")[:2] + [b"data: [DONE]\n\n"])
        fail()
        self.assertTrue(client.transport.disconnecting)  # the response ended
        events = client.events()
        self.assertEqual(events[-1], "[DONE]")
        self.assertEqual(events.count("[DONE]"), 1)
        self.assertEqual(events[-2]["error"]["type"], "server_error")
        self.assertEqual(len(self.backend.sent), 2)  # the third choice is never generated
        self.assertSlotsFree()
        # The proxy keeps serving.
        self.post({"messages": MESSAGES, "max_tokens": 2})
        self.assertEqual(len(self.backend.sent), 3)
        self.assertEqual(self.backend.sent[2][2], 0)
        return client

    def test_a_later_choice_broken_off_ends_the_stream_with_an_error(self) -> None:
        def broken() -> None:
            response = self.stream(1)
            response.send(chunk({"delta": {"content": "b"}, "finish_reason": None}, "second"))
            response.fail(ConnectionLost())

        events = self._later_choice_fails(broken).events()
        self.assertEqual([e["choices"][0]["index"] for e in events[:-2]], [0, 0, 1])
        self.assertIn("choice 1 of 3", events[-2]["error"]["message"])

    def test_a_later_choice_refused_by_llama_cpp_ends_the_stream_with_its_message(self) -> None:
        refusal = json.dumps({"error": {"code": 500, "message": "the KV cache is full", "type": "server_error"}})
        events = self._later_choice_fails(
            lambda: self.backend.pending[1].callback(FakeResponse(500, refusal.encode()))
        ).events()
        self.assertIn("the KV cache is full", events[-2]["error"]["message"])

    def test_a_later_choice_that_cannot_reach_llama_cpp_ends_the_stream(self) -> None:
        def unreachable() -> None:  # llama.cpp went away between two choices
            self.backend.fail_with = ConnectionRefusedError()
            self.serve(0, answer("first", "a")[:2] + [b"data: [DONE]\n\n"])
            self.backend.fail_with = None

        client = self.post({"messages": MESSAGES, "n": 2, "stream": True})
        unreachable()
        events = client.events()
        self.assertEqual(events[-1], "[DONE]")
        self.assertIn("llama-server is not available", events[-2]["error"]["message"])
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(len(self.backend.sent), 2)
        self.assertSlotsFree()

    def test_a_client_hanging_up_stops_the_fan_out(self) -> None:
        client = self.post({"messages": MESSAGES, "n": 3, "stream": True})
        self.serve(0, answer("first", "a")[:2] + [b"data: [DONE]\n\n"])
        second = self.stream(1)
        second.send(chunk({"delta": {"content": "b"}, "finish_reason": None}, "second"))
        client.hang_up()
        self.assertEqual(second.transport.producerState, "stopped")  # llama.cpp is told to stop
        self.clock.advance(60)
        self.assertEqual(len(self.backend.sent), 2)  # and no further choice is generated
        self.assertSlotsFree()

    def test_first_choice_refused_is_answered_as_llama_cpp_answered(self) -> None:
        refusal = json.dumps({"error": {"code": 400, "message": "the prompt is too long", "type": "invalid_request"}})
        client = self.post({"messages": MESSAGES, "n": 3, "stream": True})
        self.backend.pending[0].callback(FakeResponse(400, refusal.encode()))
        self.assertIn(b" 400 ", client.transport.value().split(b"\r\n")[0])
        self.assertEqual(json.loads(client.body)["error"]["message"], "the prompt is too long")
        self.assertEqual(len(self.backend.sent), 1)
        self.assertSlotsFree()

    def test_native_completion_route_still_refuses_several_choices(self) -> None:
        client = self.post({"prompt": "hi", "n": 2, "stream": True}, "/completion")
        self.assertIn(b" 400 ", client.transport.value().split(b"\r\n")[0])
        self.assertEqual(json.loads(client.body)["error"]["code"], "unsupported_n")
        self.assertEqual(self.backend.sent, [])


class _DecodingSpy(NoCache):
    def __init__(self) -> None:
        self.decoding_calls: list[Any] = []

    def decoding(self, lease: Any) -> None:
        self.decoding_calls.append(lease)


class DecodingSignalTests(_ProxyOverStrings):
    """The cache tier hears when llama.cpp starts streaming an answer (its headers come before the prompt)."""

    def cache_tier(self) -> Any:
        return _DecodingSpy()

    def test_the_first_streamed_bytes_tell_the_cache_tier_once(self) -> None:
        self.post({"messages": MESSAGES, "stream": True})
        response = self.stream(0)
        self.assertEqual(self.cache.decoding_calls, [])  # headers only: llama.cpp may still be computing the prompt
        whole = b"".join(answer("only", "ab"))
        response.send(whole[:5])
        self.assertEqual(len(self.cache.decoding_calls), 1)
        response.send(whole[5:])
        response.finish()
        self.assertEqual(len(self.cache.decoding_calls), 1)
        self.assertSlotsFree()
