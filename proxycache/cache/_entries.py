"""
The disk tier's entries (what each saved slot cache holds) and their index.

llama-server writes the KV file itself (C{slotcache_<key>.bin} under its
C{--slot-save-path}); the proxy keeps one small C{<key>.meta} descriptor per
file (L{proxycache.cache._meta_files}).  The index is pure bookkeeping: which
entry matches a request, which to evict, which a new save replaces.  No I/O here.
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterable, Iterator

import attrs

from proxycache.routing import Fingerprint

META_VERSION = 1
# An entry whose blocks are a prefix of this many others' holds a prefix many
# conversations fork from (a team's system prompt): the budget drops it last.
SHARED_PREFIX_SHARERS = 2
KEY_PATTERN = re.compile(r"\A[0-9a-f]{8,64}\Z")  # not "$": it also matches before a final "\n"


# Length classes are floor(log2(blocks)): far beyond any context.
_MAX_LENGTH_CLASS = 40


def _discard(index: dict, key: object, member: str) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(member)
        if not members:
            del index[key]


def entry_key(conversation: str, model: str, where: str) -> str:
    """
    A new entry's key: the conversation (its fingerprint's key), the model
    identity that computes it and where the file goes.  Two backends running
    other weights of one shape, sharing one save directory, write the same
    conversation under two names: neither file overwrites the other.
    """
    named = f"{conversation}\n{model}\n{where}".encode()
    return hashlib.blake2b(named, digest_size=8).hexdigest()


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
    tenant: str = ""  # whose conversation it holds (--isolate-tenants restores it for that tenant only)
    # The save directory it was written to, as this host sees it (None: not visible here,
    # or written before this was recorded): only a backend writing there can restore it.
    save_dir: str | None = None

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
            "tenant": self.tenant,
            "save_dir": self.save_dir,
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
            tenant=str(data.get("tenant") or ""),  # entries written before tenants were known: ""
            save_dir=data["save_dir"] if isinstance(data.get("save_dir"), str) else None,
        )


def _level(n: int) -> int:
    """floor(log2(n)) for n >= 1: the sparse positions an entry of n blocks is indexed at."""
    return n.bit_length() - 1


@attrs.define
class Index:
    """
    All known entries, in memory.  Read C{entries}; change it only through
    L{put} and L{remove}, which keep the lookup maps in step.

    Chained block hashes: C{blocks[i]} names the whole prefix of C{i + 1}
    blocks, so two fingerprints share C{c} leading blocks iff they agree at
    position C{c - 1}.  Each entry of C{m} blocks is indexed at the positions
    C{2**k - 1} (k = 0 .. log2 m), by (hash, length class of m), and by its
    last hash.  A lookup then looks at O(log) positions of the request and only
    at entries whose length can still pass the ratio, instead of every entry.
    """

    entries: dict[str, MetaEntry] = attrs.field(factory=dict)
    _at: dict[tuple[int, int], set[str]] = attrs.field(factory=dict, init=False, repr=False)
    _last: dict[int, set[str]] = attrs.field(factory=dict, init=False, repr=False)
    _bytes: int = attrs.field(default=0, init=False, repr=False)
    _tokens: int = attrs.field(default=0, init=False, repr=False)
    touched: int = attrs.field(default=0, init=False, repr=False)  # entries compared by lookups (for bench/)

    def __attrs_post_init__(self) -> None:
        entries, self.entries = self.entries, {}
        for entry in entries.values():
            self.put(entry)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[MetaEntry]:
        return iter(self.entries.values())

    @property
    def total_bytes(self) -> int:
        return self._bytes

    @property
    def total_tokens(self) -> int:
        return self._tokens

    def put(self, entry: MetaEntry) -> None:
        """Add C{entry}, replacing any entry under its key."""
        self.remove(entry.key)
        self.entries[entry.key] = entry
        self._bytes += entry.bytes
        self._tokens += entry.tokens
        for position, length_class in self._positions(entry):
            self._at.setdefault((entry.fingerprint.blocks[position], length_class), set()).add(entry.key)
        if entry.fingerprint.blocks:
            self._last.setdefault(entry.fingerprint.blocks[-1], set()).add(entry.key)

    def remove(self, key: str) -> MetaEntry | None:
        entry = self.entries.pop(key, None)
        if entry is None:
            return None
        self._bytes -= entry.bytes
        self._tokens -= entry.tokens
        for position, length_class in self._positions(entry):
            _discard(self._at, (entry.fingerprint.blocks[position], length_class), key)
        if entry.fingerprint.blocks:
            _discard(self._last, entry.fingerprint.blocks[-1], key)
        return entry

    @staticmethod
    def _positions(entry: MetaEntry) -> Iterator[tuple[int, int]]:
        m = len(entry.fingerprint.blocks)
        if m:
            length_class = _level(m)
            for k in range(length_class + 1):
                yield (1 << k) - 1, length_class

    def best(
        self, fp: Fingerprint, model: str, backends: Iterable[str], min_ratio: float, tenant: str | None = None
    ) -> tuple[MetaEntry, int, float] | None:
        """
        The restorable entry sharing the most leading blocks with C{fp}: (entry, common, ratio);
        only C{tenant}'s entries when given.
        """
        allowed = set(backends)
        n = len(fp.blocks)
        if not n or not self.entries or not allowed:
            return None
        ratio_floor = max(min_ratio, 1e-9)
        best: tuple[MetaEntry, int, float] | None = None
        seen: set[str] = set()
        for k in range(_level(n), -1, -1):
            # Entries found at level k share c >= 2**k blocks; those new here share c < 2**(k+1).
            # Shorter than the request, such an entry passes the ratio only if m <= c / ratio.
            longest_short = int(((1 << (k + 1)) - 1) / ratio_floor)
            classes = range(k, _level(max(longest_short, 1)) + 1)
            if (1 << (k + 1)) - 1 >= min_ratio * n:  # entries as long as the request can pass too
                classes = range(k, _MAX_LENGTH_CLASS + 1)
            position = fp.blocks[(1 << k) - 1]
            for length_class in classes:
                for key in self._at.get((position, length_class), ()):
                    if key in seen:
                        continue
                    seen.add(key)
                    entry = self.entries[key]
                    self.touched += 1
                    if entry.ineffective or entry.model != model or entry.backend not in allowed:
                        continue
                    if tenant is not None and entry.tenant != tenant:
                        continue
                    common = fp.common_blocks(entry.fingerprint)
                    ratio = common / min(n, len(entry.fingerprint.blocks))
                    if ratio >= min_ratio and (
                        best is None or (common, entry.last_used) > (best[1], best[0].last_used)
                    ):
                        best = (entry, common, ratio)
            if best is not None and best[1] >= 1 << k:
                break  # every entry not seen yet shares fewer blocks
        return best

    def predecessor(
        self, fp: Fingerprint, backend: str, model: str, lineage: str | None, save_dir: str | None = None
    ) -> MetaEntry | None:
        """
        The entry holding an earlier turn of the conversation C{fp} continues: a
        new save replaces it, under its key.  Only the entry the content came
        from (C{lineage}: restored from, or last saved as) and whose blocks are
        a prefix of C{fp}: another conversation's entry that merely shares a
        prefix (the same system prompt) is never replaced, nor one written by
        other weights or into another directory (C{save_dir}).
        """
        entry = self.entries.get(lineage) if lineage else None
        if entry is None or entry.backend != backend or entry.model != model or entry.save_dir != save_dir:
            return None
        n = len(entry.fingerprint.blocks)
        return entry if n and fp.common_blocks(entry.fingerprint) == n else None

    def is_shared_prefix(self, entry: MetaEntry, min_sharers: int = SHARED_PREFIX_SHARERS) -> bool:
        """Do at least C{min_sharers} other entries start with all of C{entry}'s blocks?"""
        n = len(entry.fingerprint.blocks)
        if not n:
            return False
        last = entry.fingerprint.blocks[-1]
        sharers = 0
        for other in self.entries.values():
            blocks = other.fingerprint.blocks
            # chained hashes: an equal hash at position n - 1 means the same first n blocks
            if other is not entry and len(blocks) >= n and blocks[n - 1] == last:
                sharers += 1
                if sharers >= min_sharers:
                    return True
        return False

    def over_budget(
        self,
        max_bytes: int,
        max_entries: int,
        pinned: frozenset[str],
        current_models: frozenset[str] = frozenset(),
        max_pinned_share: float = 0.5,
    ) -> list[MetaEntry]:
        """
        Entries to drop so the index fits its budget: first those no running
        backend can restore (another model or llama.cpp build, or an
        ineffective restore), then the least recently used; an entry holding a
        prefix of several others (a shared system prompt, what forks start from)
        goes only once no other will do.  Pinned entries are kept while they fit
        in C{max_pinned_share} of the budget, newest first; older pinned ones
        beyond that share are evicted like any other.
        """
        victims: list[MetaEntry] = []
        count, size = len(self.entries), self.total_bytes
        protected = self._protected_pins(max_bytes, max_entries, pinned, max_pinned_share)

        def retire_order(entry: MetaEntry) -> tuple[bool, float]:
            restorable = not entry.ineffective and (not current_models or entry.model in current_models)
            return restorable, entry.last_used

        def over() -> bool:
            return bool((max_entries and count > max_entries) or (max_bytes and size > max_bytes))

        # Shared prefixes are checked lazily, only for entries the budget reaches: O(entries) each.
        kept_shared: list[MetaEntry] = []
        for entry in sorted(self.entries.values(), key=retire_order):
            if not over():
                break
            if entry.key in protected:
                continue
            if retire_order(entry)[0] and self.is_shared_prefix(entry):
                kept_shared.append(entry)
                continue
            victims.append(entry)
            count, size = count - 1, size - entry.bytes
        for entry in kept_shared:
            if not over():
                break
            victims.append(entry)
            count, size = count - 1, size - entry.bytes
        return victims

    def _protected_pins(self, max_bytes: int, max_entries: int, pinned: frozenset[str], share: float) -> set[str]:
        """The pinned entries within their share of the budget, most recently used first."""
        protected: set[str] = set()
        count = size = 0
        pins = [e for e in self.entries.values() if e.pinned or e.key in pinned]
        for entry in sorted(pins, key=lambda e: e.last_used, reverse=True):
            count, size = count + 1, size + entry.bytes
            if (max_entries and count > share * max_entries) or (max_bytes and size > share * max_bytes):
                break
            protected.add(entry.key)
        return protected
