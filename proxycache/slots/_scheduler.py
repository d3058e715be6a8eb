"""
Slot ownership: one L{DeferredLock} per slot, a fair FIFO queue, and the map
of what each slot holds.

The planner (L{proxycache.planner}) decides; this module holds the state the
decisions are made against and hands out L{Lease}s.  A lease holds its slot's
lock from dispatch until L{Scheduler.release}, which every request path calls
exactly once (success, upstream error, client disconnect alike).
"""

from __future__ import annotations

from typing import Callable, Sequence

import attrs
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from proxycache.routing import (
    Fingerprint,
    EMPTY,
    Decision,
    DiskMatch,
    Plan,
    Request,
    SlotId,
    SlotState,
    SlotView,
    plan,
    state_after,
)

log = Logger()


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its limit."""


@attrs.frozen
class SlotContent:
    """What a slot holds, as far as the proxy knows."""

    state: SlotState = SlotState.FREE
    fingerprint: Fingerprint = EMPTY
    tokens: int = 0  # tokens llama.cpp holds (prompt + generated), from timings
    saved_key: str | None = None  # the disk entry holding exactly this, if saved since it changed
    pinned: bool = False  # a client asked to keep this conversation on disk


NOTHING = SlotContent()


@attrs.define(eq=False)
class Slot:
    id: SlotId
    lock: DeferredLock = attrs.field(factory=DeferredLock)
    content: SlotContent = NOTHING
    last_used: float = 0.0

    @property
    def busy(self) -> bool:
        return self.lock.locked

    @property
    def state(self) -> SlotState:
        return self.content.state

    def view(self) -> SlotView:
        return SlotView(
            self.id, self.content.state, self.content.fingerprint, self.last_used, self.busy
        )

    def forget(self) -> None:
        self.content = NOTHING


@attrs.frozen
class Lease:
    slot: Slot
    plan: Plan
    request: Request
    waited: float  # seconds spent queued
    previous: SlotContent  # what the slot held before: the disk tier saves it if evicted


@attrs.frozen
class Outcome:
    """What became of a leased request, for the slot map."""

    succeeded: bool  # llama.cpp processed the prompt (a client cancel after that still counts)
    cache_n: int = 0
    prompt_n: int = 0
    predicted_n: int = 0
    prompt_ms: float = 0.0
    measured: bool = False  # llama.cpp's timings were seen: the counts above are real


@attrs.define(eq=False)
class _Waiter:
    request: Request
    deferred: Deferred
    enqueued: float
    affinity_until: float
    timer: IDelayedCall | None = None


DiskLookup = Callable[[Request], "DiskMatch | None"]


class Scheduler:
    def __init__(
        self,
        clock: IReactorTime,
        *,
        min_ratio: float,
        affinity_wait: float,
        max_queue: int,
        disk_lookup: DiskLookup | None = None,
        fim_slots: int | None = None,
    ) -> None:
        self.clock = clock
        self.fim_slots = fim_slots  # slots per backend kept for "fim" requests; None: 1 from 3 slots up
        self._fim_seen = False  # by default, slots are kept for FIM from the first FIM request on
        self.min_ratio = min_ratio
        self.affinity_wait = affinity_wait
        self.max_queue = max_queue
        self.disk_lookup = disk_lookup or (lambda request: None)
        self.slots: dict[SlotId, Slot] = {}
        self._queue: list[_Waiter] = []
        self._pumping = False
        self.closed: set[str] = set()  # backends being drained: no new leases there
        self._counts: dict[str, int] = {}  # declared slots per backend

    # -- the slot map -------------------------------------------------------

    def set_backend_slots(self, backend: str, count: int) -> None:
        """(Re)declare C{backend}'s slots; existing slot state is kept where the index survives."""
        self._counts[backend] = count
        for index in range(count):
            slot_id = SlotId(backend, index)
            self.slots.setdefault(slot_id, Slot(slot_id))
        for slot_id in [s for s in self.slots if s.backend == backend and s.index >= count]:
            if not self.slots[slot_id].busy:
                del self.slots[slot_id]
        self.pump()

    def close_backend(self, backend: str) -> None:
        """Grant no new lease on C{backend}; waiters are planned elsewhere."""
        self.closed.add(backend)
        self.pump()

    def reset_backend(self, backend: str) -> None:
        """llama-server restarted: every slot of it is empty now."""
        for slot in self.slots.values():
            if slot.id.backend == backend:
                slot.forget()
        log.warn("slot map of {backend} reset", backend=backend)
        self.pump()

    def views(self) -> list[SlotView]:
        return [slot.view() for slot in self.slots.values()]

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    # -- leases -------------------------------------------------------------

    def acquire(self, request: Request) -> "Deferred[Lease]":
        """
        A lease on the slot the planner picks for C{request}, once it is idle.
        Cancelling the Deferred leaves the queue cleanly.

        @raise QueueFull: the request would have to wait and the queue is full.
        """
        self._fim_seen |= request.kind == "fim"
        now = self.clock.seconds()
        waiter = _Waiter(request, None, now, now + self.affinity_wait)  # type: ignore[arg-type]
        waiter.deferred = Deferred(lambda d: self._leave(waiter))
        self._queue.append(waiter)
        self.pump()
        if not waiter.deferred.called and len(self._queue) > self.max_queue:
            self._leave(waiter)
            raise QueueFull()
        return waiter.deferred

    def release(self, lease: Lease, outcome: Outcome) -> None:
        slot = lease.slot
        slot.last_used = self.clock.seconds()
        if outcome.succeeded:
            slot.content = SlotContent(
                state_after(lease.request.small, True),
                lease.request.fingerprint,
                outcome.cache_n + outcome.prompt_n + outcome.predicted_n,
                pinned=lease.request.pinned,
            )
        else:
            slot.content = SlotContent(SlotState.COLD)
        slot.lock.release()
        self._retire_if_gone(slot)
        self.pump()

    def _retire_if_gone(self, slot: Slot) -> None:
        """A slot beyond its backend's declared count was kept only while busy."""
        declared = self._counts.get(slot.id.backend)
        if declared is not None and slot.id.index >= declared and not slot.busy:
            self.slots.pop(slot.id, None)

    def try_exclusive(self, slot: Slot) -> bool:
        """
        Take an idle slot's lock for maintenance (a background save); False if
        busy.  An idle slot is never wanted by the queue: L{pump} would have
        handed it out already.  Release with L{done_exclusive}.
        """
        if slot.busy:
            return False
        slot.lock.acquire()
        return True

    def done_exclusive(self, slot: Slot) -> None:
        slot.lock.release()
        self._retire_if_gone(slot)
        self.pump()

    # -- the queue ----------------------------------------------------------

    def _leave(self, waiter: _Waiter) -> None:
        if waiter in self._queue:
            self._queue.remove(waiter)
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()

    def slot_class(self, slot_id: SlotId) -> str:
        """"fim" or "chat" when the backend's last slots are kept for FIM requests; "any" when shared."""
        count = self._counts.get(slot_id.backend, 0)
        kept = self.fim_slots if self.fim_slots is not None else (1 if count >= 3 and self._fim_seen else 0)
        if not 0 < kept < count:
            return "any"
        return "fim" if slot_id.index >= count - kept else "chat"

    def _plan_for(self, waiter: _Waiter, views: Sequence[SlotView]) -> Plan | None:
        kind = waiter.request.kind
        views = [
            view for view in views
            if self.slot_class(view.id) in ("any", kind) and view.id.backend not in self.closed
        ]
        affinity = self.clock.seconds() < waiter.affinity_until
        disk = None if waiter.request.small else self.disk_lookup(waiter.request)
        return plan(
            waiter.request, views, min_ratio=self.min_ratio, affinity=affinity, disk=disk
        )

    def pump(self) -> None:
        """Give idle slots to waiters in FIFO order, each planned against the state of now."""
        if self._pumping:
            return
        self._pumping = True
        granted: list[tuple[Deferred, Lease]] = []
        try:
            for waiter in list(self._queue):
                decided = self._plan_for(waiter, self.views())
                if decided is None:
                    continue
                if decided.decision is Decision.WAIT:
                    self._wake_at_affinity_end(waiter)
                    continue
                slot = self.slots[decided.slot]
                slot.lock.acquire()  # idle, so this fires at once
                self._leave(waiter)
                now = self.clock.seconds()
                lease = Lease(slot, decided, waiter.request, now - waiter.enqueued, slot.content)
                # Claim the slot for this conversation at once, so that a follow-up
                # arriving meanwhile waits for it instead of computing it again elsewhere.
                slot.content = SlotContent(
                    state_after(waiter.request.small, True),
                    waiter.request.fingerprint,
                    pinned=waiter.request.pinned,
                )
                granted.append((waiter.deferred, lease))
        finally:
            self._pumping = False
        for deferred, lease in granted:
            deferred.callback(lease)

    def _wake_at_affinity_end(self, waiter: _Waiter) -> None:
        # Re-arm a timer that already fired: its delay was computed from a later
        # "now" than the enqueue, so it may fire a float step before affinity_until.
        if waiter.timer is None or not waiter.timer.active():
            delay = max(0.0, waiter.affinity_until - self.clock.seconds())
            waiter.timer = self.clock.callLater(delay, self.pump)

