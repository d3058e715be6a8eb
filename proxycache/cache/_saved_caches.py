"""
The saved caches on disk: the index read back at start, one writer per key
(a save, a meta update, a drop), the disk budget chosen and kept, and the
free space left to everything else where llama-server writes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import attrs
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from proxycache.cache._budget import AUTO_SHARE, auto_budget, headroom
from proxycache.cache._entries import MetaEntry
from proxycache.cache._meta_files import load_index, remove_entry_files, write_meta
from proxycache.cache._shares import over_tenant_share
from proxycache.cache._tier_state import Catalog
from proxycache.config import Config

log = Logger()


class SavedCaches:
    """What the disk tier has saved: its C{.meta} files and the catalog's index of them."""

    def __init__(
        self,
        config: Config,
        catalog: Catalog,
        *,
        to_thread: Callable[..., Deferred[Any]] = deferToThread,
        disk_usage: Callable[[str], Any] = shutil.disk_usage,  # blocking: only ever run in to_thread
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.index = catalog.index
        self.counters = catalog.counters
        self.to_thread = to_thread
        self.disk_usage = disk_usage
        self.meta_dir = Path(config.meta_dir)
        # llama-server's save directory as seen here: each backend's own (--backend-save-dirs, or given when
        # added at run time: the catalog's storage), this one for the rest
        self.save_dir = Path(config.slot_save_path) if config.slot_save_path else None
        self.pinned = frozenset(config.pinned_keys)
        self._low_space = False  # logged once per spell of low free space
        self._key_locks: dict[str, DeferredLock] = {}

    @property
    def default_directory(self) -> Path | None:
        """
        Where a backend of unknown storage (one no longer configured) writes:
        the directory all share, unless each backend was given its own.
        """
        return None if self.config.backend_save_dirs else self.save_dir

    def directory(self, backend: str) -> Path | None:
        """Where C{backend} writes its files, as seen here (None: not visible)."""
        shared = self.catalog.storage.get(backend)
        return Path(shared) if shared else self.default_directory

    def directories(self) -> list[Path]:
        """Every save directory visible here, each once."""
        found = {str(self.default_directory)} if self.default_directory else set()
        return [Path(d) for d in sorted(found | {d for d in self.catalog.storage.values() if d})]

    async def load(self) -> None:
        """Read the index back from the meta directory, then choose the disk budget."""
        save_dirs = {backend: Path(d) for backend, d in self.catalog.storage.items() if d}
        loaded = await self.to_thread(load_index, self.meta_dir, self.default_directory, save_dirs)
        for entry in loaded.entries:
            self.index.put(entry)
        if loaded.skipped:  # one line, however many (an old format leaves many)
            log.warn(
                "skipped {n} unreadable cache metas (they will not be restored): {some}",
                n=len(loaded.skipped),
                some="; ".join(loaded.skipped[:3]) + ("; ..." if len(loaded.skipped) > 3 else ""),
            )
        if loaded.missing:
            log.warn("dropped {n} cache metas whose .bin is gone", n=len(loaded.missing))
        self.counters.stray_files = len(loaded.stray)
        if loaded.stray:
            log.warn(
                "{n} slot cache files have no meta (left alone): {names}",
                n=len(loaded.stray),
                names=", ".join(loaded.stray[:5]),
            )
        log.info("disk cache index: {n} entries, {mb:.1f} MB", n=len(self.index), mb=self.index.total_bytes / 1e6)
        await self._choose_budget()

    async def _choose_budget(self) -> None:
        configured = self.config.max_cache_bytes
        if configured is not None:
            self.catalog.max_bytes = configured
            return
        directories = self.directories()
        if not directories:
            log.info("disk budget: none (llama-server's save directory is not visible here: see --slot-save-path)")
            return
        free, total = await self.to_thread(_usage_of_all, self.disk_usage, directories)
        self.catalog.max_bytes = auto_budget(free, total, self.index.total_bytes)
        log.info(
            "disk budget: {gb:.2f} GB, chosen at start ({share:.0%} of the {free:.1f} GB free in {dir} "
            "and the caches already there; --max-cache-bytes sets it)",
            gb=self.catalog.max_bytes / 1e9,
            share=AUTO_SHARE,
            free=free / 1e9,
            dir=", ".join(map(str, directories)),
        )

    async def room_to_save(self, backend: str | None = None) -> bool:
        """Is there free space beyond the headroom where C{backend} writes?  Logged once when not."""
        directory = self.save_dir if backend is None else self.directory(backend)
        if directory is None:
            return True
        try:
            usage = await self.to_thread(_usage, self.disk_usage, directory)
        except OSError:
            return True  # cannot tell: llama-server's own reply will say
        if usage.free >= headroom(usage.total):
            self._low_space = False
            return True
        self.counters.saves_skipped_low_space += 1
        if not self._low_space:
            self._low_space = True
            log.warn(
                "not saving slot caches: {free:.1f} GB free in {dir}, under the {room:.1f} GB left to everything else",
                free=usage.free / 1e9,
                dir=directory,
                room=headroom(usage.total) / 1e9,
            )
        return False

    async def lock_key(self, key: str) -> DeferredLock:
        """Wait to be C{key}'s one writer (or reader of its file, which a save rewrites)."""
        lock = self._key_locks.setdefault(key, DeferredLock())
        await lock.acquire()
        return lock

    def unlock_key(self, key: str, lock: DeferredLock) -> None:
        lock.release()
        if not lock.locked and self._key_locks.get(key) is lock:
            del self._key_locks[key]

    async def record(self, entry: MetaEntry) -> bool:
        """A save's C{entry}, its C{.bin} written (C{entry.key}'s lock held): its meta on disk, then in the index."""
        try:
            await self.to_thread(write_meta, self.meta_dir, entry)
        except OSError as e:
            self.counters.save_failures += 1
            log.warn("writing cache meta {key} failed: {error}", key=entry.key, error=e)
            return False
        replaced = self.index.entries.get(entry.key)
        self.index.put(entry)
        if replaced is not None:
            # One conversation saved by a backend with other storage than its last writer's: the older file,
            # no longer indexed, would stay on disk outside the budget.
            before, now = self.directory(replaced.backend), self.directory(entry.backend)
            if before is not None and before != now:
                await self.to_thread(remove_entry_files, None, before, entry.key)
        return True

    def update(self, entry: MetaEntry, **changes: Any) -> None:
        """
        Change C{entry} in the index and, in the background, on disk; unless it
        is no longer the index's entry for its key (dropped, or replaced by a
        newer save), in which case changing it would undo that.
        """
        if self.index.entries.get(entry.key) is not entry:
            return
        changed = attrs.evolve(entry, **changes)
        self.index.put(changed)
        d = Deferred.fromCoroutine(self._write_current(changed))
        d.addErrback(lambda f: log.warn("writing cache meta {key} failed: {error}", key=entry.key, error=f.value))

    async def _write_current(self, entry: MetaEntry) -> None:
        lock = await self.lock_key(entry.key)
        try:
            # Checked after the wait: a drop or a newer save meanwhile wins.
            if self.index.entries.get(entry.key) is entry:
                await self.to_thread(write_meta, self.meta_dir, entry)
        finally:
            self.unlock_key(entry.key, lock)

    async def drop(self, entry: MetaEntry, keep_file: bool = False) -> None:
        """
        Forget C{entry} and delete its files (its meta only, with C{keep_file}),
        unless its key holds a newer entry by then.
        """
        if self.index.entries.get(entry.key) is not entry:
            return  # already dropped, or replaced by a newer save: that one stays
        self.index.remove(entry.key)
        lock = await self.lock_key(entry.key)
        try:
            if entry.key not in self.index.entries:  # a save of this key while we waited keeps its files
                directory = None if keep_file else self.directory(entry.backend)
                await self.to_thread(remove_entry_files, self.meta_dir, directory, entry.key)
        finally:
            self.unlock_key(entry.key, lock)

    async def remove_locked(self, key: str, backend: str) -> None:
        """Forget C{key}'s entry and delete its files (where C{backend} writes); the caller holds C{key}'s lock."""
        self.index.remove(key)
        await self.to_thread(remove_entry_files, self.meta_dir, self.directory(backend), key)

    async def enforce_budget(self) -> None:
        over_share = over_tenant_share(
            list(self.index.entries.values()), self.catalog.max_bytes, self.config.tenant_disk_share, self.pinned
        )
        for victim in over_share:
            self.counters.evicted_entries += 1
            log.info(
                "disk budget: dropping cache {key} ({mb:.1f} MB) of {tenant}, over its share",
                key=victim.key, mb=victim.bytes / 1e6, tenant=victim.tenant,
            )
            await self.drop(victim)
        victims = self.index.over_budget(
            self.catalog.max_bytes,
            self.config.max_cache_entries,
            self.pinned,
            frozenset(self.catalog.models.values()),
            self.config.max_pinned_share,
        )
        for victim in victims:
            self.counters.evicted_entries += 1
            log.info("disk budget: dropping cache {key} ({mb:.1f} MB)", key=victim.key, mb=victim.bytes / 1e6)
            await self.drop(victim)


def _existing(path: Path) -> Path:
    """C{path}, or its nearest existing parent."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _usage(disk_usage: Callable[[str], Any], path: Path) -> Any:
    """Blocking: the disk usage where C{path} is, or would be (its nearest existing parent)."""
    return disk_usage(str(_existing(path)))


def _usage_of_all(disk_usage: Callable[[str], Any], paths: list[Path]) -> tuple[int, int]:
    """Blocking: free and total bytes of the file systems C{paths} are on, each file system once."""
    free = total = 0
    seen = set()
    for path in paths:
        path = _existing(path)
        device = os.stat(path).st_dev
        if device in seen:
            continue
        seen.add(device)
        usage = disk_usage(str(path))
        free, total = free + usage.free, total + usage.total
    return free, total
