"""
The default disk budget: without one, a busy team fills the disk.  Pure code.
"""

from __future__ import annotations

GiB = 1024**3
AUTO_SHARE = 0.5  # of what the caches could use at start: free space plus what they hold already
AUTO_CAP = 200 * GiB  # however large the disk
HEADROOM_BYTES = 5 * GiB  # free space always left to everything else on the disk...
HEADROOM_SHARE = 0.10  # ...or this share of a small disk, whichever is less
MIN_AUTO_BUDGET = 1  # 0 means "unlimited": an automatic budget never is


def headroom(total: int) -> int:
    """Free bytes below which no cache is saved."""
    return min(HEADROOM_BYTES, int(total * HEADROOM_SHARE))


def auto_budget(free: int, total: int, cached: int) -> int:
    """
    The byte budget chosen at start: a share of the space the caches could
    use (free space plus C{cached}, the bytes they hold already), capped, and
    never eating into the headroom.
    """
    usable = free + cached
    budget = min(int(usable * AUTO_SHARE), AUTO_CAP, usable - headroom(total))
    return max(budget, MIN_AUTO_BUDGET)
