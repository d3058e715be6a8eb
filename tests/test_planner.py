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

import attrs

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
    Relation,
    best_match,
    is_small,
    plan,
    relation,
    state_after,
    backend_load,
    target_slot,
)
from tests.fakes import fp

FREE, COLD, HOT = SlotState.FREE, SlotState.COLD, SlotState.HOT


def slot(index: int, state: SlotState = FREE, fingerprint: Fingerprint = EMPTY, *,
         last_used: float = 0.0, busy: bool = False, backend: str = "a", tokens: int = 0) -> SlotView:
    return SlotView(SlotId(backend, index), state, fingerprint, last_used, busy, tokens)


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


def test_a_large_prompt_without_spaces_is_not_small():
    from proxycache.routing import fingerprint_text

    assert not is_small(fingerprint_text("x" * 5_000_000), 2000, 300, 16)  # one 5 MB "word"
    assert not is_small(fingerprint_text("漢字" * 6000), 2000, 300, 16)  # 12,000 CJK characters
    assert is_small(fingerprint_text("x" * 1_999), 2000, 300, 16)


def test_is_small_zero_thresholds_never_small():
    assert not is_small(EMPTY, 0, 0, 0)


def test_transition_large_served_becomes_hot():
    assert state_after(small=False, succeeded=True) is HOT


def test_transition_small_served_becomes_cold():
    assert state_after(small=True, succeeded=True) is COLD


@pytest.mark.parametrize("is_small_request", [True, False])
def test_transition_failure_becomes_cold(is_small_request):
    assert state_after(small=is_small_request, succeeded=False) is COLD


# -- classification: continuation, branch, unrelated ----------------------------


def test_relation_continuation_branch_unrelated():
    held = fp(10, 12, tag=900)  # a slot's prompt: 10 shared blocks, then 2 of its own
    assert relation(held, held) is Relation.CONTINUATION  # the same prompt again (a retry)
    longer = Fingerprint(held.blocks + (77, 78), held.chars + 200, held.words + 32)
    assert relation(longer, held) is Relation.CONTINUATION  # the next turn
    assert relation(fp(10, 14), held) is Relation.BRANCH  # same system prompt, another user
    assert relation(fp(5), held) is Relation.BRANCH  # shorter than the slot: it would cut it
    assert relation(fp(4, base=3), held) is Relation.UNRELATED
    assert relation(fp(3), EMPTY) is Relation.UNRELATED


def test_branch_does_not_wait_for_a_busy_slot_while_one_is_free():
    # user B: same system prompt (8 blocks) as user A's busy slot, own private part
    user_a = slot(0, HOT, fp(8, 10), busy=True)
    request = large(fp(8, 11))
    p = plan(request, [user_a, slot(1, FREE)], min_ratio=0.0, affinity=True)
    assert p == Plan(Decision.MISS, SlotId("a", 1))
    # nothing idle: it queues (None), it does not WAIT on A's slot
    assert plan(request, [user_a], min_ratio=0.0) is None


def test_continuation_waits_for_its_busy_slot_while_one_is_free():
    user_a = slot(0, HOT, fp(8, 10, tag=901), busy=True)
    follow_up = large(fp(8, 10, tag=901))  # A's next turn: the same blocks (+ a new partial block)
    p = plan(follow_up, [user_a, slot(1, FREE)], min_ratio=0.0, affinity=True)
    assert p == Plan(Decision.WAIT, SlotId("a", 0), 10, 1.0)


def test_branch_waits_for_a_slot_busy_only_with_a_background_save():
    # issue 24: a sibling of the context a write-behind is saving: that slot is free once the save
    # ends, and the save stalls the backend's other slot anyway: waiting beats computing from scratch
    context = attrs.evolve(slot(0, HOT, fp(20, 22, tag=903), busy=True, last_used=5.0), saving=True)
    sibling = large(fp(20, 23))
    p = plan(sibling, [context, slot(1, FREE)], min_ratio=0.0, affinity=True)
    assert p == Plan(Decision.WAIT, SlotId("a", 0), 20, 20 / 22)
    # ... only while it has affinity time, like a continuation
    assert plan(sibling, [context, slot(1, FREE)], min_ratio=0.0, affinity=False) == Plan(Decision.MISS, SlotId("a", 1))
    # a small request recomputes its few blocks rather than wait
    assert plan(small(fp(20, 23)), [context, slot(1, FREE)], min_ratio=0.0).decision is Decision.SMALL


