"""
In-process stand-ins for the Twisted layers' tests: a backend implementing
L{proxycache.backend.Backend} whose replies the test controls, a client
exchange that records what it was told, fingerprints built by hand, and the
daemon's request path over the fake backend (L{InProcessDaemon}).  (Real-server
tests prove the rest.)
"""

from __future__ import annotations

import atexit
import functools
import itertools
import json
import shutil
import tempfile
from email.message import Message
from email.parser import BytesHeaderParser
from typing import Any

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from proxycache.backend import Description, FailureKind, Features, IdleSlot, Restored, Saved, SlotActionFailed
from proxycache.config import Config
from proxycache.routing import Decision, Fingerprint
from proxycache.service import wire
from proxycache.slots import Lease, Progress, Scheduler, Slot
from proxycache.slots._scheduler import _Record
from proxycache.web import guarded_site


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
    """
    A L{proxycache.backend.Backend} whose every answer the test sets.  By
    default: two idle slots, requests answered when the test fires
    C{pending}, slot actions refused.  It records what it was asked:
    C{sent} (generation requests), C{asked} (what slot actions ask, in order:
    "props" for the process marker, "slots", "save", "restore"), C{calls}
    (slot actions and their slot), C{probes}.
    """

    url: str = "http://fake"
    props: dict[str, Any] = attrs.Factory(lambda: {"total_slots": 2, "model_path": "fake.gguf"})
    slot_list: list[dict[str, Any]] | None = attrs.Factory(
        lambda: [{"id": 0, "n_ctx": 4096, "is_processing": False}, {"id": 1, "n_ctx": 4096, "is_processing": False}]
    )
    model: str = "model-a"
    marker: str | None = None  # the process marker /props shows
    features: Features = Features()
    sent: list[tuple[str, dict[str, Any], int]] = attrs.Factory(list)
    pending: list[Deferred[Any]] = attrs.Factory(list)
    fail_with: Exception | None = None
    describe_error: Exception | None = None
    slots_error: Exception | None = None
    slots_reply: Deferred[Any] | None = None  # when set, GET /slots answers when this fires
    busy_slots: set[int] = attrs.Factory(set)  # llama.cpp computes there: wait_until_idle waits
    idle_waits: list[Deferred[Any]] = attrs.Factory(list)  # those waits: fire (idle) or errback (TimeoutError)
    slot_replies: list[Any] = attrs.Factory(list)  # GET /slots answers these in turn (an exception is raised)
    idle: IdleSlot | Exception | None = None  # what wait_until_idle answers (or raises)
    saved: Saved | Exception | None = None  # what a save answers (or raises); None: no slot actions here
    save_reply: Deferred[Any] | None = None  # when set, a save answers once this fires (a slow write)
    restored: Restored | Exception | None = None  # the same for a restore
    asked: list[str] = attrs.Factory(list)
    calls: list[tuple[str, int]] = attrs.Factory(list)
    probes: list[bool] = attrs.Factory(list)

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
        self.asked.append("save")
        self.calls.append(("save", index))
        if self.save_reply is not None:
            reply, self.save_reply = self.save_reply, None
            await reply
        if self.saved is None:
            raise SlotActionFailed("save", index, None, "no slot actions here", FailureKind.FAILED)
        if isinstance(self.saved, Exception):
            raise self.saved
        return self.saved

    async def restore_slot(self, index: int, filename: str, timeout: float) -> Restored:
        self.asked.append("restore")
        self.calls.append(("restore", index))
        if self.restored is None:
            raise SlotActionFailed("restore", index, None, "no slot actions here", FailureKind.FAILED)
        if isinstance(self.restored, Exception):
            raise self.restored
        return self.restored

    async def erase_slot(self, index: int, timeout: float) -> None:
        raise SlotActionFailed("erase", index, None, "no slot actions here", FailureKind.FAILED)

    async def slots(self) -> list[dict[str, Any]] | None:
        if self.slots_error is not None:
            raise self.slots_error
        if self.slots_reply is not None:
            reply, self.slots_reply = self.slots_reply, None
            return await reply  # type: ignore[no-any-return]
        if self.slot_replies:
            scripted = self.slot_replies.pop(0)
            if isinstance(scripted, Exception):
                raise scripted
            return scripted
        return self.slot_list

    async def describe(self, probe: bool = True) -> Description | None:
        self.probes.append(probe)
        if self.describe_error is not None:
            raise self.describe_error
        return Description(self.props, self.props.get("total_slots"), self.model, self.features, process=self.marker)

    async def process(self) -> str | None:
        self.asked.append("props")
        return self.marker

    async def wait_until_idle(self, index: int) -> IdleSlot | None:
        self.asked.append("slots")
        if index in self.busy_slots:
            wait: Deferred[Any] = Deferred()
            self.idle_waits.append(wait)
            await wait
        if isinstance(self.idle, Exception):
            raise self.idle
        return self.idle


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


_tags = itertools.count(1)


