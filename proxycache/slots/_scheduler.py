"""
Slot ownership: one L{DeferredLock} per slot, a queue fair across tenants
(L{proxycache.slots._fairqueue}), and the map of what each slot holds.

The planner (L{proxycache.routing.plan}) decides; this module holds the state
the decisions are made against and hands out L{Lease}s.  A lease holds its
slot's lock from dispatch until L{Scheduler.release}, which every request path
calls exactly once (success, upstream error, client disconnect alike).  A fork
(L{Plan.fork}) also holds its source slot's lock until the cache tier has saved
the source and calls L{Scheduler.release_source}.

The scheduler is the only writer of slot state: everyone else sees frozen
L{Slot} snapshots (L{Scheduler.slots}, L{Scheduler.slot}), marks a save with
the compare-and-set L{Scheduler.mark_saved}, and takes an idle slot for
maintenance through a L{Hold}, whose release always hands the slot on.

Each slot's content carries its lineage: the key of the disk entry it descends
from within one conversation (the entry it was restored from, or last saved
as).  A save replaces that entry only (L{proxycache.cache.Index.predecessor}),
never another conversation's entry that merely shares a prefix.
"""

from __future__ import annotations

from types import MappingProxyType, TracebackType
from typing import Callable, Mapping, Sequence

import attrs
from twisted.internet.defer import Deferred, DeferredLock, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from proxycache.routing import (
    EMPTY,
    Decision,
    DiskMatch,
    Plan,
    ForkPays,
    KeepPays,
    Relation,
    Request,
    RestoreBeats,
    SlotId,
    SlotState,
    SlotView,
    plan,
    prefill_cost,
    relation,
    state_after,
)
from proxycache.routing._classes import fim_cap
from proxycache.slots._classes import SlotClasses
from proxycache.slots._fairqueue import UNKNOWN, FairQueue, QueueFull, Waiter
from proxycache.slots._slot import NOTHING, Lease, Outcome, Slot, SlotContent

log = Logger()


@attrs.define(eq=False)
class _Record:
    """The scheduler's own, mutable state of one slot."""

    id: SlotId
    lock: DeferredLock = attrs.field(factory=DeferredLock)
    content: SlotContent = NOTHING
    last_used: float = 0.0
    saving: bool = False  # held for a save (a L{Hold}, a fork's source), not by a request

    @property
    def busy(self) -> bool:
        return self.lock.locked

    def snapshot(self) -> Slot:
        return Slot(self.id, self.content, self.last_used, self.busy, self.saving and self.busy)

    def view(self) -> SlotView:
        content = self.content  # built directly: the queue asks for every slot's view per waiter
        return SlotView(
            self.id, content.state, content.fingerprint, self.last_used, self.busy,
            content.tokens, content.saved_key is not None, self.saving and self.busy,
        )