def test_a_slot_busy_saving_is_waited_for_only_when_it_offers_the_most():
    context = attrs.evolve(slot(0, HOT, fp(8, 10, tag=904), busy=True), saving=True)
    request = large(fp(12, 13))
    # an idle slot holding more of the request: used there, no wait
    p = plan(request, [context, slot(1, HOT, fp(12), last_used=1.0)], min_ratio=0.0)
    assert p == Plan(Decision.HIT, SlotId("a", 1), 12, 1.0)
    # a saved entry reusing more: restored rather than wait
    disk = DiskMatch("k", "a", 11, 1.0)
    p = plan(request, [context, slot(1, FREE)], min_ratio=0.0, disk=disk)
    assert p is not None and p.decision is Decision.RESTORE


def test_branch_never_takes_an_idle_hot_slot_without_saving_it():
    user_a = slot(0, HOT, fp(8, 10), last_used=5.0)
    request = large(fp(8, 11))
    # a free slot is idle and no fork is possible: compute there, A's slot untouched
    assert plan(request, [user_a, slot(1, FREE)], min_ratio=0.0) == Plan(Decision.MISS, SlotId("a", 1))
    # only HOT slots idle: an eviction happens anyway; the branch slot is taken, saved first
    other = slot(1, HOT, fp(3, base=4), last_used=1.0)
    p = plan(request, [user_a, other], min_ratio=0.0)
    assert p == Plan(Decision.HIT, SlotId("a", 0), 8, 0.8, evicts=True)


def test_continuation_takes_its_hot_slot_as_a_hit_without_saving():
    mine = slot(0, HOT, fp(8, 10, tag=902))
    p = plan(large(fp(8, 10, tag=902)), [mine, slot(1, FREE)], min_ratio=0.0)
    assert p == Plan(Decision.HIT, SlotId("a", 0), 10, 1.0) and not p.evicts


def test_branch_of_a_cold_slot_is_a_hit_in_place():
    p = plan(large(fp(8, 11)), [slot(0, COLD, fp(8, 10)), slot(1, FREE)], min_ratio=0.0)
    assert p == Plan(Decision.HIT, SlotId("a", 0), 8, 0.8)


def test_branch_forks_a_hot_idle_slot_into_a_free_one_when_it_pays():
    user_a = slot(0, HOT, fp(8, 10), tokens=4000)
    request = large(fp(8, 11))
    asked = []

    def pays(view, common):
        asked.append((view.id, common))
        return True

    p = plan(request, [user_a, slot(1, COLD, fp(2, base=6)), slot(2, FREE)], min_ratio=0.0, fork_pays=pays)
    assert p == Plan(Decision.RESTORE, SlotId("a", 2), 8, 0.8, fork=SlotId("a", 0))
    assert asked == [(SlotId("a", 0), 8)]
    # the fork does not pay: compute on the free slot rather than destroy A's context
    p = plan(request, [user_a, slot(2, FREE)], min_ratio=0.0, fork_pays=lambda view, common: False)
    assert p == Plan(Decision.MISS, SlotId("a", 2))


def test_fork_stays_on_the_source_backend_and_never_targets_a_hot_slot():
    request = large(fp(8, 11))
    source = slot(0, HOT, fp(8, 10))
    slots = [source, slot(1, FREE, backend="b"), slot(2, HOT, fp(2, base=5))]
    p = plan(request, slots, min_ratio=0.0, fork_pays=lambda view, common: True)
    assert p == Plan(Decision.MISS, SlotId("b", 1))  # no FREE/COLD slot on backend a


def test_branch_prefers_a_saved_entry_holding_the_shared_prefix_over_taking_the_slot():
    # A's slot holds the shared prefix and A's private part; A's saved entry holds them too
    request = large(fp(8, 11))
    disk = DiskMatch("deadbeef", "a", 8, 0.8)
    p = plan(request, [slot(0, HOT, fp(8, 10)), slot(1, FREE)], min_ratio=0.0, disk=disk)
    assert p == Plan(Decision.RESTORE, SlotId("a", 1), 8, 0.8, restore=disk)
    # a fork of the slot reuses as much: the saved entry (nothing to save first) wins the tie
    p = plan(request, [slot(0, HOT, fp(8, 10)), slot(1, FREE)], min_ratio=0.0, disk=disk,
             fork_pays=lambda view, common: True)
    assert p.restore == disk and p.fork is None


