"""
The disk tier's index: one small C{<key>.meta} JSON file per saved slot cache.

llama-server writes the KV file itself (C{slotcache_<key>.bin} under its
C{--slot-save-path}); the proxy keeps only these descriptors.  The index is
pure bookkeeping (which entry matches a request, which to evict, which a new
save replaces); the file functions at the bottom are blocking and are called
from a thread.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import attrs
from twisted.logger import Logger

from proxycache.fingerprint import Fingerprint

log = Logger()

META_VERSION = 1
KEY_PATTERN = re.compile(r"\A[0-9a-f]{8,64}\Z")  # not "$": it also matches before a final "\n"


def bin_name(key: str) -> str:
    if not KEY_PATTERN.match(key):
        raise ValueError(f"not a cache key: {key!r}")
    return f"slotcache_{key}.bin"


@attrs.frozen
class MetaEntry:
    key: str
    backend: str
    model: str  # L{model_identity} of the llama-server that wrote it
    fingerprint: Fingerprint
    tokens: int
    bytes: int
    created: float
    last_used: float
    pinned: bool = False
    ineffective: bool = False  # a restore of it did not take: never restore it again

    @property
    def filename(self) -> str:
        return bin_name(self.key)

    def to_json(self) -> dict:
        return {
            "version": META_VERSION,
            "key": self.key,
            "backend": self.backend,
            "model": self.model,
            "blocks": self.fingerprint.to_hex(),
            "chars": self.fingerprint.chars,
            "words": self.fingerprint.words,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "created": self.created,
            "last_used": self.last_used,
            "pinned": self.pinned,
            "ineffective": self.ineffective,
        }

    @classmethod
    def from_json(cls, data: dict) -> "MetaEntry":
        if not isinstance(data, dict):
            raise ValueError(f"meta is a JSON {type(data).__name__}, not an object")
        if data.get("version") != META_VERSION:
            raise ValueError(f"meta format version {data.get('version')!r}, expected {META_VERSION}")
        key = data["key"]
        if not isinstance(key, str) or not KEY_PATTERN.match(key):
            raise ValueError(f"bad key {key!r}")
        return cls(
            key=key,
            backend=str(data["backend"]),
            model=str(data["model"]),
            fingerprint=Fingerprint.from_hex(data["blocks"], int(data["chars"]), int(data["words"])),
            tokens=int(data["tokens"]),
            bytes=int(data["bytes"]),
            created=float(data["created"]),
            last_used=float(data["last_used"]),
            pinned=data.get("pinned") is True,
            ineffective=data.get("ineffective") is True,
        )


def model_identity(props: dict, models: dict | None) -> str:
    """
    What must match for a saved KV file to be restorable: the weights' shape and
    file, and the llama.cpp build (its KV file format can change between builds).
    """
    meta = {}
    if isinstance(models, dict):
        for model in models.get("data") or []:
            if isinstance(model, dict) and isinstance(model.get("meta"), dict):
                meta = model["meta"]
                break
    facts = {
        "model_path": os.path.basename(str(props.get("model_path", ""))),
        "build_info": props.get("build_info"),
        "meta": {k: meta.get(k) for k in ("vocab_type", "n_vocab", "n_ctx_train", "n_embd", "n_params", "size")},
    }
    import hashlib

    return hashlib.blake2b(json.dumps(facts, sort_keys=True).encode(), digest_size=8).hexdigest()


@attrs.define
class Index:
    """All known entries, in memory."""

    entries: dict[str, MetaEntry] = attrs.field(factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[MetaEntry]:
        return iter(self.entries.values())

    @property
    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.entries.values())

    def best(
        self, fp: Fingerprint, model: str, backends: Iterable[str], min_ratio: float
    ) -> tuple[MetaEntry, int, float] | None:
        """The restorable entry sharing the most leading blocks with C{fp}: (entry, common, ratio)."""
        allowed = set(backends)
        best = None
        for entry in self.entries.values():
            if entry.ineffective or entry.model != model or entry.backend not in allowed:
                continue
            common = fp.common_blocks(entry.fingerprint)
            if common == 0:
                continue
            ratio = common / min(len(fp.blocks), len(entry.fingerprint.blocks))
            if ratio >= min_ratio and (best is None or (common, entry.last_used) > (best[1], best[0].last_used)):
                best = (entry, common, ratio)
        return best

    def predecessor(self, fp: Fingerprint, backend: str, model: str) -> MetaEntry | None:
        """
        An entry that holds an earlier turn of the conversation C{fp} continues
        (its blocks are a prefix of C{fp}): a new save replaces it, under its key.
        """
        found = None
        for entry in self.entries.values():
            if entry.backend != backend or entry.model != model:
                continue
            n = len(entry.fingerprint.blocks)
            if n and fp.common_blocks(entry.fingerprint) == n and (found is None or n > len(found.fingerprint.blocks)):
                found = entry
        return found

    def over_budget(
        self,
        max_bytes: int,
        max_entries: int,
        pinned: frozenset[str],
        current_models: frozenset[str] = frozenset(),
    ) -> list[MetaEntry]:
        """
        Unpinned entries to drop so the index fits its budget: first those no
        running backend can restore (another model or llama.cpp build, or an
        ineffective restore), then the least recently used.
        """
        victims: list[MetaEntry] = []
        count, size = len(self.entries), self.total_bytes

        def retire_order(entry: MetaEntry) -> tuple[bool, float]:
            restorable = not entry.ineffective and (not current_models or entry.model in current_models)
            return restorable, entry.last_used

        for entry in sorted(self.entries.values(), key=retire_order):
            if not ((max_entries and count > max_entries) or (max_bytes and size > max_bytes)):
                break
            if entry.pinned or entry.key in pinned:
                continue
            victims.append(entry)
            count, size = count - 1, size - entry.bytes
        return victims


# -- blocking file work (run in a thread) ------------------------------------


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
