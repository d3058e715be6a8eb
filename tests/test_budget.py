"""
The default disk budget: the pure choice, and the tier using it (in process,
with a fake thread pool, disk usage and llama-server).
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any

from twisted.internet.defer import Deferred

from proxycache.backend import IdleSlot, Saved
from proxycache.cache._budget import AUTO_CAP, GiB, auto_budget, headroom
from proxycache.routing import Fingerprint, SlotId, SlotState
from proxycache.slots import Slot, SlotContent
from tests.test_tier_races import MODEL, make_tier

Usage = namedtuple("Usage", "total used free")


def test_auto_budget_is_half_the_usable_space_capped_and_leaves_headroom():
    assert auto_budget(free=100 * GiB, total=500 * GiB, cached=0) == 50 * GiB
    assert auto_budget(free=80 * GiB, total=500 * GiB, cached=20 * GiB) == 50 * GiB  # its own caches count
    assert auto_budget(free=10_000 * GiB, total=20_000 * GiB, cached=0) == AUTO_CAP
    # a nearly full disk: never into the headroom, and never 0 (which would mean unlimited)
    assert auto_budget(free=8 * GiB, total=500 * GiB, cached=0) == 3 * GiB
    assert auto_budget(free=1 * GiB, total=500 * GiB, cached=0) == 1
    # a small disk keeps 10% free rather than 5 GiB
    assert headroom(20 * GiB) == 2 * GiB and headroom(500 * GiB) == 5 * GiB
    assert auto_budget(free=10 * GiB, total=20 * GiB, cached=0) == 5 * GiB


class FakeLlama:
    name = url = "b"

    def __init__(self) -> None:
        self.actions: list[tuple[int, str, str | None]] = []

    async def wait_until_idle(self, index: int) -> IdleSlot:
        return IdleSlot(used=True, tokens=500)

    async def save_slot(self, index: int, filename: str, timeout: float) -> Saved:
        self.actions.append((index, "save", filename))
        return Saved(tokens=500, bytes=4096, ms=1.0)


def hot_slot() -> tuple[Slot, SlotContent]:
    content = SlotContent(SlotState.HOT, Fingerprint((7, 8, 9), 300, 48), tokens=500)
    return Slot(SlotId("b", 0), content=content), content


def test_the_tier_chooses_a_budget_at_start_and_saves_only_above_the_headroom(tmp_path):
    tier, threads = make_tier(tmp_path)
    free = [100 * GiB]
    tier.store.disk_usage = lambda path: Usage(500 * GiB, 0, free[0])
    llama = FakeLlama()
    tier.backends = {"b": llama}
    tier.catalog.backend_up("b", MODEL)
    tier.startService()
    threads.run_newest_first()
    assert tier.catalog.max_bytes == 50 * GiB

    slot, content = hot_slot()
    saved = Deferred.fromCoroutine(tier.save(slot, content))
    threads.run_newest_first()
    assert saved.result == content.fingerprint.key and len(llama.actions) == 1

    free[0] = 4 * GiB  # under the 5 GiB headroom: no save, however often asked
    for _ in range(2):
        skipped = Deferred.fromCoroutine(tier.save(slot, content))
        threads.run_newest_first()
        assert skipped.result is None
    assert len(llama.actions) == 1 and tier.counters.saves_skipped_low_space == 2
    assert tier.counters.save_failures == 0