def test_longer_busy_branch_does_not_make_a_request_wait_over_a_shorter_continuation():
    request = large(fp(20, 22))
    slots = [slot(0, HOT, fp(20, 30), busy=True), slot(1, HOT, fp(5))]
    p = plan(request, slots, min_ratio=0.0)
    assert p == Plan(Decision.HIT, SlotId("a", 1), 5, 1.0)


def test_small_request_never_forks():
    request = small(fp(8, 11))
    slots = [slot(0, HOT, fp(8, 10)), slot(1, FREE)]
    assert plan(request, slots, min_ratio=0.0, fork_pays=lambda view, common: True) == Plan(
        Decision.SMALL, SlotId("a", 1))


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


def test_ratio_threshold_respected_by_small_requests():
    # 4 shared blocks of a 10-block request against a 10-block COLD slot: ratio 0.4
    request = small(fp(4, 10))
    slots = [slot(0, COLD, fp(4, 10)), slot(1, FREE)]
    assert best_match(request, slots, 0.4) == (slots[0], 4, 0.4)
    assert plan(request, slots, min_ratio=0.4).decision is Decision.HIT
    assert best_match(request, slots, 0.41) is None
    p = plan(request, slots, min_ratio=0.41)
    assert p.decision is Decision.SMALL and p.slot == SlotId("a", 1)


def test_large_requests_are_not_filtered_by_similarity():
    # a team's shared system prompt: 12 of 14 blocks (0.857) fails a 0.9 threshold but is worth reusing
    request = large(fp(12, 14))
    slots = [slot(0, COLD, fp(12, 14)), slot(1, FREE)]
    assert plan(request, slots, min_ratio=0.9) == Plan(Decision.HIT, SlotId("a", 0), 12, 12 / 14)
    hot = [slot(0, HOT, fp(12, 14)), slot(1, FREE)]
    p = plan(request, hot, min_ratio=0.9, fork_pays=lambda view, common: True)
    assert p == Plan(Decision.RESTORE, SlotId("a", 1), 12, 12 / 14, fork=SlotId("a", 0))


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
    busy = slot(0, COLD, fp(8, 10), last_used=9.0, busy=True)
    old = slot(1, COLD, fp(8, 11), last_used=1.0)
    recent = slot(2, COLD, fp(8, 12), last_used=2.0)
    assert best_match(request, [busy, old, recent], 0.0)[0] is recent
    assert plan(request, [busy, old, recent], min_ratio=0.0).slot == recent.id
    # HOT branches taken over (nothing FREE/COLD idle): the least recently used goes
    hot = [attrs.evolve(s, state=HOT) for s in (busy, old, recent)]
    assert plan(request, hot, min_ratio=0.0) == Plan(Decision.HIT, old.id, 8, 8 / 9, evicts=True)


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
        slot(1, COLD, fp(5, 6)),  # COLD: a HOT branch would not be taken over while slot 2 is free
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
    slots = [slot(0, HOT, fp(40, 40)), slot(1, FREE)]  # the request continues slot 0
    p = plan(request, slots, min_ratio=0.0, disk=DiskMatch("deadbeef", "a", 40, 1.0))
    assert p.decision is Decision.HIT and p.slot == SlotId("a", 0) and not p.evicts


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
        busy = draw(st.booleans())
        slots.append(attrs.evolve(slot(
            index,
            state,
            fp(shared, shared + extra) if shared + extra else EMPTY,
            last_used=float(draw(st.integers(0, 5))),
            busy=busy,
            backend=draw(st.sampled_from(["a", "b"])),
        ), saving=busy and draw(st.booleans())))
    shared, extra = draw(fingerprints)
    request = Request(fp(shared, shared + extra), draw(st.booleans()))
    disk = None
    if draw(st.booleans()):
        common = draw(st.integers(1, 14))
        disk = DiskMatch("deadbeef", draw(st.sampled_from(["a", "b"])), common, 1.0)
    min_ratio = draw(st.sampled_from([0.0, 0.3, 0.5, 0.85, 1.0]))
    return request, slots, disk, min_ratio, draw(st.booleans())


def continues(request: Request, s: SlotView) -> bool:
    return 0 < len(s.fingerprint.blocks) == request.fingerprint.common_blocks(s.fingerprint)


def waitable(request: Request, s: SlotView, min_ratio: float, affinity: bool) -> int:
    """Common blocks if C{request} may wait for busy C{s} (a continuation, or any while it is saving), else 0."""
    if not (s.busy and affinity and not request.small and (continues(request, s) or s.saving)):
        return 0
    return passing(request, s, min_ratio)


