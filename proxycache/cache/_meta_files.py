"""
The C{.meta} files behind the index.  Blocking: called from a thread.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Mapping

import attrs

from proxycache.cache._entries import MetaEntry, bin_name

# A meta is a few KB of JSON (its block hashes): anything much larger, or not a
# regular file (a FIFO would block the reader forever), is not one of ours.
MAX_META_BYTES = 1024 * 1024
TEMP_SUFFIX = ".tmp"


def write_meta(directory: Path, entry: MetaEntry) -> None:
    """
    Atomically: a reader sees the old meta or the new one, never half of one.
    Each write has its own temporary name, so concurrent writers of one key
    cannot trip over each other's file; the last rename wins.
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{entry.key}.meta"
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{entry.key}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(entry.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, final)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(directory)  # the rename itself survives a power cut


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_entry_files(meta_dir: Path | None, save_dir: Path | None, key: str) -> None:
    """A key's meta (unless C{meta_dir} is None) and its file in C{save_dir} (if visible)."""
    for path in ([meta_dir / f"{key}.meta"] if meta_dir else []) + ([save_dir / bin_name(key)] if save_dir else []):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


@attrs.frozen
class Loaded:
    entries: list[MetaEntry]
    skipped: list[str]  # meta files that could not be read, with why
    missing: list[str]  # keys whose .bin is gone (dropped)
    stray: list[str]  # slotcache files with no meta


def _read_meta(path: Path) -> MetaEntry:
    """One meta file; raises ValueError for anything that is not a sane one."""
    info = path.lstat()  # not stat(): a symlink to a FIFO is no meta either
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("not a regular file")
    if info.st_size > MAX_META_BYTES:
        raise ValueError(f"{info.st_size} bytes, more than a meta can be")
    # O_NONBLOCK: should the file be swapped for a FIFO since lstat, open does not hang.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError("not a regular file")
        raw = f.read(MAX_META_BYTES + 1)
    if len(raw) > MAX_META_BYTES:
        raise ValueError(f"more than {MAX_META_BYTES} bytes")
    entry = MetaEntry.from_json(json.loads(raw.decode()))
    if path.stem != entry.key:
        raise ValueError(f"names key {entry.key}")
    return entry


def load_index(meta_dir: Path, save_dir: Path | None, save_dirs: Mapping[str, Path] | None = None) -> Loaded:
    """
    Read every meta; reconcile each with its backend's save directory
    (C{save_dirs}, by backend; C{save_dir} for the others) when it is visible.
    """
    save_dirs = save_dirs or {}
    entries, skipped, missing = [], [], []
    meta_dir.mkdir(parents=True, exist_ok=True)
    if meta_dir.is_dir():
        for path in sorted(meta_dir.glob("*.meta")):
            try:
                entry = _read_meta(path)
            except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:  # whatever is in the file
                skipped.append(f"{path.name}: {e}")
                continue
            where = save_dirs.get(entry.backend, save_dir)
            if where is not None and not (where / entry.filename).exists():
                missing.append(entry.key)
                path.unlink(missing_ok=True)
                continue
            entries.append(entry)
        for leftover in meta_dir.glob(f".*{TEMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)  # a save killed half-way
    known = {(str(save_dirs.get(e.backend, save_dir)), e.filename) for e in entries}
    stray = []
    for directory in sorted({str(d) for d in [save_dir, *save_dirs.values()] if d is not None}):
        if Path(directory).is_dir():
            stray += sorted(p.name for p in Path(directory).glob("slotcache_*.bin") if (directory, p.name) not in known)
    return Loaded(entries, skipped, missing, stray)
