"""
In-process stand-ins for the Twisted layers' tests: a backend implementing
L{proxycache.backend.Backend} whose replies the test controls, and a client
exchange that records what it was told.  (Real-server tests prove the rest.)
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from proxycache.backend import Description, FailureKind, IdleSlot, Restored, Saved, SlotActionFailed
from proxycache.routing import Decision
from proxycache.slots import Lease, Progress, Scheduler, Slot
from proxycache.slots._scheduler import _Record


@attrs.define
class FakeResponse:
    """Enough of an C{IResponse} for the dispatcher and the exchange."""

    code: int = 200
    body: bytes = b"{}"
    headers: Headers = attrs.Factory(lambda: Headers({b"content-type": [b"application/json"]}))

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


@attrs.define
class StreamingResponse:
    """An C{IResponse} whose body the test sends bit by bit: C{send}, then C{finish} or C{fail}."""

    code: int = 200
    headers: Headers = attrs.Factory(lambda: Headers({b"content-type": [b"text/event-stream"]}))
    transport: StringTransport = attrs.Factory(StringTransport)  # producerState "stopped": the proxy hung up
    protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def finish(self) -> None:
        self.protocol.connectionLost(Failure(ResponseDone()))

    def fail(self, reason: Exception) -> None:
        self.protocol.connectionLost(Failure(reason))


@attrs.define
class FakeBackend:
    url: str = "http://fake"
    props: dict[str, Any] = attrs.Factory(lambda: {"total_slots": 2, "model_path": "fake.gguf"})
    slot_list: list[dict[str, Any]] | None = attrs.Factory(
        lambda: [{"id": 0, "n_ctx": 4096, "is_processing": False}, {"id": 1, "n_ctx": 4096, "is_processing": False}]
    )
    model: str = "model-a"
    marker: str | None = None  # the process marker /props shows
    sent: list[tuple[str, dict[str, Any], int]] = attrs.Factory(list)
    pending: list[Deferred[Any]] = attrs.Factory(list)
    fail_with: Exception | None = None
    describe_error: Exception | None = None
    slots_error: Exception | None = None
    slots_reply: Deferred[Any] | None = None  # when set, GET /slots answers when this fires
    busy_slots: set[int] = attrs.Factory(set)  # llama.cpp computes there: wait_until_idle waits
    idle_waits: list[Deferred[Any]] = attrs.Factory(list)  # those waits: fire (idle) or errback (TimeoutError)

    @property
    def name(self) -> str:
        return self.url

    def request(self, method: str, path: str, **kwargs: Any) -> Deferred[Any]:
        return succeed(FakeResponse())

    def generate(self, path: str, body: dict[str, Any], slot: int, timeout: float) -> Deferred[Any]:
        self.sent.append((path, body, slot))
        if self.fail_with is not None:
            d: Deferred[Any] = Deferred()
            d.errback(self.fail_with)
            return d
        answer: Deferred[Any] = Deferred()
        self.pending.append(answer)
        return answer

    async def call(self, method: str, path: str, payload: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
        return 200, {}

    async def save_slot(self, index: int, filename: str, timeout: float) -> Saved:
        raise SlotActionFailed("save", index, None, "no slot actions here", FailureKind.FAILED)

    async def restore_slot(self, index: int, filename: str, timeout: float) -> Restored:
        raise SlotActionFailed("restore", index, None, "no slot actions here", FailureKind.FAILED)

    async def erase_slot(self, index: int, timeout: float) -> None:
        raise SlotActionFailed("erase", index, None, "no slot actions here", FailureKind.FAILED)

    async def slots(self) -> list[dict[str, Any]] | None:
        if self.slots_error is not None:
            raise self.slots_error
        if self.slots_reply is not None:
            reply, self.slots_reply = self.slots_reply, None
            return await reply  # type: ignore[no-any-return]
        return self.slot_list

    async def describe(self, probe: bool = True) -> Description | None:
        if self.describe_error is not None:
            raise self.describe_error
        return Description(self.props, self.props.get("total_slots"), self.model, process=self.marker)

    async def process(self) -> str | None:
        return self.marker

    async def wait_until_idle(self, index: int) -> IdleSlot | None:
        if index in self.busy_slots:
            wait: Deferred[Any] = Deferred()
            self.idle_waits.append(wait)
            await wait
        return None


@attrs.define
class RecordingExchange:
    """Records C{begin}; C{deliver} sets the timings given, or raises C{error}."""

    timings: dict[str, Any] = attrs.Factory(lambda: {"cache_n": 10, "prompt_n": 5, "predicted_n": 2})
    error: Exception | None = None
    begun: list[tuple[Lease, Decision, int]] = attrs.Factory(list)
    paths: list[tuple[float, float]] = attrs.Factory(list)
    delivered: list[Any] = attrs.Factory(list)

    def begin(
        self, lease: Lease, decision: Decision, restored_tokens: int, path: tuple[float, float] = (0.0, 0.0)
    ) -> None:
        self.begun.append((lease, decision, restored_tokens))
        self.paths.append(path)

    async def deliver(self, response: Any, progress: Progress) -> None:
        self.delivered.append(response)
        if self.error is not None:
            raise self.error
        progress.timings = dict(self.timings)


def chat_response(timings: dict[str, Any] | None = None) -> FakeResponse:
    body = {"choices": [{"message": {"role": "assistant", "content": "x"}}], "timings": timings or {}}
    return FakeResponse(200, json.dumps(body).encode())


def put(scheduler: Scheduler, slot: Slot) -> Slot:
    """
    A test's set-up: the scheduler believes slot C{slot.id} holds C{slot.content}
    (last used at C{slot.last_used}), as if requests had left it so.  Only the
    scheduler writes slot state; tests reach into it here, and only here.
    """
    record = scheduler._slots.setdefault(slot.id, _Record(slot.id))
    record.content, record.last_used = slot.content, slot.last_used
    return record.snapshot()
