"""
Which process answers at a backend, in process (issue 20): the monitor sees a
restart by llama-server's per-process marker even when task ids cannot tell,
says so at once (nothing is saved there until it is probed again), and a
description is made of one process only.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from proxycache.backend import LlamaServer
from proxycache.backend._identity import PROBE_BODY
from proxycache.routing import Fingerprint, SlotId, SlotState
from proxycache.slots import Monitor, Scheduler, SlotContent
from tests.fakes import FakeBackend, put


def watched(backend: FakeBackend) -> tuple[Monitor, Scheduler, list[str], list[str]]:
    clock = Clock()
    scheduler = Scheduler(clock, min_ratio=0.5, affinity_wait=1, max_queue=1)
    ups: list[str] = []
    lost: list[str] = []
    monitor = Monitor(
        clock, scheduler, [backend], 1.0, None,
        on_up=lambda b, described: ups.append(described.process), on_lost=lost.append,
    )
    return monitor, scheduler, ups, lost


def check(monitor: Monitor) -> None:
    d = monitor.check()
    assert isinstance(d, Deferred) and d.called


def test_a_restart_is_seen_by_its_process_marker_when_task_ids_cannot_tell():
    backend = FakeBackend(marker="P1")
    backend.slot_list = [{"id": 0, "n_ctx": 4096, "id_task": 5}, {"id": 1, "n_ctx": 4096, "id_task": 2}]
    monitor, scheduler, ups, lost = watched(backend)
    check(monitor)
    assert ups == ["P1"] and lost == []
    hot = SlotContent(SlotState.HOT, Fingerprint((1, 2), 200, 32), tokens=50)
    slot = put(scheduler, attrs.evolve(scheduler.slots[SlotId(backend.name, 1)], content=hot))
    # Restarted, and the new process has already run more tasks than the old one had, on every slot.
    backend.marker = "P2"
    backend.slot_list = [{"id": 0, "n_ctx": 4096, "id_task": 9}, {"id": 1, "n_ctx": 4096, "id_task": 8}]
    check(monitor)
    assert monitor.health[backend.name].restarts == 1 and lost == [backend.name]
    assert scheduler.slots[slot.id].state is SlotState.FREE
    check(monitor)  # described again: the new process's marker
    assert ups == ["P1", "P2"]


def test_a_backend_taken_out_or_restarted_loses_its_identity_at_once():
    backend = FakeBackend()  # shows no process marker
    monitor, scheduler, ups, lost = watched(backend)
    check(monitor)
    monitor.take_out(backend.name)
    assert lost == [backend.name]
    check(monitor)
    backend.slots_error = KeyError("odd reply")  # a failed check: with no marker, nothing tells the next process
    check(monitor)
    assert lost == [backend.name, backend.name]


class _Scripted(LlamaServer):
    """A LlamaServer whose llama-server is a script: C{/props} shows the markers given, in turn."""

    def __init__(self, *markers: str) -> None:
        super().__init__("http://b", None, Clock(), to_thread=lambda f, *a: Deferred())  # type: ignore[arg-type]
        self.markers = list(markers)
        self.asked: list[str] = []

    async def call(self, method: str, path: str, payload: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
        self.asked.append(path)
        if path == "/props":
            marker = self.markers.pop(0) if len(self.markers) > 1 else self.markers[0]
            return 200, {"total_slots": 2, "model_path": "", "media_marker": marker}
        if path == "/completion" and payload == PROBE_BODY:
            top = [{"id": i, "logprob": -1.0 - i} for i in range(5)]
            return 200, {"completion_probabilities": [{"top_logprobs": top}], "id_slot": 0}
        if path == "/slots":
            return 200, [{"id": 0, "n_ctx": 100, "is_processing": False}]
        return 200, {}


def run(d: Any) -> Any:
    result = Deferred.fromCoroutine(d)
    assert result.called
    return result.result


def test_the_weights_are_probed_again_in_a_new_process_even_after_a_blip():
    server = _Scripted("P1")
    assert run(server.describe()).process == "P1"
    assert server.asked.count("/completion") == 1
    run(server.describe(probe=False))  # the same process: its weights are known
    assert server.asked.count("/completion") == 1
    server.markers = ["P2"]  # another process answers (a quick restart behind a port that stayed open)
    assert run(server.describe(probe=False)).process == "P2"
    assert server.asked.count("/completion") == 2


def test_a_description_spanning_a_restart_is_not_believed():
    server = _Scripted("P1", "P2")  # restarted between the first /props and the last look
    assert run(server.describe()) is None
    server.markers = ["P2"]
    described = run(server.describe(probe=False))
    assert described.process == "P2" and server.asked.count("/completion") == 2  # probed in P2


def test_a_backend_claiming_300000_slots_is_planned_on_a_sane_number_and_said_once():
    from twisted.logger import globalLogPublisher

    from proxycache.backend import MAX_SLOTS

    backend = FakeBackend(props={"total_slots": 300_000, "model_path": "fake.gguf"})
    monitor, scheduler, ups, lost = watched(backend)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        check(monitor)
        check(monitor)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert len(scheduler.slots) == MAX_SLOTS
    assert max(slot_id.index for slot_id in scheduler.slots) == MAX_SLOTS - 1
    (warning,) = [w for w in monitor.health[backend.name].warnings if "300000 slots" in w]
    assert sum(1 for e in events if "300000 slots" in str(e.get("warning", ""))) == 1


def test_usable_slots():
    from proxycache.backend import MAX_SLOTS, usable_slots

    assert usable_slots(4, None) == (4, None)
    assert usable_slots(None, 3) == (3, None) and usable_slots(0, 3) == (3, None)
    assert usable_slots(-2, None) == (1, None) and usable_slots(True, None) == (1, None)
    assert usable_slots("9", None) == (1, None)
    capped, warning = usable_slots(300_000, None)
    assert capped == MAX_SLOTS and warning is not None and "300000" in warning
    assert usable_slots(None, 100_000)[0] == MAX_SLOTS


class _Counted(FakeBackend):
    """Says each time it is described (each description of a new process probes its weights)."""

    described: list[str] = []

    async def describe(self, probe: bool = True) -> Any:
        self.described.append(self.url)
        return await super().describe(probe)


def test_one_llama_server_under_two_spellings_is_used_once_and_never_probed_twice():
    first = _Counted(url="http://127.0.0.1:8080", marker="P1")
    second = _Counted(url="http://localhost:8080", marker="P1")
    described = _Counted.described = []
    clock = Clock()
    scheduler = Scheduler(clock, min_ratio=0.5, affinity_wait=1, max_queue=1)
    monitor = Monitor(clock, scheduler, [first, second], 1.0, None)
    check(monitor)
    check(monitor)
    assert described == [first.url]
    assert {slot_id.backend for slot_id in scheduler.slots} == {first.url} and len(scheduler.slots) == 2
    assert monitor.health[second.url].duplicate_of == first.url and not monitor.health[second.url].up
    assert monitor.health[second.url].warnings == [f"the same llama-server process as {first.url}: not used twice"]
    # Once the other spelling is gone (removed, or another process answers there), it is used.
    monitor.unwatch(first.url)
    check(monitor)
    assert described == [first.url, second.url] and monitor.health[second.url].up
    assert monitor.health[second.url].duplicate_of is None
