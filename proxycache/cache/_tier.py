"""
The disk tier at work: save a hot slot before it is evicted, restore a saved
cache when it beats recomputing, verify that restores took, save idle hot
slots in the background (write-behind, a spare on a contended backend: when
is L{BackgroundSaves}'s).  What is saved, and the disk budget, is
L{SavedCaches}'s.

llama.cpp defers an action on a busy slot and resumes only one deferred task
per slot release, so every save/restore here runs with the slot's lock held,
after llama.cpp itself reports the slot idle, with a timeout.
"""

from __future__ import annotations

import shutil
from typing import Any, Callable, Mapping, Sequence

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from proxycache.backend import UPSTREAM_FAILURES, Backend, FailureKind, SlotActionFailed, UpstreamError
from proxycache.cache._background import BackgroundSaves
from proxycache.cache._entries import MetaEntry, bin_name, entry_key
from proxycache.cache._probed import NotProbed, ProbedProcesses
from proxycache.cache._saved_caches import SavedCaches
from proxycache.cache._tier_state import Catalog
from proxycache.cache._unusable import Fault, UnusableFiles
from proxycache.config import Config
from proxycache.routing import Decision, SlotId, SlotState, fell_short
from proxycache.slots import Hold, Lease, Outcome, Scheduler, Slot, SlotContent, detached

log = Logger()

# A save whose slot holds less than this share of the tokens the proxy believes
# it holds (llama.cpp overwrote or cleared it behind the proxy's back) would put
# a near-empty file over a good one: refused.
MIN_SAVED_SHARE = 0.5
class _NotRestorable(Exception):
    """A restore's file, seen here, is gone or not the one saved: llama.cpp is not asked (it may abort on it)."""

    def __init__(self, fault: Fault) -> None:
        super().__init__("its file was looked at first, llama.cpp was not asked")
        self.fault = fault


@attrs.frozen
class _Restored:
    entry: MetaEntry
    n_restored: int
    common_blocks: int


