"""
L{proxycache.slots.Dispatcher} in-process: a fake backend, a L{Clock}, no
network.  One lease per request, released exactly once on every path.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived

from proxycache.routing import Decision, Fingerprint, Request, SlotId, SlotState
from proxycache.backend import IdleSlot, StillBusy
from proxycache.slots import Dispatcher, NoCache, Outcome, RequestRecord, Scheduler, SlotContent
from tests.fakes import FakeBackend, FakeResponse, RecordingExchange, StreamingResponse


def wanted(conversation: int, blocks: int = 20) -> Request:
    return Request(Fingerprint(tuple(conversation * 10**6 + i for i in range(blocks)), blocks * 100, blocks * 16),
                   small=False)


class _TickingClock(Clock):
    """Time moves on a little at every look, as a real clock's does."""

    def seconds(self) -> float:
        self.rightNow += 1e-6
        return self.rightNow


class _SlowCache(NoCache):
    """A cache tier whose preparation is still running when its request ends."""

    def __init__(self) -> None:
        self.work: Deferred[None] = Deferred()
        self.released_with: list[Outcome] = []

    def settling(self, lease: Any) -> Deferred[None] | None:
        return None if self.work.called else self.work

    def released(self, lease: Any, outcome: Outcome) -> None:
        self.released_with.append(outcome)


class DispatcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = _TickingClock()
        self.backend = FakeBackend()
        self.scheduler = Scheduler(self.clock, min_ratio=0.5, affinity_wait=5.0, max_queue=4)
        self.scheduler.set_backend_slots(self.backend.name, 2)
        self.records: list[RequestRecord] = []
        self.stale: list[SlotId] = []
        self.cache: Any = NoCache()

    def dispatcher(self) -> Dispatcher:
        return Dispatcher(
            self.clock, self.scheduler, {self.backend.name: self.backend}, self.cache,
            first_byte_timeout=30, observers=[self.records.append], on_stale=self.stale.append,
        )

    def busy(self) -> int:
        return sum(1 for s in self.scheduler.slots.values() if s.busy)

    def test_success_pins_the_slot_and_releases_it_hot(self) -> None:
        exchange = RecordingExchange()
        d = Deferred.fromCoroutine(self.dispatcher().dispatch(wanted(1), "/v1/chat/completions", {"x": 1}, exchange))
        self.assertEqual(self.busy(), 1)
        path, body, slot = self.backend.sent[0]
        self.assertEqual((path, body), ("/v1/chat/completions", {"x": 1}))
        self.backend.pending[0].callback(FakeResponse())
        self.successResultOf(d)
        self.assertEqual(self.busy(), 0)
        self.assertEqual(exchange.begun[0][1], Decision.MISS)
        released = self.scheduler.slots[SlotId(self.backend.name, slot)]
        self.assertIs(released.state, SlotState.HOT)
        self.assertEqual(released.content.tokens, 17)
        [record] = self.records
        self.assertEqual((record.status, record.cache_n, record.prompt_n), (200, 10, 5))

    def test_upstream_refusal_releases_the_slot_cold(self) -> None:
        self.backend.fail_with = ConnectionRefusedError()
        d = Deferred.fromCoroutine(self.dispatcher().dispatch(wanted(1), "/p", {}, RecordingExchange()))
        self.failureResultOf(d, ConnectionRefusedError)
        self.assertEqual(self.busy(), 0)
        self.assertTrue(all(s.state is SlotState.COLD for s in self.scheduler.slots.values() if s.last_used))
        self.assertEqual(self.records[0].status, 0)

    def test_client_gone_while_waiting_for_headers_releases_once(self) -> None:
        d = Deferred.fromCoroutine(self.dispatcher().dispatch(wanted(1), "/p", {}, RecordingExchange()))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.busy(), 0)
        self.assertEqual(len(self.records), 1)

    def test_a_request_cancelled_inside_the_http_client_is_a_cancellation(self) -> None:
        # treq reports a cancelled request as a failed one: waiting for headers, or still connecting
        for failed in (ResponseNeverReceived([Failure(CancelledError())]), ConnectingCancelledError(None)):
            records = len(self.records)
            d = Deferred.fromCoroutine(self.dispatcher().dispatch(wanted(1), "/p", {}, RecordingExchange()))
            self.backend.pending.pop().errback(failed)
            self.failureResultOf(d, CancelledError)
            self.assertEqual(self.busy(), 0)
            self.assertEqual(len(self.records), records + 1)

    def test_a_broken_delivery_still_releases(self) -> None:
        exchange = RecordingExchange(error=TimeoutError("stalled"))
        d = Deferred.fromCoroutine(self.dispatcher().dispatch(wanted(1), "/p", {}, exchange))
        self.backend.pending[0].callback(FakeResponse())
        self.failureResultOf(d, TimeoutError)
        self.assertEqual(self.busy(), 0)

    def test_release_waits_for_a_preparation_still_running(self) -> None:
        self.cache = _SlowCache()
        d = Deferred.fromCoroutine(self.dispatcher().dispatch(wanted(1), "/p", {}, RecordingExchange()))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.busy(), 1, "released under a save or restore still running in llama.cpp")
        self.cache.work.callback(None)
        self.assertEqual(self.busy(), 0)
        self.assertEqual(len(self.cache.released_with), 1)

    def test_a_whole_answer_given_up_on_keeps_its_slot_until_llama_cpp_stops(self) -> None:
        # llama.cpp goes on generating a whole answer whose client left: nothing is sent to
        # that slot meanwhile (it would wait there unseen), the next requests take the other
        # slot or wait in the proxy's queue, where it shows.
        dispatcher = self.dispatcher()
        orphan = Deferred.fromCoroutine(dispatcher.dispatch(wanted(1), "/p", {}, RecordingExchange()))
        [(_, _, busy)] = self.backend.sent
        self.backend.busy_slots.add(busy)
        orphan.cancel()
        self.failureResultOf(orphan, CancelledError)
        self.assertEqual(len(self.records), 1)  # the request ended; its slot did not
        self.assertTrue(self.scheduler.slots[SlotId(self.backend.name, busy)].busy)
        other = Deferred.fromCoroutine(dispatcher.dispatch(wanted(2), "/p", {}, RecordingExchange()))
        queued = Deferred.fromCoroutine(dispatcher.dispatch(wanted(3), "/p", {}, RecordingExchange()))
        self.assertEqual([slot for _, _, slot in self.backend.sent[1:]], [1 - busy])
        self.assertEqual(self.scheduler.queue_depth, 1)
        for _ in range(3):  # llama.cpp still busy at each look
            self.clock.advance(9)
            self.backend.idle_waits.pop().errback(TimeoutError())
            self.assertEqual(len(self.backend.sent), 2)
        self.backend.idle_waits.pop().callback(None)  # llama.cpp stopped: the queued request gets the slot
        self.assertEqual(self.backend.sent[2][2], busy)
        self.assertNoResult(queued)
        self.assertNoResult(other)

    def test_a_slot_llama_cpp_never_frees_is_released_after_the_first_byte_timeout(self) -> None:
        d = Deferred.fromCoroutine(self.dispatcher().dispatch(wanted(1), "/p", {}, RecordingExchange()))
        self.backend.busy_slots.add(self.backend.sent[0][2])
        d.cancel()
        self.failureResultOf(d, CancelledError)
        for _ in range(4):  # first_byte_timeout is 30 s here
            self.assertEqual(self.busy(), 1)
            self.clock.advance(9)
            self.backend.idle_waits.pop().errback(TimeoutError())
        self.assertEqual(self.busy(), 0)
        self.assertEqual(self.backend.idle_waits, [])

    def _orphan(
        self, idle: IdleSlot | None, looks_busy: int = 1, decoded: bool = True
    ) -> tuple[Dispatcher, SlotId]:
        """
        A whole answer given up on (client gone); llama.cpp busy at C{looks_busy} rounds of looks
        (generating at them: C{decoded}), then C{idle}.
        """
        dispatcher = self.dispatcher()
        d = Deferred.fromCoroutine(dispatcher.dispatch(wanted(1), "/p", {}, RecordingExchange()))
        slot = SlotId(self.backend.name, self.backend.sent[-1][2])
        self.backend.busy_slots.add(slot.index)
        self.backend.idle = idle
        d.cancel()
        self.failureResultOf(d, CancelledError)
        for _ in range(looks_busy):
            self.backend.idle_waits.pop().errback(StillBusy("busy", decoded))
        self.backend.idle_waits.pop().callback(None)
        self.assertEqual(self.busy(), 0)
        return dispatcher, slot

    def test_a_slot_llama_cpp_finished_a_request_given_up_on_in_holds_its_prompt(self) -> None:
        # An SDK's client timeout: llama.cpp computed the whole prompt (and answer) all the same,
        # so the retry of the same request reuses it on that slot instead of computing it again.
        dispatcher, slot = self._orphan(IdleSlot(used=True, tokens=4321))
        held = self.scheduler.slots[slot]
        self.assertIs(held.state, SlotState.HOT)
        self.assertEqual((held.content.fingerprint, held.content.tokens), (wanted(1).fingerprint, 4321))
        self.assertEqual(self.records[0].status, 0)  # the request itself still failed
        retry = RecordingExchange()
        Deferred.fromCoroutine(dispatcher.dispatch(wanted(1), "/p", {}, retry))
        [(lease, decision, _)] = retry.begun
        self.assertEqual((decision, lease.slot.id), (Decision.HIT, slot))

    def test_a_slot_seen_generating_within_its_last_wait_also_holds_the_prompt(self) -> None:
        # wait_until_idle saw it generating before it answered idle (the fake says so in decoded).
        _, slot = self._orphan(IdleSlot(used=True, tokens=4321, decoded=True), looks_busy=0)
        self.assertIs(self.scheduler.slots[slot].state, SlotState.HOT)

    def test_what_a_slot_never_seen_generating_holds_stays_unknown(self) -> None:
        # Idle at once: llama.cpp finished already, or has not taken the request up yet (its
        # slot then still shows the previous prompt): nothing tells which, so COLD as before.
        _, slot = self._orphan(IdleSlot(used=True, tokens=4321), looks_busy=0)
        self.assertEqual(self.scheduler.slots[slot].content, SlotContent(SlotState.COLD))
        # Busy, but only computing the prompt: llama.cpp may stop there (it can notice the closed
        # connection), leaving it half computed.
        _, slot = self._orphan(IdleSlot(used=True, tokens=4321), looks_busy=3, decoded=False)
        self.assertEqual(self.scheduler.slots[slot].content, SlotContent(SlotState.COLD))

    def test_an_idle_slot_without_a_prompt_or_a_count_stays_unknown(self) -> None:
        for idle in (IdleSlot(used=True, tokens=0), IdleSlot(used=True, tokens=None), IdleSlot(False, 5), None):
            _, slot = self._orphan(idle)
            self.assertIs(self.scheduler.slots[slot].state, SlotState.COLD, idle)

    def _left_while(self, shown: dict[str, Any]) -> tuple[SlotId, Deferred[Any]]:
        """The client leaves; llama.cpp shows its slot as C{shown}, then idle at the first look."""
        d = Deferred.fromCoroutine(self.dispatcher().dispatch(wanted(1), "/p", {}, RecordingExchange()))
        slot = SlotId(self.backend.name, self.backend.sent[0][2])
        reply: Deferred[Any] = Deferred()
        self.backend.slots_reply = reply
        self.backend.idle = IdleSlot(used=True, tokens=4321)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        upstream = self.backend.pending[0]
        self.assertFalse(upstream.called, "llama.cpp's connection closed before its slot was looked at")
        reply.callback([{"id": slot.index, "is_processing": True, **shown}])
        self.assertTrue(upstream.called)  # cancelled once looked at
        self.assertEqual(self.busy(), 0)
        return slot, upstream

    def test_the_slot_is_looked_at_before_llama_cpp_can_notice_its_client_left(self) -> None:
        # llama.cpp may notice the closed connection and stop at once (b11434 looks once a second),
        # before any look after it could see it generate: the look comes first.
        slot, _ = self._left_while({"next_token": [{"has_next_token": True, "n_decoded": 12}]})
        held = self.scheduler.slots[slot]
        self.assertEqual((held.state, held.content.tokens), (SlotState.HOT, 4321))

    def test_a_client_gone_while_llama_cpp_computed_the_prompt_leaves_it_unknown(self) -> None:
        # it may stop there, half way through the prompt
        slot, _ = self._left_while({"next_token": [{"has_next_token": False, "n_decoded": 0}]})
        self.assertIs(self.scheduler.slots[slot].state, SlotState.COLD)

    def test_llama_cpp_s_connection_closes_whatever_the_look_at_its_slot_meets(self) -> None:
        # the look fails (an unexpected error too): the request to llama.cpp is cancelled all the same
        for error in (ConnectionRefusedError(), ValueError("odd reply")):
            d = Deferred.fromCoroutine(self.dispatcher().dispatch(wanted(1), "/p", {}, RecordingExchange()))
            slot = SlotId(self.backend.name, self.backend.sent[-1][2])
            reply: Deferred[Any] = Deferred()
            self.backend.slots_reply = reply
            d.cancel()
            self.failureResultOf(d, CancelledError)
            upstream = self.backend.pending[-1]
            reply.errback(error)
            self.assertTrue(upstream.called, error)
            self.assertEqual(self.busy(), 0)
            self.assertIs(self.scheduler.slots[slot].state, SlotState.COLD)
        self.flushLoggedErrors(ValueError)

    def test_an_answer_that_comes_after_its_client_left_is_read_and_dropped(self) -> None:
        d = Deferred.fromCoroutine(self.dispatcher().dispatch(wanted(1), "/p", {}, RecordingExchange()))
        reply: Deferred[Any] = Deferred()
        self.backend.slots_reply = reply
        self.backend.idle = IdleSlot(used=True, tokens=4321)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        answer = StreamingResponse(headers=FakeResponse().headers)
        self.backend.pending[0].callback(answer)  # between the client leaving and the look's reply
        reply.callback([])
        self.assertIsNotNone(answer.protocol, "an answer left unread holds its connection")
        answer.send(b'{"choices": []}')
        answer.finish()
        self.assertEqual(self.busy(), 0)

    def test_a_slot_released_at_the_bound_holds_nothing_known(self) -> None:
        self.backend.idle = IdleSlot(used=True, tokens=4321)
        d = Deferred.fromCoroutine(self.dispatcher().dispatch(wanted(1), "/p", {}, RecordingExchange()))
        slot = SlotId(self.backend.name, self.backend.sent[0][2])
        self.backend.busy_slots.add(slot.index)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        for _ in range(4):  # first_byte_timeout is 30 s here
            self.clock.advance(9)
            self.backend.idle_waits.pop().errback(TimeoutError())
        self.assertEqual(self.busy(), 0)
        self.assertIs(self.scheduler.slots[slot].state, SlotState.COLD)

    def test_a_backend_gone_while_its_slot_is_awaited_releases_it(self) -> None:
        d = Deferred.fromCoroutine(self.dispatcher().dispatch(wanted(1), "/p", {}, RecordingExchange()))
        self.backend.busy_slots.add(self.backend.sent[0][2])
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.busy(), 1)
        self.backend.idle_waits.pop().errback(ConnectionRefusedError())
        self.assertEqual(self.busy(), 0)

    def test_a_finished_answer_is_released_without_asking_llama_cpp(self) -> None:
        self.backend.busy_slots = {0, 1}  # would wait, if asked
        d = Deferred.fromCoroutine(self.dispatcher().dispatch(wanted(1), "/p", {}, RecordingExchange()))
        self.backend.pending[0].callback(FakeResponse())
        self.successResultOf(d)
        self.assertEqual((self.busy(), self.backend.idle_waits), (0, []))

    def test_a_request_is_recorded_as_ending_before_the_next_one_starts(self) -> None:
        dispatcher = self.dispatcher()
        first = Deferred.fromCoroutine(dispatcher.dispatch(wanted(1), "/p", {}, RecordingExchange()))
        second = Deferred.fromCoroutine(dispatcher.dispatch(wanted(2), "/p", {}, RecordingExchange()))
        third = Deferred.fromCoroutine(dispatcher.dispatch(wanted(3), "/p", {}, RecordingExchange()))
        self.assertEqual(len(self.backend.pending), 2)  # the third waits in the queue
        self.clock.advance(1)
        self.backend.pending[0].callback(FakeResponse())  # the third starts on the released slot
        self.clock.advance(1)
        for pending in self.backend.pending[1:]:
            pending.callback(FakeResponse())
        for d in (first, second, third):
            self.successResultOf(d)
        by_slot: dict[str, list[RequestRecord]] = {}
        for record in self.records:
            by_slot.setdefault(record.slot, []).append(record)
        for records in by_slot.values():
            spans = sorted((r.at - r.seconds, r.at) for r in records)
            for (_, end), (start, _) in zip(spans, spans[1:]):
                self.assertLessEqual(end, start)

    def test_a_hit_far_below_its_plan_asks_for_a_fresh_look(self) -> None:
        dispatcher = self.dispatcher()
        d = Deferred.fromCoroutine(dispatcher.dispatch(wanted(1), "/p", {}, RecordingExchange()))
        self.backend.pending[0].callback(FakeResponse())
        self.successResultOf(d)
        # The same conversation again is a hit; llama.cpp reusing nothing means the map is stale.
        exchange = RecordingExchange(timings={"cache_n": 0, "prompt_n": 400})
        d = Deferred.fromCoroutine(dispatcher.dispatch(wanted(1, 25), "/p", {}, exchange))
        self.assertEqual(exchange.begun[0][1], Decision.HIT)
        self.backend.pending[1].callback(FakeResponse())
        self.successResultOf(d)
        self.assertEqual(len(self.stale), 1)


