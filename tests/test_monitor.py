"""
L{proxycache.slots.Monitor} on a L{Clock} with a fake backend: it learns the
slots, notices restarts, and no single failure stops it.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived

from typing import Any

import attrs

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.web.client import ResponseFailed

from proxycache.backend import UpstreamError
from proxycache.routing import Fingerprint, SlotId, SlotState
from proxycache.slots import Monitor, Scheduler, SlotContent
from tests.fakes import FakeBackend, put

INTERVAL = 5.0
DOWN_INTERVAL = 0.5


class MonitorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = FakeBackend()
        self.scheduler = Scheduler(self.clock, min_ratio=0.5, affinity_wait=5.0, max_queue=4)
        self.ups: list[tuple[str, str]] = []
        self.monitor = Monitor(
            self.clock, self.scheduler, [self.backend], INTERVAL, None,
            on_up=lambda backend, described: self.ups.append((backend.name, described.model)),
        )
        self.monitor.startService()
        self.addCleanup(self.monitor.stopService)

    def health(self):
        return self.monitor.health[self.backend.name]

    def test_learns_slots_and_model_when_the_backend_comes_up(self) -> None:
        self.assertEqual(len(self.scheduler.slots), 2)
        self.assertEqual(self.ups, [(self.backend.name, "model-a")])
        self.assertTrue(self.monitor.ready)
        self.assertEqual(self.monitor.slot_context(), 4096)

    def test_a_reply_cut_inside_its_headers_does_not_stop_the_loop(self) -> None:
        self.backend.slots_error = ResponseNeverReceived([])
        self.clock.advance(INTERVAL)
        self.assertFalse(self.health().up)
        self.backend.slots_error = None
        self.clock.advance(INTERVAL)
        self.assertTrue(self.health().up, "the monitor stopped polling after one failure")

    def test_an_unexpected_error_is_logged_and_the_loop_goes_on(self) -> None:
        self.backend.slots_error = KeyError("odd reply")
        self.clock.advance(INTERVAL)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertFalse(self.health().up)
        self.backend.slots_error = None
        self.clock.advance(min(INTERVAL, 0.5))  # looks again soon while a backend is down
        self.assertTrue(self.health().up)

    def test_a_restart_empties_the_slot_map(self) -> None:
        slot = next(iter(self.scheduler.slots.values()))
        hot = SlotContent(SlotState.HOT, Fingerprint((1, 2, 3), 300, 48), tokens=99)
        put(self.scheduler, attrs.evolve(slot, content=hot))
        self.backend.slot_list = [{"id": 0, "n_ctx": 4096, "is_processing": False},
                                  {"id": 1, "n_ctx": 4096, "is_processing": False}]  # no id_task: never used
        self.clock.advance(INTERVAL)
        self.assertIs(self.scheduler.slots[slot.id].state, SlotState.FREE)
        self.assertEqual(self.health().restarts, 1)

    def test_a_slot_whose_request_never_reached_llama_cpp_is_no_restart(self) -> None:
        slot = next(iter(self.scheduler.slots.values()))
        put(self.scheduler, attrs.evolve(slot, content=SlotContent(SlotState.COLD)))  # released after a failure: llama.cpp ran nothing there
        self.backend.slot_list = [{"id": 0, "n_ctx": 4096, "is_processing": False},
                                  {"id": 1, "n_ctx": 4096, "is_processing": False, "id_task": 3}]
        self.clock.advance(INTERVAL)
        self.assertEqual(self.health().restarts, 0)


class TakeOutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = FakeBackend()
        self.scheduler = Scheduler(self.clock, min_ratio=0.5, affinity_wait=5.0, max_queue=4)
        self.monitor = Monitor(self.clock, self.scheduler, [self.backend], INTERVAL, None)
        self.monitor.startService()
        self.addCleanup(self.monitor.stopService)

    def test_nobody_listening_takes_the_slots_out_at_once_and_they_come_back(self) -> None:
        from proxycache.backend import UpstreamError
        from twisted.internet.error import ConnectionRefusedError

        self.assertEqual(len(self.scheduler.slots), 2)
        gone = UpstreamError("GET /slots: refused")
        gone.__cause__ = ConnectionRefusedError()
        self.backend.slots_error = gone
        self.clock.advance(INTERVAL)
        self.assertEqual(self.scheduler.slots, {})
        self.backend.slots_error = None
        self.clock.advance(INTERVAL)
        self.assertEqual(len(self.scheduler.slots), 2)

    def test_a_slow_reply_keeps_the_slots_until_it_happens_again_and_again(self) -> None:
        from twisted.internet.defer import TimeoutError

        self.backend.slots_error = TimeoutError("busy with a long prefill")
        self.clock.advance(INTERVAL)
        self.assertEqual(len(self.scheduler.slots), 2)
        self.clock.advance(DOWN_INTERVAL)
        self.clock.advance(DOWN_INTERVAL)
        self.assertEqual(self.scheduler.slots, {})

    def test_passthrough_goes_to_a_backend_that_answers(self) -> None:
        from twisted.internet.error import ConnectionRefusedError

        from proxycache.backend import UpstreamError

        self.assertIs(self.monitor.healthy(), self.backend)
        gone = UpstreamError("refused")
        gone.__cause__ = ConnectionRefusedError()
        self.backend.slots_error = gone
        self.clock.advance(INTERVAL)
        self.assertIsNone(self.monitor.healthy())

    def test_a_backend_back_from_the_dead_counts_as_restarted(self) -> None:
        from twisted.internet.error import ConnectionRefusedError

        from proxycache.backend import UpstreamError

        gone = UpstreamError("refused")
        gone.__cause__ = ConnectionRefusedError()
        self.backend.slots_error = gone
        self.clock.advance(INTERVAL)
        self.backend.slots_error = None
        self.clock.advance(INTERVAL)
        self.assertEqual(self.monitor.health[self.backend.name].restarts, 1)

    def test_a_backend_found_gone_between_polls_is_looked_at_again_soon(self) -> None:
        # A failed save asks the monitor to look at once (on_empty_slot); the backend is gone: the
        # next look must come at the down interval, not a whole (here long) interval later.
        gone = UpstreamError("refused")
        gone.__cause__ = ConnectionRefusedError()
        self.backend.slots_error = gone
        self.clock.advance(1.0)
        self.monitor.check()
        self.assertEqual(self.scheduler.slots, {})
        self.backend.slots_error = None
        self.clock.advance(DOWN_INTERVAL)
        self.assertEqual(len(self.scheduler.slots), 2)


def scripted(*slot_replies: Any) -> tuple[Monitor, FakeBackend]:
    """A monitor of one one-slot backend whose C{/slots} answers C{slot_replies} in turn, then a served slot."""
    clock = Clock()
    backend = FakeBackend(url="http://b", props={"total_slots": 1}, model="model",
                          slot_list=[{"id": 0, "n_ctx": 100, "id_task": 1}], slot_replies=list(slot_replies))
    return Monitor(clock, Scheduler(clock, min_ratio=0.5, affinity_wait=1, max_queue=1), [backend], 1.0, None), backend


def check(monitor: Monitor) -> None:
    d = monitor.check()
    assert isinstance(d, Deferred) and d.called


def cut_short() -> UpstreamError:
    error = UpstreamError("GET /slots: cut short")
    error.__cause__ = ResponseFailed([])
    return error


def test_the_weights_are_asked_again_only_when_the_server_may_have_restarted():
    refused = UpstreamError("GET /slots: refused")  # the process is gone
    refused.__cause__ = ConnectionRefusedError()
    monitor, backend = scripted(
        [{"id": 0, "n_ctx": 100, "id_task": 1}],  # it served a task: this process is known
        cut_short(),  # a blip on a live server
        [{"id": 0, "n_ctx": 100, "id_task": 1}],  # looked at again: the same process
        [{"id": 0, "n_ctx": 100, "id_task": 2}],
        refused,
    )
    check(monitor)  # comes up: probed
    check(monitor)  # the blip: down
    check(monitor)  # up again, the same process: not probed
    assert monitor.health[backend.name].restarts == 0
    check(monitor)  # refused: down
    check(monitor)  # up again, maybe another process: probed
    check(monitor)  # up: nothing to describe
    assert backend.probes == [True, False, True]


def test_a_restart_quicker_than_a_check_is_probed_again():
    # Its process killed while a check waited for /slots, and another already listening at the next
    # check: a blip on the face of it, but the weights probed before are the old process's.
    monitor, backend = scripted(
        [{"id": 0, "n_ctx": 100, "id_task": 7}],
        cut_short(),
        [{"id": 0, "n_ctx": 100}],  # no slot served a task: a new process
    )
    check(monitor)
    check(monitor)
    check(monitor)
    assert backend.probes == [True, True]
    assert monitor.health[backend.name].restarts == 1


def test_after_a_blip_weights_are_probed_again_when_slots_cannot_tell():
    monitor, backend = scripted([{"id": 0, "n_ctx": 100}], cut_short(), [{"id": 0, "n_ctx": 100}])
    check(monitor)  # up, but no task seen yet: no process to compare with
    check(monitor)  # the blip
    check(monitor)
    assert backend.probes == [True, True]
    assert monitor.health[backend.name].restarts == 0


def test_a_request_ending_while_the_slots_reply_travels_is_no_restart():
    clock = Clock()
    backend = FakeBackend()
    scheduler = Scheduler(clock, min_ratio=0.5, affinity_wait=1, max_queue=1)
    monitor = Monitor(clock, scheduler, [backend], 1.0, None)
    check(monitor)  # comes up
    reply: Deferred[Any] = Deferred()
    backend.slots_reply = reply
    monitor.check()
    # meanwhile a request on slot 0 ends: the proxy now believes slot 0 holds tokens
    hot = SlotContent(SlotState.HOT, Fingerprint((1, 2), 200, 32), tokens=50)
    slot = put(scheduler, attrs.evolve(scheduler.slots[SlotId(backend.name, 0)], content=hot))
    reply.callback([{"id": 0, "n_ctx": 4096, "is_processing": False}, {"id": 1, "n_ctx": 4096}])  # made before it
    assert monitor.health[backend.name].restarts == 0
    assert scheduler.slots[slot.id].state is SlotState.HOT


def test_a_restart_between_checks_is_seen_when_the_proxy_placed_nothing():
    # Nothing of the proxy's in its slots (no restart shows there), but the task ids it had are all
    # gone: a new process, maybe with other weights.
    monitor, backend = scripted([{"id": 0, "n_ctx": 100, "id_task": 3}], [{"id": 0, "n_ctx": 100}])
    check(monitor)
    check(monitor)  # restarted: down until described again
    check(monitor)
    assert backend.probes == [True, True]
    assert monitor.health[backend.name].restarts == 1
