"""
Saved caches llama.cpp will never restore, told apart from refusals that may
go away, and dropped: otherwise each return of the conversation (each branch
off a shared prefix) plans a restore, pays a round trip and recomputes anyway.

Seen on b11434 (binary) and b11549 (xllamacpp): a restore of a missing file,
an empty one, one of garbage bytes, one another model's shape wrote, and most
truncated ones all answer the same 400 "Unable to restore slot: No available
space in KV cache or invalid slot save file"; the same words as a restore
that finds no room, which may go away (a unified KV cache full of the other
slots).  And some truncated files abort llama-server on both
(C{GGML_ASSERT(nread <= state_size)} in C{llama_state_seq_load_file}): a file
of another size than saved must not reach it at all.  So where this host sees
the save directory, the file is looked at before a restore (gone, another
size) and after a refusal (also: not starting with llama.cpp's sequence-state
magic).  A file that looks whole (or cannot be seen) and is refused twice in a
row by the backend that wrote it is dropped too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Callable

import attrs
from twisted.internet.defer import Deferred

from proxycache.backend import FailureKind, SlotActionFailed
from proxycache.cache._entries import MetaEntry
from proxycache.cache._saved_caches import SavedCaches
from proxycache.cache._tier_state import Counters

# llama.cpp's LLAMA_STATE_SEQ_MAGIC ('ggsq', written as a little-endian uint32) opens every slot file.
SLOT_FILE_MAGIC = b"qsgg"
# Refusals about the file (or the room for it), not about the server: 501, 5xx, timeouts may go away.
_FILE_REFUSALS = (FailureKind.REJECTED, FailureKind.MISSING_FILE)


@attrs.frozen
class Fault:
    why: str
    remove: bool = True  # the file is no one's: removed with the entry (a longer one may be another writer's)


GONE = Fault("its file is gone", remove=False)


def file_fault(path: Path, saved_bytes: int, read_head: bool = True) -> Fault | None:
    """
    Blocking (run in a thread): why the file at C{path} cannot be the one
    saved there (C{saved_bytes} long; 0: not known), or None when it may be
    (or this host cannot tell).  C{read_head}: also look at its first bytes.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        return GONE
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return Fault("its file is not a regular file", remove=False)
    if saved_bytes and info.st_size < saved_bytes:
        return Fault(f"its file has {info.st_size} bytes, {saved_bytes} were saved (cut short)")
    if saved_bytes and info.st_size > saved_bytes:
        return Fault(f"its file has {info.st_size} bytes, {saved_bytes} were saved (written over)", remove=False)
    if not read_head:
        return None
    try:
        # O_NONBLOCK: a FIFO swapped in meanwhile does not hang the thread.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            head = f.read(len(SLOT_FILE_MAGIC))
    except OSError:
        return None
    if head != SLOT_FILE_MAGIC:
        return Fault("its file is not a llama.cpp slot file (damaged)")
    return None


class UnusableFiles:
    """Judges a restore's file before and after llama.cpp tries it; drops the entries it never will restore."""

    def __init__(self, store: SavedCaches, counters: Counters, to_thread: Callable[..., Deferred[Any]]) -> None:
        self.store = store
        self.counters = counters
        self.to_thread = to_thread
        self._refused: dict[str, MetaEntry] = {}  # by key: the entry its own backend refused once, intact

    async def before(self, entry: MetaEntry) -> Fault | None:
        """
        Before a restore (C{entry}'s key lock held): is its file gone, or of
        another size than saved, where this host sees it?  One stat off the
        reactor spares llama.cpp a round trip (a failed restore also clears
        the slot) or an abort; the caller then L{drop}s it.
        """
        return await self._fault(entry, read_head=False)

    async def refused(self, entry: MetaEntry, backend: str, failure: Exception) -> str | None:
        """
        A restore of C{entry} into C{backend} failed with C{failure} (the key
        lock released): why the entry is dropped now, or None when it is kept
        (a failure that may go away, or another backend's storage).
        """
        if not isinstance(failure, SlotActionFailed) or failure.kind not in _FILE_REFUSALS:
            return None
        fault = await self._fault(entry)
        if fault is None and backend == entry.backend:  # elsewhere, the storage may just not be shared
            if failure.kind is FailureKind.MISSING_FILE:
                fault = Fault("llama.cpp says its file is not there")
            elif self._refused.get(entry.key) is entry:
                fault = Fault("refused twice in a row by the backend that wrote it (another shape, or no room)")
            else:
                self._refused[entry.key] = entry
        if fault is None:
            return None
        await self.drop(entry, fault)
        return fault.why

    def restored(self, entry: MetaEntry) -> None:
        self._refused.pop(entry.key, None)

    async def _fault(self, entry: MetaEntry, read_head: bool = True) -> Fault | None:
        directory = self.store.directory(entry.backend)
        if directory is None:
            return None
        try:
            return await self.to_thread(file_fault, directory / entry.filename, entry.bytes, read_head)
        except Exception:  # noqa: BLE001 - cannot tell: llama.cpp's answer decides
            return None

    async def drop(self, entry: MetaEntry, fault: Fault) -> None:
        """Forget C{entry} (its key lock not held), its file too if C{fault} says; unless a newer save replaced it."""
        self._refused.pop(entry.key, None)
        if self.store.index.entries.get(entry.key) is not entry:
            return  # dropped already, or replaced by a newer save: that one is judged on its own
        self.counters.dropped_unusable += 1
        await self.store.drop(entry, keep_file=not fault.remove)