class FailoverTests(SynchronousTestCase):
    def test_a_request_to_a_dead_backend_goes_elsewhere(self) -> None:
        clock = Clock()
        dead, alive = FakeBackend(url="http://a-dead"), FakeBackend(url="http://b-alive")
        dead.fail_with = ConnectionRefusedError()
        scheduler = Scheduler(clock, min_ratio=0.5, affinity_wait=5.0, max_queue=4)
        scheduler.set_backend_slots(dead.name, 1)
        taken_out: list[str] = []
        records: list[RequestRecord] = []

        def take_out(name: str) -> None:
            taken_out.append(name)
            scheduler.set_backend_slots(name, 0)

        dispatcher = Dispatcher(clock, scheduler, {b.name: b for b in (dead, alive)}, NoCache(),
                                first_byte_timeout=30, on_unreachable=take_out, observers=[records.append])
        scheduler.set_backend_slots(alive.name, 1)
        # The free slot of the dead backend is planned first (it sorts first): the request must not fail.
        exchange = RecordingExchange()
        d = Deferred.fromCoroutine(dispatcher.dispatch(wanted(1), "/p", {}, exchange))
        self.assertEqual(taken_out, ["http://a-dead"])
        alive.pending[0].callback(FakeResponse())
        self.successResultOf(d)
        self.assertEqual([lease.slot.id.backend for lease, _, _ in exchange.begun], ["http://a-dead", "http://b-alive"])
        self.assertEqual([(r.backend, r.status) for r in records], [("http://b-alive", 200)])  # one request, one record