class Hold:
    """
    An idle slot taken for maintenance (a save): nobody is granted it until
    L{release}, which hands it on to whoever waits.  Also a context manager.
    Meanwhile the planner sees the slot as saving (L{SlotView.saving}): a
    request whose prefix it holds waits for it rather than compute elsewhere.
    """

    def __init__(self, scheduler: "Scheduler", record: _Record) -> None:
        self._scheduler = scheduler
        self._record = record
        self._released = False
        record.saving = True

    @property
    def slot(self) -> Slot:
        return self._record.snapshot()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._record.saving = False
            self._scheduler._let_go(self._record)

    def __enter__(self) -> "Hold":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


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
        fork_pays: ForkPays | None = None,
        fair: bool = True,
        tenant_weights: Mapping[str, float] | None = None,
        tenant_max_in_flight: int = 0,
        tenant_max_queued: int = 0,
        fim_idle: float = 30.0,
        side_call_wait: float = 3.0,
        isolate_tenants: bool = False,
        keep_pays: KeepPays | None = None,
        restore_beats: RestoreBeats | None = None,
    ) -> None:
        self.clock = clock
        self.fim_slots = fim_slots  # most slots per backend holding "fim" requests; None: 1 from 3 slots up
        self.classes = SlotClasses(
            clock, fim_slots=fim_slots, fim_idle=fim_idle, side_call_wait=side_call_wait, wake=self.pump
        )
        self.min_ratio = min_ratio
        self.affinity_wait = affinity_wait
        self.max_queue = max_queue
        self.disk_lookup = disk_lookup or (lambda request: None)
        self.fork_pays = fork_pays  # None: HOT slots are never forked (no disk tier to do it)
        self.isolate_tenants = isolate_tenants  # a request sees no other tenant's slot content
        self.keep_pays = keep_pays  # None: a HOT slot's own part is always worth keeping
        self.restore_beats = restore_beats  # None: a restore must reuse more blocks than a slot in place
        self._slots: dict[SlotId, _Record] = {}
        self._queue = FairQueue(
            fair=fair, weights=tenant_weights, max_in_flight=tenant_max_in_flight, max_queued=tenant_max_queued
        )
        self._pumping = False
        self._closed: set[str] = set()  # backends being drained: no new leases there
        self._counts: dict[str, int] = {}  # declared slots per backend
        self._sources: dict[int, _Record] = {}  # id(lease) -> the fork source it still holds

    # -- the slot map -------------------------------------------------------

    @property
    def slots(self) -> Mapping[SlotId, Slot]:
        """Every slot in the map, as it is now (a read-only snapshot)."""
        return MappingProxyType({slot_id: record.snapshot() for slot_id, record in self._slots.items()})

    def slot(self, slot_id: SlotId) -> Slot | None:
        """Slot C{slot_id} as it is now; None when it is not in the map."""
        record = self._slots.get(slot_id)
        return None if record is None else record.snapshot()

    @property
    def closed(self) -> frozenset[str]:
        """Backends being drained (L{close_backend}): no new leases there."""
        return frozenset(self._closed)

    def set_backend_slots(self, backend: str, count: int) -> None:
        """(Re)declare C{backend}'s slots; existing slot state is kept where the index survives."""
        self._counts[backend] = count
        for index in range(count):
            slot_id = SlotId(backend, index)
            self._slots.setdefault(slot_id, _Record(slot_id))
        for slot_id in [s for s in self._slots if s.backend == backend and s.index >= count]:
            if not self._slots[slot_id].busy:
                del self._slots[slot_id]
                self.classes.forget(slot_id)
        self.pump()

    def close_backend(self, backend: str) -> None:
        """Grant no new lease on C{backend}; waiters are planned elsewhere."""
        self._closed.add(backend)
        self.pump()

    def reopen(self, backend: str) -> None:
        """Grant leases on C{backend} again (re-added after a drain, or removed)."""
        self._closed.discard(backend)
        self.pump()

    def reset_backend(self, backend: str) -> None:
        """llama-server restarted: every slot of it is empty now."""
        for record in self._slots.values():
            if record.id.backend == backend:
                record.content = NOTHING
                self.classes.forget(record.id)
        log.warn("slot map of {backend} reset", backend=backend)
        self.pump()

    def mark_saved(self, slot_id: SlotId, expected: SlotContent, key: str) -> bool:
        """
        C{expected}, which slot C{slot_id} held when its save began, is saved as
        C{key}: recorded only if the slot still holds exactly that (compare and
        set), since a request or a reset may have changed it meanwhile.
        """
        record = self._slots.get(slot_id)
        if record is None or record.content is not expected:
            return False
        record.content = attrs.evolve(expected, saved_key=key, lineage=key)
        return True

    def views(self) -> list[SlotView]:
        return [record.view() for record in self._slots.values()]

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def tenant_load(self) -> tuple[dict[str, int], dict[str, int]]:
        """Leases held and requests waiting, per tenant."""
        return dict(self._queue.in_flight), dict(self._queue.queued)

    # -- leases -------------------------------------------------------------

    def acquire(self, request: Request) -> "Deferred[Lease]":
        """
        A lease on the slot the planner picks for C{request}, once it is idle.
        Cancelling the Deferred leaves the queue cleanly.

        @raise QueueFull: the request would have to wait and the queue is full.
        @raise TenantLimit: its tenant has as many requests waiting as it may.
        """
        self.classes.seen(request)
        now = self.clock.seconds()
        waiter = Waiter(request, None, now, now + self.affinity_wait)  # type: ignore[arg-type]
        waiter.deferred = Deferred(lambda d: self._leave(waiter))
        # One index lookup per arrival: its fair cost and its first plan see the same index.
        waiter.disk = disk = None if request.small else self.disk_lookup(request)
        self._queue.add(waiter, prefill_cost(request, self.views(), disk) if self._queue.fair else 1.0)
        try:
            self.pump()
        finally:
            waiter.disk = UNKNOWN
        if not waiter.deferred.called and len(self._queue) > self.max_queue:
            self._leave(waiter)
            raise QueueFull()
        return waiter.deferred

    def release(self, lease: Lease, outcome: Outcome) -> None:
        self.release_source(lease)  # normally released by the cache tier already
        self._queue.released(lease.request.tenant)
        self.classes.released(lease.request)
        slot = self._slots[lease.slot.id]  # a busy slot never leaves the map
        slot.last_used = self.clock.seconds()
        if outcome.succeeded:
            slot.content = SlotContent(
                state_after(lease.request.small, True),
                lease.request.fingerprint,
                outcome.held or outcome.cache_n + outcome.prompt_n + outcome.predicted_n,
                pinned=lease.request.pinned,
                lineage=lease.lineage,
                tenant=lease.request.tenant,
            )
        else:
            slot.content = SlotContent(SlotState.COLD)
        slot.lock.release()
        self._retire_if_gone(slot)
        self.pump()

    def _retire_if_gone(self, slot: _Record) -> None:
        """A slot beyond its backend's declared count was kept only while busy."""
        declared = self._counts.get(slot.id.backend)
        if declared is not None and slot.id.index >= declared and not slot.busy:
            self._slots.pop(slot.id, None)

    def release_source(self, lease: Lease) -> None:
        """A fork's source slot was saved (or could not be): it is free for others again."""
        source = self._sources.pop(id(lease), None)
        if source is not None:
            source.saving = False
            self._let_go(source)

    # -- maintenance ----------------------------------------------------------

    def try_hold(self, slot_id: SlotId) -> Hold | None:
        """
        Take an idle slot for maintenance (a background save); None if it is
        busy or not in the map.  An idle slot is never wanted by the queue:
        L{pump} would have handed it out already.
        """
        record = self._slots.get(slot_id)
        if record is None or record.busy:
            return None
        record.lock.acquire()  # idle, so this fires at once
        return Hold(self, record)

    async def hold_when_idle(self, slot_id: SlotId, timeout: float) -> Hold | None:
        """
        Take slot C{slot_id} for maintenance once whoever holds it lets it go
        (before the queue gets it); None if it is still busy after C{timeout}
        seconds, or not in the map.
        """
        record = self._slots.get(slot_id)
        if record is None:
            return None
        try:
            await record.lock.acquire().addTimeout(timeout, self.clock)
        except TimeoutError:
            return None
        return Hold(self, record)

    def _let_go(self, record: _Record) -> None:
        record.lock.release()
        self._retire_if_gone(record)
        self.pump()

    # -- the queue ----------------------------------------------------------

    def _leave(self, waiter: Waiter, served: bool = False) -> None:
        self._queue.remove(waiter, served=served)
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()

    def slot_class(self, slot_id: SlotId) -> str:
        """"fim" while the slot holds editor completions, else "chat"; "any" when its backend shares all slots."""
        if not fim_cap(self.fim_slots, self._counts.get(slot_id.backend, 0)):
            return "any"
        return self.classes.kind(slot_id)

    def _plan_for(self, waiter: Waiter, views: Sequence[SlotView]) -> tuple[Plan | None, bool]:
        """The plan for C{waiter} now, and whether it waits only for slots busy saving (none else to take)."""
        request = waiter.request
        now = self.clock.seconds()
        views = [view for view in views if view.id.backend not in self._closed]
        if self.isolate_tenants:  # another tenant's content is nothing to reuse, fork or wait for
            views = [
                view if self._slots[view.id].content.tenant == request.tenant else attrs.evolve(view, fingerprint=EMPTY)
                for view in views
            ]
        # A side call waits a little rather than evict a conversation its owner is using.
        patience = waiter.enqueued + self.classes.side_call_wait
        protected: set[SlotId] = set()
        unprotected_at = None
        if request.small and request.kind != "fim" and now < patience:
            protected, unprotected_at = self.classes.protected(
                views, lambda slot_id: self._slots[slot_id].content.tenant, self._queue.in_flight
            )
        views = self.classes.eligible(request, views, self._counts, protected)
        affinity = now < waiter.affinity_until
        disk, waiter.disk = waiter.disk, UNKNOWN
        if disk is UNKNOWN:
            disk = None if request.small else self.disk_lookup(request)
        assert disk is None or isinstance(disk, DiskMatch)
        decided = plan(
            request, views, min_ratio=self.min_ratio, affinity=affinity, disk=disk, fork_pays=self.fork_pays,
            keep_pays=self.keep_pays, restore_beats=self.restore_beats,
        )
        if decided is None and protected:
            self._wake_at(waiter, min(patience, unprotected_at or patience))
        if decided is None:
            # Nothing idle it may take: one of them would have been, but for a background save.
            return None, any(view.saving for view in views)
        return decided, decided.decision is Decision.WAIT and self._slots[decided.slot].saving

    def pump(self) -> None:
        """Give idle slots to waiters in the queue's order, each planned against the state of now."""
        if self._pumping:
            return
        self._pumping = True
        granted: list[tuple[Deferred, Lease]] = []
        try:
            for waiter in self._queue:
                now = self.clock.seconds()
                if not self._queue.may_start(waiter.request.tenant):
                    waiter.behind_save(now, False)
                    continue
                decided, behind_save = self._plan_for(waiter, self.views())
                waiter.behind_save(now, behind_save)
                if decided is None:
                    continue
                if decided.decision is Decision.WAIT:
                    self._wake_at(waiter, waiter.affinity_until)
                    continue
                slot = self._slots[decided.slot]
                slot.lock.acquire()  # idle, so this fires at once
                source = None
                if decided.fork is not None:
                    source = self._slots[decided.fork]
                    source.lock.acquire()  # idle too: the plan only forks idle slots
                    source.saving = True  # held only to be saved: free once that ends, as after a write-behind
                self._leave(waiter, served=True)
                previous = slot.content
                lineage = _lineage(decided, waiter.request, previous)
                # Claim the slot for this conversation at once, so that a follow-up
                # arriving meanwhile waits for it instead of computing it again elsewhere.
                slot.content = SlotContent(
                    state_after(waiter.request.small, True),
                    waiter.request.fingerprint,
                    pinned=waiter.request.pinned,
                    lineage=lineage,
                    tenant=waiter.request.tenant,
                )
                lease = Lease(
                    slot.snapshot(), decided, waiter.request, now - waiter.enqueued, previous,
                    None if source is None else source.snapshot(), lineage, waiter.save_waited,
                )
                if source is not None:
                    self._sources[id(lease)] = source
                self.classes.granted(slot.id, waiter.request)
                granted.append((waiter.deferred, lease))
        finally:
            self._pumping = False
        for deferred, lease in granted:
            deferred.callback(lease)

    def _wake_at(self, waiter: Waiter, when: float) -> None:
        # Re-arm a timer that already fired: its delay was computed from a later
        # "now" than the enqueue, so it may fire a float step before C{when}.
        if waiter.timer is None or not waiter.timer.active():
            delay = max(0.0, when - self.clock.seconds())
            waiter.timer = self.clock.callLater(delay, self.pump)



def _lineage(decided: Plan, request: Request, previous: SlotContent) -> str | None:
    """
    The disk entry the request's content descends from: the slot's own entry
    when the request continues what the slot held, the restored entry after a
    restore (the tier replaces it only if the new content extends it), else none.
    """
    if decided.restore is not None:
        return decided.restore.key
    continues = relation(request.fingerprint, previous.fingerprint) is Relation.CONTINUATION
    if decided.decision is Decision.HIT and continues:
        return previous.saved_key or previous.lineage
    return None
