"""
The disk tier's index: what each saved slot cache holds.

llama-server writes the KV file itself (C{slotcache_<key>.bin} under its
C{--slot-save-path}); the proxy keeps one small C{<key>.meta} descriptor per
file (L{proxycache.cache._files}).  The index is pure bookkeeping: which entry
matches a request, which to evict, which a new save replaces.  No I/O here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import attrs

from proxycache.routing import Fingerprint

META_VERSION = 1
# An entry whose blocks are a prefix of this many others' holds a prefix many
# conversations fork from (a team's system prompt): the budget drops it last.
SHARED_PREFIX_SHARERS = 2
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

    def predecessor(self, fp: Fingerprint, backend: str, model: str, lineage: str | None) -> MetaEntry | None:
        """
        The entry holding an earlier turn of the conversation C{fp} continues: a
        new save replaces it, under its key.  Only the entry the content came
        from (C{lineage}: restored from, or last saved as) and whose blocks are
        a prefix of C{fp}: another conversation's entry that merely shares a
        prefix (the same system prompt) is never replaced.
        """
        entry = self.entries.get(lineage) if lineage else None
        if entry is None or entry.backend != backend or entry.model != model:
            return None
        n = len(entry.fingerprint.blocks)
        return entry if n and fp.common_blocks(entry.fingerprint) == n else None

    def shared_prefixes(self, min_sharers: int = SHARED_PREFIX_SHARERS) -> set[str]:
        """Keys of entries whose blocks are a prefix of at least C{min_sharers} other entries'."""
        entries = list(self.entries.values())
        shared = set()
        for entry in entries:
            n = len(entry.fingerprint.blocks)
            sharers = sum(
                1 for other in entries
                if other is not entry and n and other.fingerprint.common_blocks(entry.fingerprint) == n
            )
            if sharers >= min_sharers:
                shared.add(entry.key)
        return shared

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
        ineffective restore), then the least recently used, entries holding a
        prefix of several others (L{shared_prefixes}) last.
        """
        victims: list[MetaEntry] = []
        count, size = len(self.entries), self.total_bytes
        shared = self.shared_prefixes()

        def retire_order(entry: MetaEntry) -> tuple[bool, bool, float]:
            restorable = not entry.ineffective and (not current_models or entry.model in current_models)
            return restorable, restorable and entry.key in shared, entry.last_used

        for entry in sorted(self.entries.values(), key=retire_order):
            if not ((max_entries and count > max_entries) or (max_bytes and size > max_bytes)):
                break
            if entry.pinned or entry.key in pinned:
                continue
            victims.append(entry)
            count, size = count - 1, size - entry.bytes
        return victims
