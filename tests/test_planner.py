"""
Pure tests of L{proxycache.routing}: one test per rule of the module docstring
(slot states, transitions, choice order), then hypothesis properties.

Fingerprints are built by hand.  Real block hashes are chained, so once two
fingerprints differ at block i they differ at every later block too (and
L{Fingerprint.common_blocks} relies on it: it binary-searches).  The helpers
keep that: a fingerprint is a prefix of one shared "conversation" followed by a
tail of blocks unique to it.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxycache.routing import Fingerprint
from proxycache.routing import (
    EMPTY,
    Decision,
    DiskMatch,
    Plan,
    Request,
    SlotId,
    SlotState,
    SlotView,
    best_match,
    is_small,
    plan,
    state_after,
    target_slot,
)

FREE, COLD, HOT = SlotState.FREE, SlotState.COLD, SlotState.HOT
_tags = itertools.count(1)


def fp(shared: int, total: int | None = None, *, tag: int | None = None, base: int = 0) -> Fingerprint:
    """
    C{shared} blocks of conversation C{base}, then C{total - shared} blocks
    nobody else has.  Two fingerprints of one base share min(shared) blocks.
    """
    total = shared if total is None else total
    assert total >= shared
    tag = next(_tags) if tag is None else tag
    blocks = tuple(base * 10**6 + i for i in range(shared))
    blocks += tuple(10**12 + tag * 10**6 + i for i in range(shared, total))
    return Fingerprint(blocks=blocks, chars=total * 100, words=total * 16)


def slot(index: int, state: SlotState = FREE, fingerprint: Fingerprint = EMPTY, *,
         last_used: float = 0.0, busy: bool = False, backend: str = "a") -> SlotView:
    return SlotView(SlotId(backend, index), state, fingerprint, last_used, busy)


def large(fingerprint: Fingerprint) -> Request:
    return Request(fingerprint, small=False)


def small(fingerprint: Fingerprint) -> Request:
    return Request(fingerprint, small=True)


def test_helper_fingerprints_are_chained():
    a, b = fp(5, 9), fp(7, 8)
    assert a.common_blocks(b) == 5 == b.common_blocks(a)
    assert fp(3).common_blocks(fp(10)) == 3
    assert fp(0, 4).common_blocks(fp(0, 4)) == 0
    assert fp(4, base=1).common_blocks(fp(4, base=2)) == 0
    # once they differ they differ everywhere after
    assert all(x != y for x, y in zip(a.blocks[5:], b.blocks[5:]))


# -- is_small / state_after ---------------------------------------------------


@pytest.mark.parametrize(
    "chars, words, blocks, expected",
    [
        (2000, 300, 16, False),  # exactly at every threshold: not small
        (1999, 300, 16, True),
        (2000, 299, 16, True),
        (2000, 300, 15, True),
        (10**6, 10**5, 10**3, False),
        (0, 0, 0, True),
    ],
)
def test_is_small_below_any_threshold(chars, words, blocks, expected):
    f = Fingerprint(blocks=tuple(range(blocks)), chars=chars, words=words)
    assert is_small(f, 2000, 300, 16) is expected


def test_is_small_zero_thresholds_never_small():
    assert not is_small(EMPTY, 0, 0, 0)


def test_transition_large_served_becomes_hot():
    assert state_after(small=False, succeeded=True) is HOT


def test_transition_small_served_becomes_cold():
    assert state_after(small=True, succeeded=True) is COLD


@pytest.mark.parametrize("is_small_request", [True, False])
def test_transition_failure_becomes_cold(is_small_request):
    assert state_after(small=is_small_request, succeeded=False) is COLD


# -- step 1: the best cached prefix -------------------------------------------


def test_longest_prefix_wins_2_blocks_never_beat_99():
    request = large(fp(100, 120))
    slots = [
        slot(0, HOT, fp(2, 3), last_used=50.0),  # more recent, but only 2 blocks shared
        slot(1, HOT, fp(99, 99), last_used=1.0),
        slot(2, FREE),
    ]
    p = plan(request, slots, min_ratio=0.0)
    assert p == Plan(Decision.HIT, SlotId("a", 1), 99, 1.0)
    assert best_match(request, slots, 0.0)[0].id == SlotId("a", 1)


def test_hit_on_cold_slot_for_a_large_request():
    request = large(fp(10, 12))
    p = plan(request, [slot(0, COLD, fp(10, 10)), slot(1, FREE)], min_ratio=0.5)
    assert p.decision is Decision.HIT and p.slot == SlotId("a", 0) and p.common_blocks == 10
    assert not p.evicts


def test_ratio_threshold_respected():
    # 4 shared blocks of a 10-block request against a 10-block slot: ratio 0.4
    request = large(fp(4, 10))
    slots = [slot(0, HOT, fp(4, 10)), slot(1, FREE)]
    assert best_match(request, slots, 0.4) == (slots[0], 4, 0.4)
    assert plan(request, slots, min_ratio=0.4).decision is Decision.HIT
    assert best_match(request, slots, 0.41) is None
    p = plan(request, slots, min_ratio=0.41)
    assert p.decision is Decision.MISS and p.slot == SlotId("a", 1)


def test_ratio_is_against_the_shorter_fingerprint():
    # the cached prompt is an earlier, shorter turn: all of it is reused
    request = large(fp(10, 100))
    slots = [slot(0, HOT, fp(10, 10))]
    assert best_match(request, slots, 1.0) == (slots[0], 10, 1.0)


def test_no_common_block_is_no_match_even_at_ratio_zero():
    request = large(fp(5, 5, base=1))
    slots = [slot(0, HOT, fp(5, 5, base=2))]
    assert best_match(request, slots, 0.0) is None
    assert plan(request, slots, min_ratio=0.0).decision is Decision.MISS


def test_free_slot_is_never_a_match():
    # a FREE slot's fingerprint (if any lingered) is not trusted
    request = large(fp(10))
    slots = [slot(0, FREE, fp(10)), slot(1, COLD, EMPTY, last_used=3.0)]
    assert best_match(request, slots, 0.0) is None


def test_small_request_only_matches_cold_slots():
    request = small(fp(10, 11))
    hot = slot(0, HOT, fp(10, 10))
    cold = slot(1, COLD, fp(3, 4))
    assert best_match(request, [hot, cold], 0.0) == (cold, 3, 0.75)
    p = plan(request, [hot, cold], min_ratio=0.0)
    assert p == Plan(Decision.HIT, cold.id, 3, 0.75)
    assert best_match(request, [hot], 0.0) is None


def test_idle_wins_ties_over_busy_then_most_recent():
    request = large(fp(8, 9))
    busy = slot(0, HOT, fp(8, 10), last_used=9.0, busy=True)
    old = slot(1, HOT, fp(8, 11), last_used=1.0)
    recent = slot(2, HOT, fp(8, 12), last_used=2.0)
    assert best_match(request, [busy, old, recent], 0.0)[0] is recent
    assert plan(request, [busy, old, recent], min_ratio=0.0).slot == recent.id


def test_wait_when_best_match_busy_and_affinity_on():
    request = large(fp(20, 22))
    slots = [
        slot(0, HOT, fp(20, 20), busy=True),
        slot(1, HOT, fp(5, 6)),  # idle, shorter match
        slot(2, FREE),
    ]
    p = plan(request, slots, min_ratio=0.0, affinity=True)
    assert p == Plan(Decision.WAIT, SlotId("a", 0), 20, 1.0)


def test_no_wait_when_affinity_off_takes_best_idle_match():
    request = large(fp(20, 22))
    slots = [
        slot(0, HOT, fp(20, 20), busy=True),
        slot(1, HOT, fp(5, 6)),
        slot(2, FREE),
    ]
    p = plan(request, slots, min_ratio=0.0, affinity=False)
    assert p.decision is Decision.HIT and p.slot == SlotId("a", 1) and p.common_blocks == 5


def test_no_wait_when_affinity_off_and_no_idle_match_goes_elsewhere():
    request = large(fp(20, 22))
    slots = [slot(0, HOT, fp(20, 20), busy=True), slot(1, HOT, fp(5, base=7)), slot(2, FREE)]
    p = plan(request, slots, min_ratio=0.0, affinity=False)
    assert p.decision is Decision.MISS and p.slot == SlotId("a", 2)


def test_no_wait_when_affinity_off_and_nothing_idle():
    request = large(fp(20, 22))
    assert plan(request, [slot(0, HOT, fp(20), busy=True)], min_ratio=0.0, affinity=False) is None


def test_small_request_never_waits_for_its_busy_cold_slot():
    # waiting pays for a large prefix only: a small one is cheaper to recompute
    request = small(fp(4, 5))
    slots = [slot(0, COLD, fp(4, 4), busy=True), slot(1, FREE)]
    assert plan(request, slots, min_ratio=0.0) == Plan(Decision.SMALL, SlotId("a", 1))
    assert plan(request, slots, min_ratio=0.0, affinity=False) == Plan(Decision.SMALL, SlotId("a", 1))
    # it takes the best idle COLD match instead
    slots.append(slot(2, COLD, fp(2, 3)))
    assert plan(request, slots, min_ratio=0.0) == Plan(Decision.HIT, SlotId("a", 2), 2, 2 / 3)
    # nothing idle: None (it queues), not a WAIT plan
    assert plan(request, [slot(0, COLD, fp(4, 4), busy=True)], min_ratio=0.0) is None


# -- step 2: disk --------------------------------------------------------------


def test_disk_longer_than_any_slot_restores_onto_its_backend():
    request = large(fp(50, 55))
    disk = DiskMatch("deadbeef", "b", 40, 1.0)
    slots = [
        slot(0, HOT, fp(10, 10), backend="a"),  # idle match, but shorter than disk
        slot(1, FREE, backend="a"),
        slot(0, HOT, fp(3, base=9), last_used=5.0, backend="b"),
        slot(1, COLD, fp(2, base=8), last_used=7.0, backend="b"),
    ]
    p = plan(request, slots, min_ratio=0.0, disk=disk)
    assert p.decision is Decision.RESTORE
    assert p.slot == SlotId("b", 1)  # the disk entry's backend, cold before hot
    assert p.restore == disk and p.common_blocks == 40 and p.similarity == 1.0
    assert not p.evicts


def test_restore_evicts_a_hot_slot_when_only_hot_idle_on_that_backend():
    request = large(fp(50, 55))
    disk = DiskMatch("deadbeef", "a", 40, 1.0)
    slots = [slot(0, HOT, fp(3, base=9), last_used=2.0), slot(1, HOT, fp(3, base=8), last_used=1.0)]
    p = plan(request, slots, min_ratio=0.0, disk=disk)
    assert p.decision is Decision.RESTORE and p.slot == SlotId("a", 1) and p.evicts


def test_disk_not_longer_than_slot_match_is_a_hit():
    request = large(fp(50, 55))
    slots = [slot(0, HOT, fp(40, 41)), slot(1, FREE)]
    p = plan(request, slots, min_ratio=0.0, disk=DiskMatch("deadbeef", "a", 40, 1.0))
    assert p.decision is Decision.HIT and p.slot == SlotId("a", 0)


def test_disk_longer_than_busy_match_restores_instead_of_waiting():
    request = large(fp(50, 55))
    slots = [slot(0, HOT, fp(20, 21), busy=True), slot(1, FREE)]
    p = plan(request, slots, min_ratio=0.0, disk=DiskMatch("deadbeef", "a", 40, 1.0))
    assert p.decision is Decision.RESTORE and p.slot == SlotId("a", 1)


def test_disk_without_any_slot_match_restores():
    request = large(fp(50, 55))
    p = plan(request, [slot(0, FREE)], min_ratio=0.0, disk=DiskMatch("deadbeef", "a", 1, 0.9))
    assert p.decision is Decision.RESTORE and p.common_blocks == 1


def test_disk_backend_with_nothing_idle_waits_then_falls_back_to_a_miss():
    request = large(fp(50, 55))
    slots = [slot(0, FREE, backend="a"), slot(0, HOT, fp(3), busy=True, backend="b")]
    disk = DiskMatch("deadbeef", "b", 40, 1.0)
    # the restore cannot happen yet: wait for the busy slot of that backend ...
    waiting = plan(request, slots, min_ratio=0.0, disk=disk)
    assert waiting.decision is Decision.WAIT and waiting.slot == SlotId("b", 0)
    # ... until affinity runs out: then compute from scratch on the free slot
    p = plan(request, slots, min_ratio=0.0, disk=disk, affinity=False)
    assert p.decision is Decision.MISS and p.slot == SlotId("a", 0) and p.restore is None


def test_small_request_never_restores():
    request = small(fp(50, 55))
    p = plan(request, [slot(0, FREE)], min_ratio=0.0, disk=DiskMatch("deadbeef", "a", 40, 1.0))
    assert p.decision is Decision.SMALL and p.restore is None


def test_disk_unrestorable_keeps_the_idle_slot_hit():
    request = large(fp(50, 55))
    slots = [
        slot(0, HOT, fp(10, 10), backend="a"),  # idle, 10 blocks reusable
        slot(1, FREE, backend="a"),
        slot(0, HOT, fp(3, base=9), busy=True, backend="b"),  # the disk's backend: all busy
    ]
    p = plan(request, slots, min_ratio=0.0, disk=DiskMatch("deadbeef", "b", 40, 1.0))
    assert p.decision is Decision.HIT and p.slot == SlotId("a", 0) and p.common_blocks == 10


def test_affinity_over_disk_beats_the_idle_match_restores():
    request = large(fp(50, 55))
    slots = [
        slot(0, HOT, fp(45, 46), busy=True),  # best, but busy and affinity is over
        slot(1, HOT, fp(5, 6)),  # idle, 5 blocks
        slot(2, FREE),
    ]
    p = plan(request, slots, min_ratio=0.0, affinity=False, disk=DiskMatch("deadbeef", "a", 40, 1.0))
    assert p.decision is Decision.RESTORE and p.common_blocks == 40


# -- step 3: where a request without a usable prefix goes ---------------------


def test_free_preferred_over_cold_and_hot():
    slots = [
        slot(0, HOT, fp(3), last_used=0.0),
        slot(1, COLD, fp(3), last_used=0.0),
        slot(2, FREE, last_used=99.0),
    ]
    assert target_slot(slots).id == SlotId("a", 2)
    p = plan(large(fp(5, base=1)), slots, min_ratio=0.0)
    assert p == Plan(Decision.MISS, SlotId("a", 2))


def test_lru_among_cold():
    slots = [slot(0, COLD, last_used=5.0), slot(1, COLD, last_used=2.0), slot(2, COLD, last_used=3.0),
             slot(3, HOT, fp(2, base=4), last_used=0.0)]
    assert target_slot(slots).id == SlotId("a", 1)
    p = plan(large(fp(5, base=1)), slots, min_ratio=0.0)
    assert p.decision is Decision.MISS and p.slot == SlotId("a", 1) and not p.evicts


def test_lru_among_hot_evicts():
    slots = [slot(0, HOT, fp(2, base=3), last_used=5.0), slot(1, HOT, fp(2, base=4), last_used=2.0)]
    assert target_slot(slots).id == SlotId("a", 1)
    p = plan(large(fp(5, base=1)), slots, min_ratio=0.0)
    assert p.decision is Decision.MISS and p.slot == SlotId("a", 1) and p.evicts


def test_lru_ties_broken_by_slot_id():
    slots = [slot(2, COLD), slot(0, COLD), slot(1, COLD)]
    assert target_slot(slots).id == SlotId("a", 0)


def test_target_slot_of_nothing_is_none():
    assert target_slot([]) is None


def test_small_request_takes_free_over_cold_over_hot():
    request = small(fp(3, base=1))
    hot = slot(0, HOT, fp(20, base=2), last_used=0.0)
    cold = slot(1, COLD, fp(2, base=3), last_used=9.0)
    free = slot(2, FREE, last_used=99.0)
    assert plan(request, [hot, cold, free], min_ratio=0.0) == Plan(Decision.SMALL, free.id)
    assert plan(request, [hot, cold], min_ratio=0.0) == Plan(Decision.SMALL, cold.id)


def test_small_request_never_takes_hot_while_cold_idle_even_with_a_hot_match():
    request = small(fp(10, 11))
    hot = slot(0, HOT, fp(10), last_used=0.0)  # shares 10 blocks, but it is hot
    cold = slot(1, COLD, fp(1, base=5), last_used=9.0)
    p = plan(request, [hot, cold], min_ratio=0.0)
    assert p == Plan(Decision.SMALL, cold.id)


def test_small_request_takes_lru_hot_only_when_all_idle_are_hot():
    request = small(fp(3, base=1))
    slots = [
        slot(0, HOT, fp(20, base=2), last_used=4.0),
        slot(1, HOT, fp(20, base=3), last_used=1.0),
        slot(2, COLD, busy=True),  # busy: does not count
        slot(3, FREE, busy=True),
    ]
    p = plan(request, slots, min_ratio=0.0)
    assert p == Plan(Decision.SMALL, SlotId("a", 1), evicts=True)


# -- step 4: nothing idle ------------------------------------------------------


@pytest.mark.parametrize("is_small_request", [True, False])
def test_none_when_nothing_idle(is_small_request):
    request = Request(fp(5, base=1), is_small_request)
    slots = [slot(0, HOT, fp(3, base=2), busy=True), slot(1, COLD, busy=True), slot(2, FREE, busy=True)]
    assert plan(request, slots, min_ratio=0.0) is None
    assert plan(request, slots, min_ratio=0.0, disk=DiskMatch("deadbeef", "a", 4, 1.0)) is None
    assert plan(request, [], min_ratio=0.0) is None


# -- properties ------------------------------------------------------------------

# A fingerprint is (shared, extra): `shared` blocks of conversation 0, then `extra`
# blocks of its own.  Two of them share exactly min(shared) blocks.

fingerprints = st.tuples(st.integers(0, 12), st.integers(0, 4))
states = st.sampled_from([FREE, COLD, HOT])


@st.composite
def scenarios(draw):
    n = draw(st.integers(0, 6))
    slots = []
    for index in range(n):
        state = draw(states)
        shared, extra = draw(fingerprints) if state is not FREE else (0, 0)
        slots.append(slot(
            index,
            state,
            fp(shared, shared + extra) if shared + extra else EMPTY,
            last_used=float(draw(st.integers(0, 5))),
            busy=draw(st.booleans()),
            backend=draw(st.sampled_from(["a", "b"])),
        ))
    shared, extra = draw(fingerprints)
    request = Request(fp(shared, shared + extra), draw(st.booleans()))
    disk = None
    if draw(st.booleans()):
        common = draw(st.integers(1, 14))
        disk = DiskMatch("deadbeef", draw(st.sampled_from(["a", "b"])), common, 1.0)
    min_ratio = draw(st.sampled_from([0.0, 0.3, 0.5, 0.85, 1.0]))
    return request, slots, disk, min_ratio, draw(st.booleans())


def passing(request: Request, s: SlotView, min_ratio: float) -> int:
    """Common blocks if C{s} is a candidate for C{request}, else 0 (computed without the planner)."""
    if s.state is FREE or (request.small and s.state is HOT):
        return 0
    a, b = request.fingerprint.blocks, s.fingerprint.blocks
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    if common == 0 or common / min(len(a), len(b)) < min_ratio:
        return 0
    return common


SETTINGS = settings(max_examples=150, deadline=None)


@SETTINGS
@given(scenarios())
def test_property_never_a_busy_slot_except_wait(scenario):
    request, slots, disk, min_ratio, affinity = scenario
    p = plan(request, slots, min_ratio=min_ratio, affinity=affinity, disk=disk)
    by_id = {s.id: s for s in slots}
    idle = [s for s in slots if not s.busy]
    if p is None:
        assert not idle
        return
    chosen = by_id[p.slot]
    if p.decision is Decision.WAIT:
        assert chosen.busy and affinity and not request.small
        assert passing(request, chosen, min_ratio) == p.common_blocks > 0
    else:
        assert not chosen.busy


@SETTINGS
@given(scenarios())
def test_property_small_never_hot_while_free_or_cold_idle(scenario):
    request, slots, disk, min_ratio, affinity = scenario
    request = Request(request.fingerprint, small=True)
    p = plan(request, slots, min_ratio=min_ratio, affinity=affinity, disk=disk)
    if p is None:
        return
    assert p.decision in (Decision.HIT, Decision.SMALL)  # a small request never waits
    assert p.restore is None
    chosen = {s.id: s for s in slots}[p.slot]
    if chosen.state is HOT:
        assert p.decision is Decision.SMALL and p.evicts
        assert all(s.state is HOT for s in slots if not s.busy)
    else:
        assert not p.evicts


@SETTINGS
@given(scenarios())
def test_property_hit_has_the_maximal_common_prefix(scenario):
    request, slots, disk, min_ratio, affinity = scenario
    p = plan(request, slots, min_ratio=min_ratio, affinity=affinity, disk=disk)
    if p is None or p.decision is not Decision.HIT:
        return
    chosen = {s.id: s for s in slots}[p.slot]
    assert p.common_blocks == passing(request, chosen, min_ratio) > 0
    assert p.common_blocks == request.fingerprint.common_blocks(chosen.fingerprint)
    assert p.similarity >= min_ratio
    # no idle candidate shares more; with affinity (large requests only), no busy one either
    for s in slots:
        if not s.busy or (affinity and not request.small):
            assert passing(request, s, min_ratio) <= p.common_blocks


@SETTINGS
@given(scenarios())
def test_property_evicts_iff_target_was_hot(scenario):
    request, slots, disk, min_ratio, affinity = scenario
    p = plan(request, slots, min_ratio=min_ratio, affinity=affinity, disk=disk)
    if p is None or p.decision in (Decision.HIT, Decision.WAIT):
        return
    chosen = {s.id: s for s in slots}[p.slot]
    assert p.evicts is (chosen.state is HOT)
    # no usable prefix was ignored for a FREE/COLD/HOT fallback
    idle = [s for s in slots if not s.busy]
    if p.decision in (Decision.MISS, Decision.SMALL):
        expected = target_slot(idle)
        assert expected is not None and p.slot == expected.id
    if p.decision is Decision.RESTORE:
        assert not request.small and disk is not None and p.restore == disk
        assert chosen.id.backend == disk.backend
        # longer than every usable slot prefix (a busy one is usable only while affinity lasts)
        for s in slots:
            if not s.busy or (affinity and not request.small):
                assert passing(request, s, min_ratio) < disk.common_blocks