class DiskTier(Service):
    """The cache tier: implements L{proxycache.slots.SlotPreparer} for the dispatcher."""

    def __init__(
        self,
        config: Config,
        clock: IReactorTime,
        scheduler: Scheduler,
        backends: Mapping[str, Backend],
        catalog: Catalog,
        *,
        on_empty_slot: Callable[[], Any] = lambda: None,
        observers: Sequence[Callable[[str, float, int], None]] = (),
        to_thread: Callable[..., Deferred[Any]] = deferToThread,
        disk_usage: Callable[[str], Any] = shutil.disk_usage,  # blocking: only ever run in to_thread
    ) -> None:
        self.config = config
        self.clock = clock
        self.scheduler = scheduler
        self.backends = backends
        self.catalog = catalog
        self.index = catalog.index
        self.speeds = catalog.speeds
        self.counters = catalog.counters
        self.store = SavedCaches(config, catalog, to_thread=to_thread, disk_usage=disk_usage)
        self.on_empty_slot = on_empty_slot  # llama-server looks restarted: the monitor looks again
        self.observers = list(observers)  # (action, seconds, bytes) of every save and restore
        self._restored: dict[SlotId, _Restored] = {}
        self._path: dict[SlotId, tuple[float, float]] = {}  # seconds saving, restoring on a request's path
        self.background = BackgroundSaves(config, clock, scheduler, catalog.speeds, self._start_save_idle)
        # Write-behinds refused while their backend's weights were not confirmed: by backend, what each slot
        # held and the model it ran, retried when it is probed again (not only at the slot's next release).
        self._unconfirmed: dict[str, dict[SlotId, tuple[SlotContent, str | None]]] = {}
        self._settling: dict[SlotId, Deferred[Decision]] = {}
        self._cannot_save: set[str] = set()  # backends that answered 501 (no --slot-save-path) since they came up
        self.loaded: Deferred[None] = Deferred()
        self.probed = ProbedProcesses(catalog, clock, on_lost=lambda: self.on_empty_slot())
        self.unusable = UnusableFiles(self.store, self.counters, to_thread)

    # -- service ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        Deferred.fromCoroutine(self.store.load()).chainDeferred(self.loaded)

    def stopService(self) -> Deferred:
        super().stopService()
        self.background.stop()
        return Deferred.fromCoroutine(self.flush())

    async def flush(self, wait: float = 30.0, backend: str | None = None) -> None:
        """
        Save every hot slot (of C{backend}, or all) whose content changed since
        its last save, waiting up to C{wait} seconds for a slot still busy (a
        background save, or a request the drain let finish).
        """
        for slot_id in [i for i in self.scheduler.slots if backend in (None, i.backend)]:
            hold = await self.scheduler.hold_when_idle(slot_id, wait)
            if hold is None:
                if slot_id in self.scheduler.slots:
                    log.warn("slot {slot} stayed busy: not saved on stop", slot=str(slot_id))
                continue
            with hold:
                await self._save_idle(slot_id, hold)

    def backend_up(self, backend: str, model: str, process: str | None = None) -> None:
        """
        A backend came up (again) running C{model}, probed in C{process}; says once
        what that makes unusable.
        """
        self._cannot_save.discard(backend)  # restarted: perhaps with --slot-save-path now
        unusable = self.probed.up(backend, model, process)
        for slot_id, (content, ran) in self._unconfirmed.pop(backend, {}).items():
            slot = self.scheduler.slot(slot_id)
            if ran == model and slot is not None and slot.content == content:  # other weights: not the same cache
                self._start_save_idle(slot_id)
        if unusable:
            log.warn(
                "{n} saved caches of {backend} were written by another model or llama.cpp build: "
                "never restored, and the first to go from the disk budget",
                n=unusable,
                backend=backend,
            )

    def identity_lost(self, backend: str) -> None:
        """A sign that C{backend} restarted: nothing saved or restored there until it is probed again."""
        self.probed.lost(backend)

    # -- around a request ---------------------------------------------------

    async def prepare(self, lease: Lease) -> Decision:
        # A client that goes away must not abort a save or restore half-way: the
        # evicted cache would be lost, and llama.cpp would still be busy with the
        # action when the slot is handed on.  So the work runs to its end, and
        # the relay releases the slot only once it has (L{settling}).
        work = Deferred.fromCoroutine(self._prepare(lease))
        self._settling[lease.slot.id] = work
        return await detached(work, late=_log_late_failure)

    def settling(self, lease: Lease) -> Deferred | None:
        work = self._settling.pop(lease.slot.id, None)
        return None if work is None or work.called else work

    async def _prepare(self, lease: Lease) -> Decision:
        previous = lease.previous
        saved_here = False
        self._path[lease.slot.id] = (0.0, 0.0)
        # A HIT keeps the slot's content unless it takes over another conversation's (evicts).
        evicts = (lease.plan.evicts or lease.plan.decision is not Decision.HIT) and previous.state is SlotState.HOT
        if evicts:
            self.background.evicted(lease.slot.id.backend)
        # A save on a request's path must be worth its time: not for what a saved entry (or the
        # prefix this request keeps in place) holds already and a short tail recomputed faster.
        kept = lease.plan.common_blocks if lease.plan.decision is Decision.HIT else 0
        if evicts and previous.saved_key is None and self._save_pays(lease.slot.id.backend, previous, kept, True):
            saved_here = await self._on_path(lease, 0, self.save(lease.slot, previous)) is not None
        self.background.cancel(lease.slot.id)
        if lease.plan.fork is not None or lease.plan.restore is not None:
            await self.probed.described(lease.slot.id.backend)  # just restarted: probed again in a moment
        if lease.plan.fork is not None:
            key = await self._on_path(lease, 0, self._save_fork_source(lease))
            return Decision.RESTORE if key and await self._on_path(lease, 1, self._restore(lease, key)) else Decision.MISS
        if lease.plan.restore is not None:
            # Just saved under our lock, the slot is idle: one round trip to llama.cpp fewer on this
            # request's way (each waits for a batch of the other slots).
            restored = await self._on_path(lease, 1, self._restore(lease, lease.plan.restore.key, idle=saved_here))
            return Decision.RESTORE if restored else Decision.MISS
        return lease.plan.decision

    async def _on_path(self, lease: Lease, which: int, action: Any) -> Any:
        """Await a save (C{which} 0) or restore (1) on C{lease}'s path, adding up its time."""
        started = self.clock.seconds()
        try:
            return await action
        finally:
            took = list(self._path.get(lease.slot.id, (0.0, 0.0)))
            took[which] += self.clock.seconds() - started
            self._path[lease.slot.id] = (took[0], took[1])

    def path_seconds(self, lease: Lease) -> tuple[float, float]:
        """Seconds this request waited for saves and for restores before it was sent."""
        return self._path.get(lease.slot.id, (0.0, 0.0))

    def _save_pays(self, backend: str, content: SlotContent, kept_blocks: int = 0, on_path: bool = False) -> bool:
        return self.catalog.save_pays(
            backend, content.fingerprint, content.tokens, kept_blocks=kept_blocks, on_path=on_path
        )

    def restored_tokens(self, lease: Lease) -> int:
        restored = self._restored.get(lease.slot.id)
        return restored.n_restored if restored is not None else 0

    def released(self, lease: Lease, outcome: Outcome) -> None:
        self.speeds.observe_prefill(outcome.prompt_n, outcome.prompt_ms, outcome.cache_n)
        self._path.pop(lease.slot.id, None)
        restored = self._restored.pop(lease.slot.id, None)
        if restored is not None and outcome.measured:
            self._verify(lease, restored, outcome)
        slot = self.scheduler.slot(lease.slot.id)  # as it is now: another request may have it already
        if outcome.succeeded and slot is not None and slot.state is SlotState.HOT:
            self.background.schedule(slot.id)

    def _verify(self, lease: Lease, restored: _Restored, outcome: Outcome) -> None:
        if not fell_short(lease.plan, lease.request, outcome.cache_n, outcome.prompt_n):
            return
        self.counters.ineffective_restores += 1
        log.warn(
            "restore of {key} did not take (cache_n={cache_n} of {total} prompt tokens); "
            "it will not be restored again (SWA/hybrid model without --swa-full?)",
            key=restored.entry.key,
            cache_n=outcome.cache_n,
            total=outcome.cache_n + outcome.prompt_n,
        )
        self.store.update(restored.entry, ineffective=True)

    # -- save / restore -----------------------------------------------------

    async def save(self, slot: Slot, content: SlotContent) -> str | None:
        """Save what C{slot} holds (C{content}); the caller holds its lock.  Returns the entry key."""
        backend = self.backends[slot.id.backend]
        model = self.catalog.current_model(backend.name)  # None until probed again after a restart
        fp = content.fingerprint
        if model is None or not fp.blocks or backend.name in self._cannot_save:
            return None
        if not await self.store.room_to_save(backend.name):
            return None
        save_dir = self.catalog.storage.get(backend.name)
        predecessor = self.index.predecessor(fp, backend.name, model, content.lineage, save_dir)
        key = predecessor.key if predecessor else entry_key(fp.key, model, self.catalog.where(backend.name))
        lock = await self.store.lock_key(key)
        try:
            entry = await self._save_locked(slot, content, backend, model, key)
        finally:
            self.store.unlock_key(key, lock)
        if entry is None:
            return None
        await self.store.enforce_budget()
        return key

    async def _save_locked(
        self, slot: Slot, content: SlotContent, backend: Backend, model: str, key: str
    ) -> MetaEntry | None:
        # What the key holds now, not before the wait for its lock: a drop or another save may have come between.
        predecessor = self.index.entries.get(key)
        started = self.clock.seconds()
        try:
            seen = await backend.wait_until_idle(slot.id.index)
            if seen is not None and not seen.used:
                # Never used since llama-server started: it restarted behind our back, and
                # saving now would write an empty file over this conversation's cache.
                self.on_empty_slot()
                raise UpstreamError(f"slot {slot.id.index} is empty in llama.cpp (restarted?)")
            expected = max(content.tokens, predecessor.tokens if predecessor else 0)
            held = seen.tokens if seen is not None else None
            if held is not None and held < expected * MIN_SAVED_SHARE:
                # llama.cpp overwrote or cleared the slot behind the proxy's back (its RAM
                # cache, an n_cmpl child task, an erase): the file holds more than the slot.
                self.on_empty_slot()
                raise UpstreamError(
                    f"slot {slot.id.index} holds {held} tokens in llama.cpp, {expected} expected: not saved over"
                )
            if not await self.probed.current(backend, model):
                raise NotProbed(f"{backend.name} is not the process whose weights were probed: not saved")
            saved = await backend.save_slot(slot.id.index, bin_name(key), self.config.slot_action_timeout)
            if not await self.probed.made_by(backend, model):
                await self.store.remove_locked(key, backend.name)  # the file holds what another process had
                raise NotProbed(f"{backend.name} restarted while saving: the file is dropped")
        except (TimeoutError, *UPSTREAM_FAILURES) as e:
            self.counters.save_failures += 1
            if isinstance(e, SlotActionFailed) and e.kind is FailureKind.UNSUPPORTED:
                # Each later save would fail the same way: not asked again until it restarts.
                if backend.name not in self._cannot_save:
                    self._cannot_save.add(backend.name)
                    log.warn(
                        "saving slot {slot} failed: {error} (llama-server runs without --slot-save-path: "
                        "nothing can be saved there until it restarts with one)", slot=str(slot.id), error=e,
                    )
                return None
            log.warn("saving slot {slot} failed: {error}", slot=str(slot.id), error=e)
            # Nobody listens, or another process (still loading, say) answered: the monitor looks
            # again, takes it out if gone, and probes what answers there next.
            self.on_empty_slot()
            return None
        now = self.clock.seconds()
        entry = MetaEntry(
            key=key,
            backend=backend.name,
            model=model,
            fingerprint=content.fingerprint,
            tokens=content.tokens if saved.tokens is None else saved.tokens,
            bytes=saved.bytes,
            created=predecessor.created if predecessor else now,
            last_used=now,
            pinned=content.pinned or bool(predecessor and predecessor.pinned),
            tenant=content.tenant,
            save_dir=self.catalog.storage.get(backend.name),
        )
        if not await self.store.record(entry):
            return None
        self.counters.saves += 1
        self.counters.saved_bytes += entry.bytes
        took = now - started
        self.speeds.observe_save(entry.bytes, saved.ms, entry.tokens, took)
        for observer in self.observers:
            observer("save", took, entry.bytes)
        (log.info if took >= 1 else log.debug)(
            "saved slot {slot} as {key}: {tokens} tokens, {mb:.1f} MB in {took:.2f}s",
            slot=str(slot.id),
            key=key,
            tokens=entry.tokens,
            mb=entry.bytes / 1e6,
            took=took,
        )
        return entry

    async def _restore(self, lease: Lease, key: str, idle: bool = False) -> bool:
        entry = self.index.entries.get(key)
        if entry is None:
            return False
        slot = lease.slot
        backend = self.backends[slot.id.backend]
        started = self.clock.seconds()
        lock = await self.store.lock_key(entry.key)  # not while a save of the same key rewrites the file
        try:
            if not idle:
                await backend.wait_until_idle(slot.id.index)
            # Judged now, not when planned: the key may hold a newer save, or be gone, and the
            # backend may run other weights since.
            current = self.index.entries.get(entry.key)
            if current is None or not self.catalog.restorable_on(current, backend.name):
                return False
            entry = current
            fault = await self.unusable.before(entry)
            if fault is not None:
                raise _NotRestorable(fault)
            restored = await backend.restore_slot(slot.id.index, entry.filename, self.config.slot_action_timeout)
            if not await self.probed.made_by(backend, entry.model):
                raise NotProbed(f"{backend.name} restarted around the restore")
        except (TimeoutError, _NotRestorable, *UPSTREAM_FAILURES) as e:
            failure: Exception | None = e
        else:
            failure = None
        finally:
            self.store.unlock_key(entry.key, lock)
        if isinstance(failure, NotProbed):
            await self._erase(backend, slot.id.index)  # it may hold a file restored into other weights
        if failure is not None:
            # llama.cpp clears the slot when a restore fails: the request recomputes.
            self.counters.restore_failures += 1
            if isinstance(failure, _NotRestorable):
                why: str | None = failure.fault.why  # llama.cpp not asked
                await self.unusable.drop(entry, failure.fault)
            else:
                why = await self.unusable.refused(entry, slot.id.backend, failure)
            log.warn(
                "restoring {key} into slot {slot} failed, recomputing: {error}; {verdict}",
                key=entry.key,
                slot=str(slot.id),
                error=failure,
                verdict="kept (the failure may go away)" if why is None else f"dropped, never tried again: {why}",
            )
            return False
        self.unusable.restored(entry)
        took = self.clock.seconds() - started
        n_restored = restored.tokens
        self.speeds.observe_restore(restored.bytes or 0, restored.ms, n_restored, took)
        self.counters.restores += 1
        self.counters.restored_tokens += n_restored
        if slot.id.backend != entry.backend:
            self.counters.cross_backend_restores += 1
        for observer in self.observers:
            observer("restore", took, entry.bytes if restored.bytes is None else restored.bytes)
        self._restored[slot.id] = _Restored(entry, n_restored, lease.plan.common_blocks)
        self.store.update(entry, last_used=self.clock.seconds())
        (log.info if took >= 1 else log.debug)(
            "restored {key} into slot {slot}: {tokens} tokens in {took:.2f}s",
            key=entry.key,
            slot=str(slot.id),
            tokens=n_restored,
            took=took,
        )
        return True

    async def _erase(self, backend: Backend, index: int) -> None:
        try:
            await backend.erase_slot(index, self.config.slot_action_timeout)
        except (TimeoutError, *UPSTREAM_FAILURES) as e:
            log.warn("erasing slot {index} of {backend} failed: {error}", index=index, backend=backend.name, error=e)

    def decoding(self, lease: Lease) -> None:
        self.background.decoding(lease)

    # -- background saves ---------------------------------------------------

    def _start_save_idle(self, slot_id: SlotId) -> None:
        # Nobody waits on a background save: whatever it raises is logged here, not left in a Deferred.
        d = Deferred.fromCoroutine(self._save_idle(slot_id))
        d.addErrback(lambda f: log.failure("background save of slot {slot} failed", f, slot=str(slot_id)))

    async def _save_idle(self, slot_id: SlotId, hold: Hold | None = None) -> None:
        """Save an idle hot slot unless saved since it changed; C{hold}: the caller holds it already."""
        self.background.forget(slot_id)
        slot = self.scheduler.slot(slot_id)
        if slot is None or slot.state is not SlotState.HOT or slot.content.saved_key is not None:
            return
        if not self._save_pays(slot_id.backend, slot.content):
            return  # a saved entry holds all but a tail cheaper to compute again: the save would only block
        hold = hold or self.scheduler.try_hold(slot_id)
        if hold is None:
            return  # in use: its next release schedules another save
        with hold:
            key = await self.save(slot, slot.content)
            if key is not None:
                self.scheduler.mark_saved(slot_id, slot.content, key)
            elif self.catalog.current_model(slot_id.backend) is None:  # a sign of a restart: not saved until probed
                self._unconfirmed.setdefault(slot_id.backend, {})[slot_id] = (
                    slot.content, self.catalog.models.get(slot_id.backend)
                )

    # -- forks ----------------------------------------------------------------

    async def _save_fork_source(self, lease: Lease) -> str | None:
        """Save a fork's source slot unless saved (it is held for us), then let it go."""
        try:
            if lease.source is None:
                return None
            source = self.scheduler.slot(lease.source.id) or lease.source  # held: it stays in the map
            content = source.content
            if content.saved_key is not None and content.saved_key in self.index.entries:
                return content.saved_key
            key = await self.save(source, content)
            if key is not None and self.scheduler.mark_saved(source.id, content, key):
                self.background.cancel(source.id)
            return key
        finally:
            self.scheduler.release_source(lease)


def _log_late_failure(result: Any) -> None:
    if isinstance(result, Failure):
        log.failure("slot preparation failed after its request was cancelled", result)
