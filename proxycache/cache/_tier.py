"""
The disk tier at work: save a hot slot before it is evicted, restore a saved
cache when it beats recomputing, verify that restores took, save idle hot
slots in the background (write-behind), and keep the disk within budget.

llama.cpp defers an action on a busy slot and resumes only one deferred task
per slot release, so every save/restore here runs with the slot's lock held,
after llama.cpp itself reports the slot idle, with a timeout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from proxycache.backend import UPSTREAM_FAILURES, Backend, UpstreamError, never_used
from proxycache.cache._catalog import Catalog
from proxycache.cache._files import load_index, remove_entry_files, write_meta
from proxycache.cache._index import MetaEntry, bin_name
from proxycache.config import Config
from proxycache.routing import Decision, SlotId, SlotState, SlotView, fell_short
from proxycache.slots import Lease, Outcome, Scheduler, Slot, SlotContent

log = Logger()


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
    ) -> None:
        self.config = config
        self.clock = clock
        self.scheduler = scheduler
        self.backends = backends
        self.catalog = catalog
        self.index = catalog.index
        self.speeds = catalog.speeds
        self.counters = catalog.counters
        self.on_empty_slot = on_empty_slot  # llama-server looks restarted: the monitor looks again
        self.observers = list(observers)  # (action, seconds, bytes) of every save and restore
        self.to_thread = to_thread
        self.meta_dir = Path(config.meta_dir)
        self.save_dir = Path(config.slot_save_path) if config.slot_save_path else None
        self.pinned = frozenset(config.pinned_keys)
        self._restored: dict[SlotId, _Restored] = {}
        self._write_behind: dict[SlotId, IDelayedCall] = {}
        self._settling: dict[SlotId, Deferred[Decision]] = {}
        self.loaded: Deferred[None] = Deferred()

    # -- service ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        Deferred.fromCoroutine(self._load()).chainDeferred(self.loaded)

    async def _load(self) -> None:
        loaded = await self.to_thread(load_index, self.meta_dir, self.save_dir)
        for entry in loaded.entries:
            self.index.entries[entry.key] = entry
        if loaded.skipped:  # one line, however many (an old format leaves many)
            log.warn(
                "skipped {n} unreadable cache metas (they will not be restored): {some}",
                n=len(loaded.skipped), some="; ".join(loaded.skipped[:3]) + ("; ..." if len(loaded.skipped) > 3 else ""),
            )
        if loaded.missing:
            log.warn("dropped {n} cache metas whose .bin is gone", n=len(loaded.missing))
        if loaded.stray:
            log.warn("{n} slot cache files have no meta (left alone): {names}", n=len(loaded.stray), names=", ".join(loaded.stray[:5]))
        log.info("disk cache index: {n} entries, {mb:.1f} MB", n=len(self.index), mb=self.index.total_bytes / 1e6)

    def stopService(self) -> Deferred:
        super().stopService()
        for timer in self._write_behind.values():
            if timer.active():
                timer.cancel()
        return Deferred.fromCoroutine(self.flush())

    async def flush(self, wait: float = 30.0) -> None:
        """
        Save every hot slot whose content changed since its last save, waiting
        up to C{wait} seconds for a slot still busy (a background save, or a
        request the drain let finish).
        """
        for slot in list(self.scheduler.slots.values()):
            try:
                await slot.lock.acquire().addTimeout(wait, self.clock)
            except TimeoutError:
                log.warn("slot {slot} stayed busy: not saved on stop", slot=str(slot.id))
                continue
            slot.lock.release()
            await self._save_idle(slot)

    # -- around a request ---------------------------------------------------

    async def prepare(self, lease: Lease) -> Decision:
        # A client that goes away must not abort a save or restore half-way: the
        # evicted cache would be lost, and llama.cpp would still be busy with the
        # action when the slot is handed on.  So the work runs to its end, and
        # the relay releases the slot only once it has (L{settling}).
        work = Deferred.fromCoroutine(self._prepare(lease))
        self._settling[lease.slot.id] = work
        return await _shielded(work)

    def settling(self, lease: Lease) -> Deferred | None:
        work = self._settling.pop(lease.slot.id, None)
        return None if work is None or work.called else work

    async def _prepare(self, lease: Lease) -> Decision:
        previous = lease.previous
        # A HIT keeps the slot's content unless it takes over another conversation's (evicts).
        if (
            (lease.plan.evicts or lease.plan.decision is not Decision.HIT)
            and previous.state is SlotState.HOT
            and previous.saved_key is None
        ):
            await self.save(lease.slot, previous)
        self._cancel_write_behind(lease.slot)
        if lease.plan.fork is not None:
            key = await self._save_fork_source(lease)
            return Decision.RESTORE if key and await self._restore(lease, key) else Decision.MISS
        if lease.plan.restore is not None:
            return Decision.RESTORE if await self._restore(lease, lease.plan.restore.key) else Decision.MISS
        return lease.plan.decision

    def restored_tokens(self, lease: Lease) -> int:
        restored = self._restored.get(lease.slot.id)
        return restored.n_restored if restored is not None else 0

    def released(self, lease: Lease, outcome: Outcome) -> None:
        self.speeds.observe_prefill(outcome.prompt_n, outcome.prompt_ms)
        restored = self._restored.pop(lease.slot.id, None)
        if restored is not None and outcome.measured:
            self._verify(lease, restored, outcome)
        if outcome.succeeded and lease.slot.state is SlotState.HOT:
            self._schedule_write_behind(lease.slot)

    def _verify(self, lease: Lease, restored: _Restored, outcome: Outcome) -> None:
        if not fell_short(lease.plan, lease.request, outcome.cache_n, outcome.prompt_n):
            return
        self.counters.ineffective_restores += 1
        log.warn(
            "restore of {key} did not take (cache_n={cache_n} of {total} prompt tokens); "
            "it will not be restored again (SWA/hybrid model without --swa-full?)",
            key=restored.entry.key, cache_n=outcome.cache_n, total=outcome.cache_n + outcome.prompt_n,
        )
        self._replace(attrs.evolve(restored.entry, ineffective=True))

    # -- save / restore -----------------------------------------------------

    async def save(self, slot: Slot, content: SlotContent) -> str | None:
        """Save what C{slot} holds (C{content}); the caller holds its lock.  Returns the entry key."""
        backend = self.backends[slot.id.backend]
        model = self.catalog.models.get(backend.name)
        fp = content.fingerprint
        if model is None or not fp.blocks:
            return None
        predecessor = self.index.predecessor(fp, backend.name, model, content.lineage)
        key = predecessor.key if predecessor else fp.key
        started = self.clock.seconds()
        try:
            seen = await backend.wait_until_idle(slot.id.index)
            if never_used(seen):
                # Never used since llama-server started: it restarted behind our back, and
                # saving now would write an empty file over this conversation's cache.
                self.on_empty_slot()
                raise UpstreamError(f"slot {slot.id.index} is empty in llama.cpp (restarted?)")
            reply = await backend.slot_action(slot.id.index, "save", bin_name(key), self.config.slot_action_timeout)
        except (TimeoutError, *UPSTREAM_FAILURES) as e:
            self.counters.save_failures += 1
            hint = " (llama-server runs without --slot-save-path: nothing can be saved)" if " 501 " in str(e) else ""
            log.warn("saving slot {slot} failed: {error}{hint}", slot=str(slot.id), error=e, hint=hint)
            return None
        now = self.clock.seconds()
        entry = MetaEntry(
            key=key, backend=backend.name, model=model, fingerprint=fp,
            tokens=int(reply.get("n_saved", content.tokens)), bytes=int(reply.get("n_written", 0)),
            created=predecessor.created if predecessor else now, last_used=now,
            pinned=content.pinned or bool(predecessor and predecessor.pinned),
        )
        try:
            await self.to_thread(write_meta, self.meta_dir, entry)
        except OSError as e:
            self.counters.save_failures += 1
            log.warn("writing cache meta {key} failed: {error}", key=key, error=e)
            return None
        self.index.entries[key] = entry
        self.counters.saves += 1
        self.counters.saved_bytes += entry.bytes
        took = now - started
        self.speeds.observe_save(entry.bytes, float(reply.get("timings", {}).get("save_ms", 0)))
        for observer in self.observers:
            observer("save", took, entry.bytes)
        (log.info if took >= 1 else log.debug)(
            "saved slot {slot} as {key}: {tokens} tokens, {mb:.1f} MB in {took:.2f}s",
            slot=str(slot.id), key=key, tokens=entry.tokens, mb=entry.bytes / 1e6, took=took,
        )
        await self._enforce_budget()
        return key

    async def _restore(self, lease: Lease, key: str) -> bool:
        entry = self.index.entries.get(key)
        if entry is None:
            return False
        slot = lease.slot
        backend = self.backends[slot.id.backend]
        started = self.clock.seconds()
        try:
            await backend.wait_until_idle(slot.id.index)
            reply = await backend.slot_action(slot.id.index, "restore", entry.filename, self.config.slot_action_timeout)
        except (TimeoutError, *UPSTREAM_FAILURES) as e:
            # llama.cpp clears the slot when a restore fails: the request recomputes.
            self.counters.restore_failures += 1
            log.warn("restoring {key} into slot {slot} failed, recomputing: {error}", key=entry.key, slot=str(slot.id), error=e)
            if "failed to open" in str(e).lower() or "not found" in str(e).lower():
                await self._drop(entry)
            return False
        took = self.clock.seconds() - started
        n_restored = int(reply.get("n_restored", 0))
        self.speeds.observe_restore(int(reply.get("n_read", 0)), float(reply.get("timings", {}).get("restore_ms", 0)))
        self.counters.restores += 1
        self.counters.restored_tokens += n_restored
        for observer in self.observers:
            observer("restore", took, int(reply.get("n_read", entry.bytes)))
        self._restored[slot.id] = _Restored(entry, n_restored, lease.plan.common_blocks)
        self._replace(attrs.evolve(entry, last_used=self.clock.seconds()))
        (log.info if took >= 1 else log.debug)(
            "restored {key} into slot {slot}: {tokens} tokens in {took:.2f}s",
            key=entry.key, slot=str(slot.id), tokens=n_restored, took=took,
        )
        return True

    # -- write-behind -------------------------------------------------------

    def _schedule_write_behind(self, slot: Slot) -> None:
        self._cancel_write_behind(slot)
        self._write_behind[slot.id] = self.clock.callLater(
            self.config.write_behind, lambda: Deferred.fromCoroutine(self._save_idle(slot))
        )

    def _cancel_write_behind(self, slot: Slot) -> None:
        timer = self._write_behind.pop(slot.id, None)
        if timer is not None and timer.active():
            timer.cancel()

    async def _save_idle(self, slot: Slot) -> None:
        self._write_behind.pop(slot.id, None)
        content = slot.content
        if content.state is not SlotState.HOT or content.saved_key is not None:
            return
        if not self.scheduler.try_exclusive(slot):
            return  # in use: its next release schedules another save
        try:
            key = await self.save(slot, content)
            if key is not None and slot.content is content:
                slot.content = attrs.evolve(content, saved_key=key, lineage=key)
        finally:
            self.scheduler.done_exclusive(slot)

    # -- forks ----------------------------------------------------------------

    def fork_pays(self, view: SlotView, common_blocks: int) -> bool:
        """
        The scheduler's cost model for a fork of HOT slot C{view} (L{Plan.fork}):
        save it unless saved, restore the file elsewhere, against recomputing
        the C{common_blocks} the request shares with it.
        """
        saves_fail = self.counters.save_failures and not self.counters.saves
        if self.catalog.models.get(view.id.backend) is None or saves_fail:
            return False  # no model known yet, or saves do not work (no --slot-save-path)
        blocks = len(view.fingerprint.blocks)
        tokens = view.tokens or view.fingerprint.words  # about one token a word when not measured
        per_token = self._kv_bytes_per_token()
        size = round(tokens * per_token) if per_token is not None else None
        return self.speeds.fork_pays(tokens, size, blocks, common_blocks, view.saved)

    def _kv_bytes_per_token(self) -> float | None:
        """From the saved entries; None before anything was saved."""
        tokens = sum(e.tokens for e in self.index)
        return self.index.total_bytes / tokens if tokens else None

    async def _save_fork_source(self, lease: Lease) -> str | None:
        """Save a fork's source slot unless saved (its lock is held for us), then let it go."""
        source = lease.source
        try:
            if source is None:
                return None
            content = source.content
            if content.saved_key is not None and content.saved_key in self.index.entries:
                return content.saved_key
            key = await self.save(source, content)
            if key is not None and source.content is content:
                source.content = attrs.evolve(content, saved_key=key, lineage=key)
                self._cancel_write_behind(source)
            return key
        finally:
            self.scheduler.release_source(lease)

    # -- the index on disk --------------------------------------------------

    def _replace(self, entry: MetaEntry) -> None:
        self.index.entries[entry.key] = entry
        d = self.to_thread(write_meta, self.meta_dir, entry)
        d.addErrback(lambda f: log.warn("writing cache meta {key} failed: {error}", key=entry.key, error=f.value))

    async def _drop(self, entry: MetaEntry) -> None:
        self.index.entries.pop(entry.key, None)
        await self.to_thread(remove_entry_files, self.meta_dir, self.save_dir, entry.key)

    async def _enforce_budget(self) -> None:
        victims = self.index.over_budget(
            self.config.max_cache_bytes, self.config.max_cache_entries, self.pinned, frozenset(self.catalog.models.values())
        )
        for victim in victims:
            self.counters.evicted_entries += 1
            log.info("disk budget: dropping cache {key} ({mb:.1f} MB)", key=victim.key, mb=victim.bytes / 1e6)
            await self._drop(victim)


def _shielded(work: Deferred) -> Deferred:
    """Fires with C{work}'s result; cancelling it leaves C{work} running."""
    shield: Deferred = Deferred()

    def forward(result: Any) -> None:
        if not shield.called:
            shield.callback(result)  # a Failure errbacks
        elif isinstance(result, Failure):
            log.failure("slot preparation failed after its request was cancelled", result)

    work.addBoth(forward)
    return shield