def usable_idle(request: Request, s: SlotView, slots: list[SlotView], min_ratio: float) -> int:
    """
    Common blocks if idle C{s} can serve C{request} in place without a fork:
    a continuation or a COLD slot, or a HOT branch when no FREE/COLD slot is idle.
    """
    if s.busy:
        return 0
    spare = any(not o.busy and o.state is not HOT for o in slots)
    if s.state is HOT and not continues(request, s) and spare:
        return 0
    return passing(request, s, min_ratio)


def passing(request: Request, s: SlotView, min_ratio: float) -> int:
    """Common blocks if C{s} is a candidate for C{request}, else 0 (computed without the planner)."""
    if s.state is FREE or (request.small and s.state is HOT):
        return 0
    a, b = request.fingerprint.blocks, s.fingerprint.blocks
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    if common == 0 or (request.small and common / min(len(a), len(b)) < min_ratio):
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
        assert continues(request, chosen) or chosen.saving  # a branch waits only for a background save
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
    assert p.similarity >= min_ratio or not request.small  # large requests: not filtered by similarity
    # no idle slot usable in place shares more; with affinity (large requests only), no busy
    # slot it continues either (a branch waits only for a slot busy saving)
    for s in slots:
        assert usable_idle(request, s, slots, min_ratio) <= p.common_blocks
        assert waitable(request, s, min_ratio, affinity) <= p.common_blocks
    if p.evicts:  # only a HOT branch taken over when nothing FREE/COLD is idle
        assert chosen.state is HOT and not continues(request, chosen)
        assert all(s.state is HOT for s in slots if not s.busy)


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
        expected = target_slot(idle, backend_load(slots))
        assert expected is not None and p.slot == expected.id
    if p.decision is Decision.RESTORE:
        assert not request.small and disk is not None and p.restore == disk
        assert chosen.id.backend == disk.backend
        # at least as long as every slot prefix usable in place, longer than one worth waiting for
        for s in slots:
            assert usable_idle(request, s, slots, min_ratio) < disk.common_blocks
            assert waitable(request, s, min_ratio, affinity) < disk.common_blocks


@SETTINGS
@given(scenarios(), st.booleans())
def test_property_forks_only_hot_idle_branches_into_free_or_cold_slots(scenario, pays):
    request, slots, disk, min_ratio, affinity = scenario
    p = plan(request, slots, min_ratio=min_ratio, affinity=affinity, disk=disk,
             fork_pays=lambda view, common: pays)
    if p is None or p.fork is None:
        return
    by_id = {s.id: s for s in slots}
    source, target = by_id[p.fork], by_id[p.slot]
    assert pays and not request.small and p.decision is Decision.RESTORE and p.restore is None
    assert source.state is HOT and not source.busy and not continues(request, source)
    assert target.state is not HOT and not target.busy and target.id.backend == source.id.backend
    assert not p.evicts and p.common_blocks == request.fingerprint.common_blocks(source.fingerprint)


def test_a_saved_cache_is_restored_on_any_backend_that_can_read_it():
    from proxycache.routing import DiskMatch, Plan, Request, SlotId, SlotView, plan

    request = Request(Fingerprint(tuple(range(1, 41)), 4000, 640), small=False)
    disk = DiskMatch("ab" * 8, "gone", 30, 0.75, readers=frozenset({"b"}))
    only_b = [SlotView(SlotId("b", 0)), SlotView(SlotId("c", 0))]
    chosen = plan(request, only_b, min_ratio=0.85, disk=disk)
    assert isinstance(chosen, Plan) and chosen.restore == disk and chosen.slot == SlotId("b", 0)
    # a backend that cannot read it is never the target
    assert plan(request, [SlotView(SlotId("c", 0))], min_ratio=0.85, disk=disk).restore is None


def test_new_work_goes_to_the_backend_with_the_fewest_busy_slots():
    from proxycache.routing import Decision, Request, SlotId, SlotView, plan

    request = Request(Fingerprint(tuple(range(1, 41)), 4000, 640), small=False)
    slots = [
        SlotView(SlotId("a", 0), busy=True), SlotView(SlotId("a", 1)),  # "a" already computes one prompt
        SlotView(SlotId("b", 0)), SlotView(SlotId("b", 1)),
    ]
    chosen = plan(request, slots, min_ratio=0.85)
    assert chosen is not None and chosen.decision is Decision.MISS and chosen.slot.backend == "b"


