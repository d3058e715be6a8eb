"""
Each tenant's share of the disk budget (C{--tenant-disk-share}): one tenant's
thousands of saved branches cannot push out the rest of the team's caches.
Pure bookkeeping, no I/O.
"""

from __future__ import annotations

import collections
from typing import AbstractSet, Iterable

from proxycache.cache._entries import MetaEntry


def over_tenant_share(
    entries: Iterable[MetaEntry], max_bytes: int, share: float, pinned: AbstractSet[str] = frozenset()
) -> list[MetaEntry]:
    """
    Entries to drop so that no tenant holds more than C{share} of C{max_bytes}:
    each such tenant's least recently used first, pinned ones kept.  Entries of
    no known tenant (saved before tenants were recorded) are not counted.
    """
    if not max_bytes or not 0 < share < 1:
        return []
    limit = share * max_bytes
    by_tenant: dict[str, list[MetaEntry]] = collections.defaultdict(list)
    for entry in entries:
        if entry.tenant:
            by_tenant[entry.tenant].append(entry)
    victims = []
    for own in by_tenant.values():
        size = sum(entry.bytes for entry in own)
        for entry in sorted(own, key=lambda e: e.last_used):
            if size <= limit:
                break
            if entry.pinned or entry.key in pinned:
                continue
            victims.append(entry)
            size -= entry.bytes
    return victims