def fp(shared: int, total: int | None = None, *, tag: int | None = None, base: int = 0) -> Fingerprint:
    """
    A fingerprint built by hand: C{shared} blocks of conversation C{base},
    then C{total - shared} blocks nobody else has (those of C{tag}, a fresh
    one unless given).  Two fingerprints of one base share min(shared) blocks;
    as with real chained block hashes, once two differ at a block they differ
    at every later one (L{Fingerprint.common_blocks} relies on it).
    """
    total = shared if total is None else total
    assert total >= shared
    tag = next(_tags) if tag is None else tag
    blocks = tuple(base * 10**6 + i for i in range(shared))
    blocks += tuple(10**12 + tag * 10**6 + i for i in range(shared, total))
    return Fingerprint(blocks=blocks, chars=total * 100, words=total * 16)


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


@functools.cache
def _scratch_directory() -> str:
    """One empty directory for this test run, removed at its end."""
    path = tempfile.mkdtemp(prefix="proxycache-in-process-")
    atexit.register(shutil.rmtree, path, True)
    return path


class InProcessDaemon:
    """
    The daemon's request path in process, over a L{FakeBackend} on a L{Clock}:
    every collaborator as L{proxycache.service.wire} wires it for the real
    daemon (scheduler, gate, monitor, stats, disk tier, dispatcher, L{Proxy}),
    behind the site that judges each request on its headers
    (L{proxycache.web.guarded_site}).  No service is started: the disk tier's
    index is empty (its meta directory an empty scratch one unless
    C{meta_dir} is given), and the monitor looks once, at the start.
    Clients speak HTTP/1.1 over a string transport on a loopback connection,
    as a local client does; what reaches the backend waits in
    C{backend.pending} for the test to answer.
    """

    LOOPBACK = IPv4Address("TCP", "127.0.0.1", 8081)

    def __init__(self, backend: FakeBackend | None = None, **settings: Any) -> None:
        self.clock = Clock()
        self.backend = backend or FakeBackend()
        settings.setdefault("meta_dir", _scratch_directory())
        self.config = config = attrs.evolve(Config.load({}, {}), **settings)
        self.off_reactor: list[Any] = []  # what was handed to a worker thread (here: run in place)
        self.wired = wire(config, self.clock, [self.backend], connect=lambda url, api_key: FakeBackend(url=url),
                          to_thread=self._in_place)
        self.scheduler, self.monitor, self.stats = self.wired.scheduler, self.wired.monitor, self.wired.stats
        self.proxy = self.wired.proxy
        self.site = guarded_site(self.proxy.resource(), config, self.clock)
        self.wired.tier.loaded.callback(None)  # the index read at start: nothing to read
        self.monitor.check()  # the slot map, as the daemon learns it at start

    def _in_place(self, work: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.off_reactor.append(work)
        return maybeDeferred(work, *args, **kwargs)

    def send(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> StringTransport:
        """Send one request on a new connection; the answer builds up in the returned transport."""
        given = {name.lower(): value for name, value in (headers or {}).items()}
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.LOOPBACK.port}", "Connection: close"]
        if body is not None:
            given.setdefault("content-type", "application/json")
            given["content-length"] = str(len(body))
        lines += [f"{name}: {value}" for name, value in given.items()]
        return self.connect("\r\n".join(lines).encode() + b"\r\n\r\n" + (body or b""))

    def connect(self, raw: bytes, local: Any = LOOPBACK) -> StringTransport:
        """C{raw} bytes sent on a new connection to C{local} (an address of the daemon's)."""
        transport = StringTransport(hostAddress=local, peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        channel = self.site.buildProtocol(transport.getPeer())
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        return transport

    def send_raw(self, raw: bytes, local: Any = LOOPBACK) -> bytes:
        """What the daemon answered to C{raw} so far, on a new connection to C{local}."""
        return self.connect(raw, local).value()

    def http(self, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> tuple[int, Message, Any]:
        """
        As L{proxycache.testing.http} does against a real daemon: C{(status,
        headers, decoded JSON or raw bytes)}; C{body}: bytes as they are,
        anything else as JSON.  The answer must be complete once the request
        is in (nothing waits on the backend).
        """
        raw = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        transport = self.send(method, path, raw, headers)
        # Connection: close: the daemon closes once its answer is whole.
        assert transport.disconnecting, (
            f"{method} {path} is not answered at once; the last request the backend got: {self.backend.sent[-1:]}"
        )
        return parse_response(transport.value())

    def status(self) -> dict[str, Any]:
        code, _, status = self.http("GET", "/status")
        assert code == 200, status
        return status


def parse_response(raw: bytes) -> tuple[int, Message, Any]:
    """One whole HTTP/1.1 response: C{(status, headers, decoded JSON or raw bytes)}, a chunked body joined."""
    head, separator, rest = raw.partition(b"\r\n\r\n")
    assert separator, f"no complete response head: {raw[:200]!r}"
    status_line, _, header_lines = head.partition(b"\r\n")
    headers = BytesHeaderParser().parsebytes(header_lines)
    if headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body, rest = body + rest[:size], rest[size + 2:]
    else:
        body = rest
    try:
        return int(status_line.split()[1]), headers, json.loads(body)
    except ValueError:
        return int(status_line.split()[1]), headers, body