# -- issue 24: no save or restore on a request's path that costs more than it saves -----


def test_a_sibling_reuses_the_shared_prefix_in_place_rather_than_restoring_it():
    # one slot: the previous sibling (context + its question), saved or not; a saved entry holds
    # the context too.  Restoring it gives the same reuse as the slot in place: no restore.
    request = large(fp(30, 31, tag=2401))
    previous = slot(0, HOT, fp(30, 31, tag=2402), tokens=30_000)
    disk = DiskMatch("deadbeef", "a", 30, 30 / 31)
    p = plan(request, [previous], min_ratio=0.0, disk=disk)
    assert p == Plan(Decision.HIT, SlotId("a", 0), 30, 30 / 31, evicts=True)  # in place (its save judged)
    assert p.restore is None
    # the entry holding less than the slot: all the more so
    less = DiskMatch("deadbeef", "a", 20, 20 / 31)
    assert plan(request, [previous], min_ratio=0.0, disk=less).restore is None
    # the entry holding more: restored (token rule, without a cost model)
    more = DiskMatch("deadbeef", "a", 31, 1.0)
    assert plan(large(fp(31, 32)), [previous], min_ratio=0.0, disk=more).restore == more


def test_a_continuation_is_never_restored_from_its_own_saved_copy():
    mine = fp(20, 20, tag=2403)
    request = large(fp(20, 22, tag=2403))
    disk = DiskMatch("deadbeef", "a", 20, 1.0)
    p = plan(request, [slot(0, HOT, mine), slot(1, FREE)], min_ratio=0.0, disk=disk)
    assert p == Plan(Decision.HIT, SlotId("a", 0), 20, 1.0) and p.restore is None


def test_a_branch_whose_own_part_is_not_worth_keeping_is_taken_over_in_place_without_a_save():
    # the previous sibling's own part is a short tail: cheaper to compute again than to save,
    # so no fork into the free slot, no save: in place, as llama-server alone would
    request = large(fp(30, 31, tag=2404))
    previous = slot(0, HOT, fp(30, 31, tag=2405), tokens=30_000)
    asked = []

    def keep(view, common):
        asked.append((view.id, common))
        return False

    p = plan(request, [previous, slot(1, FREE)], min_ratio=0.0, fork_pays=lambda v, c: True, keep_pays=keep)
    assert p == Plan(Decision.HIT, SlotId("a", 0), 30, 30 / 31) and not p.evicts and p.fork is None
    assert asked == [(SlotId("a", 0), 30)]
    # worth keeping (a team member's private files): forked as before
    p = plan(request, [previous, slot(1, FREE)], min_ratio=0.0, fork_pays=lambda v, c: True,
             keep_pays=lambda v, c: True)
    assert p.fork == SlotId("a", 0)
    # ... and with no free slot, taken over in place but saved first
    p = plan(request, [previous], min_ratio=0.0, keep_pays=lambda v, c: True)
    assert p == Plan(Decision.HIT, SlotId("a", 0), 30, 30 / 31, evicts=True)


def test_a_tail_not_worth_keeping_beats_a_restore_of_a_saved_entry_into_a_free_slot():
    request = large(fp(30, 31, tag=2406))
    disk = DiskMatch("deadbeef", "a", 30, 30 / 31)
    slots = [slot(0, HOT, fp(30, 31, tag=2407)), slot(1, FREE)]
    p = plan(request, slots, min_ratio=0.0, disk=disk, keep_pays=lambda v, c: False)
    assert p == Plan(Decision.HIT, SlotId("a", 0), 30, 30 / 31) and p.restore is None


def test_a_restore_must_beat_the_in_place_reuse_in_time():
    # the entry holds 2 blocks more than the slot in place: restored only if the cost model says
    # reading its file beats computing those 2 blocks
    request = large(fp(32, 33, tag=2408))
    slots = [slot(0, COLD, fp(30, 31, tag=2409)), slot(1, FREE)]
    disk = DiskMatch("deadbeef", "a", 32, 32 / 33)
    asked = []

    def beats(match, have):
        asked.append((match.key, have))
        return False

    p = plan(request, slots, min_ratio=0.0, disk=disk, restore_beats=beats)
    assert p == Plan(Decision.HIT, SlotId("a", 0), 30, 30 / 31) and asked == [("deadbeef", 30)]
    p = plan(request, slots, min_ratio=0.0, disk=disk, restore_beats=lambda match, have: True)
    assert p.restore == disk and p.slot == SlotId("a", 1)
