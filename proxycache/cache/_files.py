"""
The C{.meta} files behind the index.  Blocking: called from a thread.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs

from proxycache.cache._index import MetaEntry, bin_name


def write_meta(directory: Path, entry: MetaEntry) -> None:
    """Atomically: a reader sees the old meta or the new one, never half of one."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{entry.key}.meta"
    temporary = directory / f".{entry.key}.meta.tmp"
    with open(temporary, "w") as f:
        json.dump(entry.to_json(), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, final)


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


def load_index(meta_dir: Path, save_dir: Path | None) -> Loaded:
    """Read every meta; reconcile with the save directory when it is visible."""
    entries, skipped, missing = [], [], []
    meta_dir.mkdir(parents=True, exist_ok=True)
    if meta_dir.is_dir():
        for path in sorted(meta_dir.glob("*.meta")):
            try:
                entry = MetaEntry.from_json(json.loads(path.read_text()))
                if path.stem != entry.key:
                    raise ValueError(f"names key {entry.key}")
            except (OSError, ValueError, KeyError, TypeError) as e:
                skipped.append(f"{path.name}: {e}")
                continue
            if save_dir is not None and not (save_dir / entry.filename).exists():
                missing.append(entry.key)
                path.unlink(missing_ok=True)
                continue
            entries.append(entry)
        for leftover in meta_dir.glob(".*.meta.tmp"):
            leftover.unlink(missing_ok=True)  # a save killed half-way
    stray = []
    if save_dir is not None and save_dir.is_dir():
        known = {e.filename for e in entries}
        stray = sorted(p.name for p in save_dir.glob("slotcache_*.bin") if p.name not in known)
    return Loaded(entries, skipped, missing, stray)
