"""
The C{.meta} files behind the index.  Blocking: called from a thread.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

import attrs

from proxycache.cache._index import MetaEntry, bin_name

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


def remove_entry_files(meta_dir: Path, save_dir: Path | None, key: str) -> None:
    for path in [meta_dir / f"{key}.meta"] + ([save_dir / bin_name(key)] if save_dir else []):
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


def load_index(meta_dir: Path, save_dir: Path | None) -> Loaded:
    """Read every meta; reconcile with the save directory when it is visible."""
    entries, skipped, missing = [], [], []
    meta_dir.mkdir(parents=True, exist_ok=True)
    if meta_dir.is_dir():
        for path in sorted(meta_dir.glob("*.meta")):
            try:
                entry = _read_meta(path)
            except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:  # whatever is in the file
                skipped.append(f"{path.name}: {e}")
                continue
            if save_dir is not None and not (save_dir / entry.filename).exists():
                missing.append(entry.key)
                path.unlink(missing_ok=True)
                continue
            entries.append(entry)
        for leftover in meta_dir.glob(f".*{TEMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)  # a save killed half-way
    stray = []
    if save_dir is not None and save_dir.is_dir():
        known = {e.filename for e in entries}
        stray = sorted(p.name for p in save_dir.glob("slotcache_*.bin") if p.name not in known)
    return Loaded(entries, skipped, missing, stray)
