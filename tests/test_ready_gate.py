"""
Waiting for a ready backend (L{proxycache.slots.ReadyGate}), in-process: the
web layer, a real L{Dispatcher}, L{Scheduler} and L{Monitor} wired as the
daemon wires them, over a fake backend that the test takes down and brings
back, on a L{Clock}.  Real-server tests: tests/test_lifecycle.py.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.server import Site

from proxycache.backend import Description
from proxycache.config import Config
from proxycache.slots import Dispatcher, Monitor, NoBackend, NoCache, ReadyGate, Scheduler
from proxycache.slots._monitor import LOOK_GAP
from proxycache.web import Proxy
from tests.fakes import FakeBackend, FakeResponse, chat_response

CHAT = {"messages": [{"role": "user", "content": "hello " * 50}], "max_tokens": 2}
INTERVAL = 5.0  # the monitor's poll: every test here is answered long before it
QUEUE_TIMEOUT = 30.0


@attrs.define
class SwitchedBackend(FakeBackend):
    """A fake llama-server that can be down (refusing connections); counts the monitor's looks."""

    down: bool = False
    looks: int = 0
    refuse_next_generate: bool = False
    slow: Deferred[None] | None = None  # when set, /props answers when it fires

    async def describe(self, probe: bool = True) -> Description | None:
        self.looks += 1
        if self.slow is not None:
            await self.slow
        if self.down:
            raise ConnectionRefusedError()
        return await super().describe(probe)

    async def slots(self) -> list[dict[str, Any]] | None:
        if self.down:
            raise ConnectionRefusedError()
        return await super().slots()

    def request(self, method: str, path: str, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        if self.down:
            d.errback(ConnectionRefusedError())
        else:
            d.callback(FakeResponse(200, b'{"data": []}'))
        return d

    def generate(self, path: str, body: dict[str, Any], slot: int, timeout: float) -> Deferred[Any]:
        if self.refuse_next_generate:  # gone between the monitor's last look and this request
            self.refuse_next_generate = False
            self.sent.append((path, body, slot))
            d: Deferred[Any] = Deferred()
            d.errback(ConnectionRefusedError())
            return d
        return super().generate(path, body, slot, timeout)


@attrs.define
class Client:
    channel: Any
    transport: StringTransport

    @property
    def answered(self) -> bool:
        return b"\r\n\r\n" in self.transport.value()

    @property
    def status(self) -> int:
        return int(self.transport.value().split(b" ", 2)[1])

    def header(self, name: bytes) -> bytes | None:
        head = self.transport.value().partition(b"\r\n\r\n")[0]
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    def json(self) -> Any:
        return json.loads(self.transport.value().partition(b"\r\n\r\n")[2])

    def hang_up(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


class GateTests(SynchronousTestCase):
    def build(self, down: bool, max_queue: int = 4) -> None:
        self.clock = Clock()
        self.backend = SwitchedBackend(down=down)
        self.scheduler = Scheduler(self.clock, min_ratio=0.5, affinity_wait=5.0, max_queue=max_queue)
        self.monitor = Monitor(
            self.clock, self.scheduler, [self.backend], INTERVAL, None, on_change=lambda: self.gate.changed()
        )
        self.gate = ReadyGate(
            self.clock, self.scheduler, QUEUE_TIMEOUT,
            look=self.monitor.look_now, usable=self.monitor.usable, some_down=self.monitor.some_down,
        )
        backends = {self.backend.name: self.backend}
        self.dispatcher = Dispatcher(
            self.clock, self.scheduler, backends, NoCache(), first_byte_timeout=30,
            on_unreachable=self.monitor.take_out, gate=self.gate,
        )
        self.proxy = Proxy(
            Config.load({}, {}), self.clock, self.dispatcher, backends,
            status=lambda: {}, metrics=lambda: b"", health=lambda: (True, {}), healthy_backend=self.monitor.healthy,
        )
        self.site = Site(self.proxy.resource(), reactor=self.clock)
        self.monitor.startService()
        self.addCleanup(self.monitor.stopService)

    def send(self, method: str, path: str, body: Any = None, version: bytes = b"HTTP/1.0") -> Client:
        raw = b"" if body is None else json.dumps(body).encode()
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(
            method.encode() + b" " + path.encode() + b" " + version + b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw
        )
        return Client(channel, transport)

    def chat(self, body: dict[str, Any] = CHAT, path: str = "/v1/chat/completions") -> Client:
        return self.send("POST", path, body)

    def answer_all(self) -> None:
        while self.backend.pending:
            self.backend.pending.pop(0).callback(chat_response({"cache_n": 0, "prompt_n": 9}))

    def come_back(self) -> None:
        self.backend.down = False

    def assertNothingLeft(self) -> None:
        self.assertEqual(self.scheduler.queue_depth, 0)
        self.assertFalse(any(slot.busy for slot in self.scheduler.slots.values()))
        self.assertEqual(self.gate.held, 0)
        # only the monitor's own poll is left on the clock: no timer of a request outlives it
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    # -- a proxy started before its backend, or before its first look ---------

    def test_a_request_before_the_first_look_is_held_then_served(self) -> None:
        self.build(down=True)  # the first look found nobody: no slot known
        client = self.chat()
        self.assertFalse(client.answered, "answered without waiting for a backend")
        self.come_back()
        self.clock.advance(0.5)  # the monitor's next look while a backend is down
        self.answer_all()
        self.assertEqual(client.status, 200)
        self.assertNothingLeft()

    def test_a_request_finding_no_slot_looks_at_once_instead_of_at_the_next_poll(self) -> None:
        self.build(down=True)
        self.come_back()  # llama-server answers /health now; the monitor has not looked since
        client = self.chat()  # no clock advance: the request's own look finds it
        self.answer_all()
        self.assertEqual(client.status, 200)

    def test_a_backend_restarted_is_used_by_the_first_request_after_it_answers(self) -> None:
        self.build(down=False)
        first = self.chat()
        self.answer_all()
        self.assertEqual(first.status, 200)
        self.backend.down = True
        self.clock.advance(INTERVAL)  # the monitor sees it gone: its slots leave the map
        self.assertEqual(self.scheduler.slots, {})
        self.come_back()
        again = self.chat()
        self.answer_all()
        self.assertEqual(again.status, 200)

    def test_a_backend_found_gone_by_a_request_holds_that_request_until_it_is_back(self) -> None:
        self.build(down=False)
        self.backend.refuse_next_generate = True  # restarted between two polls: the map still has its slots
        self.backend.down = True
        client = self.chat()
        self.assertFalse(client.answered)
        self.assertEqual(self.scheduler.slots, {})  # taken out by the refused request
        self.come_back()
        self.clock.advance(0.5)  # the monitor looks this often while a backend is down
        self.answer_all()
        self.assertEqual(client.status, 200)
        self.assertEqual(len(self.backend.sent), 2)  # the refused attempt, then the one served
        self.assertNothingLeft()

    def test_a_request_queued_behind_a_busy_slot_of_a_backend_that_goes_away_is_bounded_too(self) -> None:
        self.build(down=False, max_queue=4)
        self.scheduler.set_backend_slots(self.backend.name, 1)
        busy = self.chat()
        queued = self.chat()  # waits for the one slot, with a backend ready: no deadline
        self.assertEqual(self.scheduler.queue_depth, 1)
        self.assertEqual(self.gate.held, 0)
        self.backend.down = True
        self.monitor.take_out(self.backend.name)  # seen gone: the busy slot leaves the map when released
        # it was running there (llama.cpp had it): it fails, as before
        self.backend.pending.pop(0).errback(ResponseNeverReceived([Failure(ConnectionLost())]))
        self.assertEqual(busy.status, 503)
        self.assertEqual(self.gate.held, 1)  # the queued one now waits for a backend, bounded
        self.clock.advance(QUEUE_TIMEOUT)
        self.assertEqual(queued.status, 503)
        self.assertNothingLeft()

    # -- bounds: the queue timeout, --max-queue --------------------------------

    def test_the_queue_timeout_answers_503_with_retry_after(self) -> None:
        self.build(down=True)
        client = self.chat()
        self.clock.advance(QUEUE_TIMEOUT - 1)
        self.assertFalse(client.answered)
        self.clock.advance(1)
        self.assertEqual(client.status, 503)
        self.assertEqual(client.json()["error"]["code"], "upstream_unavailable")
        self.assertIn("within 30 s", client.json()["error"]["message"])
        self.assertEqual(client.header(b"retry-after"), b"5")
        self.assertNothingLeft()

    def test_the_timeout_in_the_messages_shape_on_messages(self) -> None:
        self.build(down=True)
        client = self.chat({"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
                           "/v1/messages")
        self.clock.advance(QUEUE_TIMEOUT)
        self.assertEqual(client.status, 503)
        self.assertEqual(client.json()["type"], "error")
        self.assertEqual(client.header(b"retry-after"), b"5")

    def test_waiting_requests_count_against_max_queue(self) -> None:
        self.build(down=True, max_queue=1)
        first = self.chat()
        second = self.chat()
        self.assertFalse(first.answered)
        self.assertEqual(second.status, 503)  # not 429: it is the backend that is missing
        self.assertIn("queue is full", second.json()["error"]["message"])

    def test_a_timed_out_request_does_not_hold_others(self) -> None:
        self.build(down=True)
        early = self.chat()
        self.clock.advance(QUEUE_TIMEOUT / 2)
        late = self.chat()
        self.clock.advance(QUEUE_TIMEOUT / 2)
        self.assertEqual(early.status, 503)
        self.assertFalse(late.answered)
        self.come_back()
        self.clock.advance(0.5)
        self.answer_all()
        self.assertEqual(late.status, 200)

    # -- leaving the wait ------------------------------------------------------

    def test_a_client_hanging_up_leaves_the_wait_cleanly(self) -> None:
        self.build(down=True)
        client = self.chat()
        self.assertEqual(self.scheduler.queue_depth, 1)
        client.hang_up()
        self.assertNothingLeft()
        self.come_back()
        self.clock.advance(0.5)
        self.assertEqual(self.backend.sent, [])  # nothing was sent for the client gone

    def test_a_drain_answers_the_waiting_requests_within_its_grace(self) -> None:
        self.build(down=True)
        client = self.chat()
        self.gate.stop(within=10)  # what DrainService does first
        drained = Deferred.fromCoroutine(self.proxy.in_flight.drain(12))
        self.clock.advance(9.9)
        self.assertFalse(client.answered)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(drained), 0)
        self.assertEqual(client.status, 503)
        self.assertIn("shutting down", client.json()["error"]["message"])
        self.assertEqual(client.header(b"retry-after"), b"10")
        self.assertNothingLeft()

    def test_a_request_waiting_through_a_drain_is_served_when_the_backend_comes(self) -> None:
        self.build(down=True)  # a proxy stopped before its first look found the backend
        client = self.chat()
        self.gate.stop(within=10)
        drained = Deferred.fromCoroutine(self.proxy.in_flight.drain(12))
        self.come_back()
        self.clock.advance(0.5)
        self.answer_all()
        self.assertEqual(client.status, 200)
        self.assertEqual(self.successResultOf(drained), 0)

    def test_a_request_on_an_open_connection_during_a_drain_is_served_and_its_connection_closed(self) -> None:
        self.build(down=False)
        Deferred.fromCoroutine(self.proxy.in_flight.drain(12))  # the port is closed by now
        client = self.send("POST", "/v1/chat/completions", CHAT, version=b"HTTP/1.1")  # a kept-alive one
        self.answer_all()
        self.assertEqual(client.status, 200)
        self.assertEqual(client.header(b"connection"), b"close")
        self.assertTrue(client.transport.disconnecting)  # the next request goes to the listening socket

    # -- looks asked for by requests are rate-limited ----------------------------

    def test_a_flood_of_requests_makes_few_looks(self) -> None:
        self.build(down=True)
        before = self.backend.looks
        clients = [self.chat() for _ in range(4)]
        self.assertEqual(self.backend.looks - before, 1)  # the first asked, the others found it done
        self.clock.advance(LOOK_GAP / 2)
        more = [self.chat() for _ in range(4)]
        self.assertEqual(self.backend.looks - before, 1)
        self.clock.advance(LOOK_GAP / 2)  # one look more for the later ones, not one each
        self.assertEqual(self.backend.looks - before, 2)
        self.come_back()
        self.clock.advance(0.5)
        self.answer_all()
        self.answer_all()
        self.assertTrue(all(c.answered for c in clients + more))

    def test_the_monitors_poll_does_not_look_over_a_look_under_way(self) -> None:
        self.build(down=True)
        self.come_back()
        self.backend.slow = Deferred()  # a server just up, slow to answer its first look
        client = self.chat()
        self.assertEqual(self.backend.looks, 2)  # the first poll, then the request's look
        self.clock.advance(INTERVAL)  # polls come and go meanwhile: none probes it a second time
        self.assertEqual(self.backend.looks, 2)
        slow, self.backend.slow = self.backend.slow, None
        slow.callback(None)
        self.answer_all()
        self.assertEqual(client.status, 200)

    # -- every route that reaches a slot, and the passthrough ones ---------------

    def test_several_choices_wait_too(self) -> None:
        self.build(down=True)
        client = self.chat(dict(CHAT, n=2))
        self.come_back()
        self.clock.advance(0.5)
        self.answer_all()
        self.answer_all()
        self.assertEqual(client.status, 200)
        self.assertEqual(len(client.json()["choices"]), 2)

    def test_every_scheduled_route_waits_then_reaches_llama_cpp(self) -> None:
        text = "hello " * 50
        bodies = {
            "/v1/chat/completions": CHAT,
            "/v1/completions": {"prompt": text, "max_tokens": 2},
            "/completion": {"prompt": text, "n_predict": 2},
            "/v1/messages": {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": text}]},
            "/v1/responses": {"input": text, "max_output_tokens": 16},
            "/infill": {"input_prefix": "def f():\n", "input_suffix": "\n", "prompt": "    ", "n_predict": 2},
        }
        for path, body in bodies.items():
            with self.subTest(path):
                self.build(down=True)
                client = self.chat(body, path)
                self.assertFalse(client.answered, client.transport.value()[:300])
                self.assertEqual(self.backend.sent, [])
                self.come_back()
                self.clock.advance(0.5)
                self.assertEqual(len(self.backend.sent), 1)  # held, then sent once llama-server is back
                self.monitor.stopService()

    def test_a_passthrough_route_waits_for_a_healthy_backend(self) -> None:
        self.build(down=True)
        client = self.send("GET", "/v1/models")
        self.assertFalse(client.answered)
        self.come_back()
        self.clock.advance(0.5)
        self.assertEqual(client.status, 200)

    def test_health_is_passed_through_at_once(self) -> None:
        self.build(down=True)
        client = self.send("GET", "/health")
        self.assertEqual(client.status, 503)


class NoMonitorTests(SynchronousTestCase):
    def test_without_a_monitor_a_request_finding_no_slot_fails_at_once(self) -> None:
        clock = Clock()
        scheduler = Scheduler(clock, min_ratio=0.5, affinity_wait=5.0, max_queue=4)
        gate = ReadyGate(clock, scheduler, timeout=0.0)
        d = gate.bounded(scheduler.acquire(_request()))
        self.failureResultOf(d, NoBackend)
        self.assertEqual(scheduler.queue_depth, 0)


def _request() -> Any:
    from proxycache.routing import Request, fingerprint_text

    return Request(fingerprint_text("hello", 16), True)


class TwoBackendsTests(SynchronousTestCase):
    def test_a_request_after_a_backend_was_seen_down_asks_for_a_look(self) -> None:
        clock = Clock()
        up, down = SwitchedBackend(url="http://up"), SwitchedBackend(url="http://down", down=True)
        scheduler = Scheduler(clock, min_ratio=0.5, affinity_wait=5.0, max_queue=4)
        monitor = Monitor(clock, scheduler, [up, down], INTERVAL, None, on_change=lambda: gate.changed())
        gate = ReadyGate(clock, scheduler, QUEUE_TIMEOUT, look=monitor.look_now, usable=monitor.usable,
                         some_down=monitor.some_down)
        monitor.startService()
        self.addCleanup(monitor.stopService)
        down.down = False  # back, unseen: the next poll is INTERVAL away
        lease = self.successResultOf(gate.bounded(scheduler.acquire(_request())))
        self.assertEqual(lease.slot.id.backend, "http://up")  # served at once where it could be
        self.assertTrue(monitor.health["http://down"].up)  # and the other one rejoined without a poll
        self.assertEqual(up.looks, 1)  # the look was only at the one down
