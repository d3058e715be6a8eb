"""
L{proxycache.slots.Scheduler} on a L{Clock}: no reactor, no network.
"""

from __future__ import annotations

import random

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from proxycache.routing import Fingerprint
from proxycache.routing import EMPTY, Decision, DiskMatch, Request, SlotId, SlotState
from proxycache.slots import NOTHING, Lease, Outcome, QueueFull, Scheduler, SlotContent
from tests.fakes import fp

FREE, COLD, HOT = SlotState.FREE, SlotState.COLD, SlotState.HOT
A0, A1 = SlotId("a", 0), SlotId("a", 1)


def large(blocks: int, conversation: int) -> Request:
    return Request(fp(blocks, base=conversation), small=False)


def small(blocks: int, conversation: int) -> Request:
    return Request(fp(blocks, base=conversation), small=True)


def make(slots: int = 2, *, affinity_wait: float = 2.0, max_queue: int = 10, disk_lookup=None,
         clock: Clock | None = None) -> Scheduler:
    scheduler = Scheduler(clock or Clock(), min_ratio=0.5, affinity_wait=affinity_wait,
                          max_queue=max_queue, disk_lookup=disk_lookup)
    scheduler.set_backend_slots("a", slots)
    return scheduler


def result(d: Deferred):
    """The Deferred's result if it has fired (a Lease, or the Failure), else None."""
    out: list = []
    d.addBoth(lambda r: out.append(r) or r)
    if out and not isinstance(out[0], Lease):
        d.addErrback(lambda f: None)  # consumed here: no "unhandled error" at gc
    return out[0] if out else None


def lease_of(d: Deferred) -> Lease:
    lease = result(d)
    assert isinstance(lease, Lease), lease
    return lease


OK = Outcome(succeeded=True, cache_n=3, prompt_n=5, predicted_n=7)
FAILED = Outcome(succeeded=False)


def locked(scheduler: Scheduler) -> set[SlotId]:
    return {s.id for s in scheduler.slots.values() if s.busy}


# -- granting -------------------------------------------------------------------


def test_leases_granted_at_once_when_idle():
    scheduler = make(2)
    first = lease_of(scheduler.acquire(large(20, 1)))
    second = lease_of(scheduler.acquire(large(20, 2)))
    assert {first.slot.id, second.slot.id} == {A0, A1}
    assert first.plan.decision is Decision.MISS and first.waited == 0
    assert first.previous == NOTHING
    assert scheduler.queue_depth == 0
    assert locked(scheduler) == {A0, A1}


def test_grant_claims_the_slot_for_the_conversation():
    scheduler = make(1)
    request = large(20, 1)
    lease = lease_of(scheduler.acquire(request))
    view = scheduler.views()[0]
    assert view.busy and view.state is HOT and view.fingerprint == request.fingerprint
    scheduler.release(lease, FAILED)
    lease = lease_of(scheduler.acquire(small(3, 2)))
    assert lease.previous == SlotContent(COLD)
    assert scheduler.views()[0].state is COLD


def test_waiters_served_fifo_as_slots_are_released():
    clock = Clock()
    scheduler = make(2, clock=clock)
    running = [lease_of(scheduler.acquire(large(20, c))) for c in (1, 2)]
    waiting = [scheduler.acquire(large(20, c)) for c in (3, 4, 5)]
    assert scheduler.queue_depth == 3 and not any(d.called for d in waiting)
    clock.advance(1.5)
    scheduler.release(running[1], OK)
    assert [d.called for d in waiting] == [True, False, False]
    third = lease_of(waiting[0])
    assert third.slot.id == A1 and third.waited == 1.5
    assert third.plan.decision is Decision.MISS and third.plan.evicts  # it replaces a HOT cache
    scheduler.release(running[0], OK)
    assert [d.called for d in waiting[1:]] == [True, False]
    fourth = lease_of(waiting[1])
    assert fourth.slot.id == A0
    scheduler.release(third, OK)
    assert lease_of(waiting[2]).slot.id == A1
    assert scheduler.queue_depth == 0


def test_cancelling_a_queued_request_removes_it():
    scheduler = make(1)
    running = lease_of(scheduler.acquire(large(20, 1)))
    first = scheduler.acquire(large(20, 2))
    second = scheduler.acquire(large(20, 3))
    assert scheduler.queue_depth == 2
    first.cancel()
    assert scheduler.queue_depth == 1
    assert result(first).check(CancelledError)
    scheduler.release(running, OK)
    lease = lease_of(second)
    assert lease.slot.id == A0  # the cancelled one got nothing
    assert locked(scheduler) == {A0}
    scheduler.release(lease, OK)
    assert locked(scheduler) == set() and scheduler.queue_depth == 0


def test_cancelling_a_waiting_follow_up_cancels_its_timer():
    clock = Clock()
    scheduler = make(2, clock=clock)
    lease_of(scheduler.acquire(large(10, 1)))
    follow_up = scheduler.acquire(large(14, 1))
    assert not follow_up.called and len(clock.getDelayedCalls()) == 1
    follow_up.cancel()
    assert scheduler.queue_depth == 0 and clock.getDelayedCalls() == []
    assert locked(scheduler) == {A0}


def test_queue_full_beyond_max_queue():
    clock = Clock()
    scheduler = make(1, max_queue=2, clock=clock)
    lease_of(scheduler.acquire(large(20, 1)))
    queued = [scheduler.acquire(large(20, c)) for c in (2, 3)]
    assert scheduler.queue_depth == 2
    with pytest.raises(QueueFull):
        scheduler.acquire(large(20, 4))
    # a follow-up that would wait for its slot is refused as well, leaving no timer behind
    with pytest.raises(QueueFull):
        scheduler.acquire(large(25, 1))
    assert scheduler.queue_depth == 2 and clock.getDelayedCalls() == []
    assert not any(d.called for d in queued)


def test_max_queue_zero_refuses_any_wait_but_grants_idle():
    scheduler = make(1, max_queue=0)
    lease_of(scheduler.acquire(large(20, 1)))
    with pytest.raises(QueueFull):
        scheduler.acquire(large(20, 2))
    assert scheduler.queue_depth == 0


# -- affinity -------------------------------------------------------------------


def test_follow_up_waits_for_its_busy_hot_slot_until_affinity_ends():
    clock = Clock()
    scheduler = make(2, affinity_wait=2.0, clock=clock)
    lease_of(scheduler.acquire(large(10, 1)))  # turn 1 of conversation 1, on a#0
    follow_up = scheduler.acquire(large(14, 1))  # turn 2 arrives while turn 1 still runs
    assert not follow_up.called, "given the other idle slot instead of waiting"
    assert scheduler.queue_depth == 1 and locked(scheduler) == {A0}
    clock.advance(1.9)
    assert not follow_up.called
    clock.advance(0.1)
    lease = lease_of(follow_up)
    assert lease.slot.id == A1 and lease.plan.decision is Decision.MISS
    assert lease.waited == 2.0
    assert scheduler.queue_depth == 0 and clock.getDelayedCalls() == []


def test_follow_up_gets_its_slot_when_released_within_affinity():
    clock = Clock()
    scheduler = make(2, affinity_wait=2.0, clock=clock)
    turn1 = lease_of(scheduler.acquire(large(10, 1)))
    follow_up = scheduler.acquire(large(14, 1))
    clock.advance(1.0)
    scheduler.release(turn1, OK)
    lease = lease_of(follow_up)
    assert lease.slot.id == A0 and lease.plan.decision is Decision.HIT
    assert lease.plan.common_blocks == 10 and lease.waited == 1.0
    assert clock.getDelayedCalls() == []  # its affinity timer is gone


def test_unrelated_request_is_not_held_back_by_a_waiting_follow_up():
    clock = Clock()
    scheduler = make(2, clock=clock)
    lease_of(scheduler.acquire(large(10, 1)))
    follow_up = scheduler.acquire(large(14, 1))
    other = scheduler.acquire(large(10, 2))
    assert not follow_up.called
    assert lease_of(other).slot.id == A1


def test_small_follow_up_does_not_wait_for_its_busy_cold_slot():
    scheduler = make(2)
    lease_of(scheduler.acquire(small(4, 1)))
    lease = lease_of(scheduler.acquire(small(5, 1)))
    assert lease.slot.id == A1 and lease.plan.decision is Decision.SMALL


def test_zero_affinity_never_waits():
    scheduler = make(2, affinity_wait=0.0)
    lease_of(scheduler.acquire(large(10, 1)))
    assert lease_of(scheduler.acquire(large(14, 1))).slot.id == A1


def test_affinity_timer_firing_an_ulp_early_still_ends_the_wait():
    clock = Clock()
    clock.advance(5.676)
    scheduler = make(2, affinity_wait=98.946, clock=clock)
    until = clock.seconds() + 98.946
    x = lease_of(scheduler.acquire(large(20, 1)))
    y = lease_of(scheduler.acquire(large(20, 2)))
    first_turn = scheduler.acquire(large(10, 3))
    follow_up = scheduler.acquire(large(14, 3))  # shares 10 blocks with first_turn
    clock.advance(17.203)
    t1 = clock.seconds()
    assert t1 + (until - t1) < until  # the float quirk this test is about
    scheduler.release(y, OK)  # first_turn takes a#1; follow_up now waits for it (timer armed at t1)
    assert lease_of(first_turn).slot.id == A1 and not follow_up.called
    scheduler.release(x, OK)  # a#0 idle, follow_up still within its affinity
    assert not follow_up.called
    (timer,) = clock.getDelayedCalls()
    clock.advance(timer.getTime() - clock.seconds())
    clock.advance(1e-6)  # well past affinity_until, nothing else happens
    assert follow_up.called, "still queued although a#0 has been idle since affinity ended"


def test_small_requests_never_take_hot_while_cold_or_free_idle():
    clock = Clock()
    scheduler = make(3, clock=clock)
    hot = lease_of(scheduler.acquire(large(20, 1)))
    scheduler.release(hot, OK)  # a#0 HOT, idle
    tiny = lease_of(scheduler.acquire(small(2, 2)))  # a#1 (FREE before HOT)
    assert tiny.slot.id == A1 and tiny.plan.decision is Decision.SMALL
    other = lease_of(scheduler.acquire(small(2, 3)))
    assert other.slot.id == SlotId("a", 2)
    scheduler.release(other, OK)  # a#2 COLD
    # a#0 HOT and a#2 COLD idle: a small request goes to the COLD one
    third = lease_of(scheduler.acquire(small(2, 4)))
    assert third.slot.id == SlotId("a", 2) and not third.plan.evicts
    # now only the HOT slot is idle, used just now: the small request waits a little, then evicts it
    waiting = scheduler.acquire(small(2, 5))
    assert not waiting.called
    clock.advance(3.0)
    fourth = lease_of(waiting)
    assert fourth.slot.id == A0 and fourth.plan.evicts
    assert fourth.previous.state is HOT


# -- release and the slot map ----------------------------------------------------


def test_release_success_large_leaves_hot():
    clock = Clock()
    scheduler = make(1, clock=clock)
    request = large(20, 1)
    lease = lease_of(scheduler.acquire(request))
    clock.advance(7)
    scheduler.release(lease, OK)
    slot = scheduler.slots[A0]
    assert slot.content == SlotContent(HOT, request.fingerprint, 15)
    assert slot.last_used == 7 and not slot.busy


def test_release_success_small_leaves_cold():
    scheduler = make(1)
    request = small(3, 1)
    lease = lease_of(scheduler.acquire(request))
    scheduler.release(lease, OK)
    assert scheduler.slots[A0].content == SlotContent(COLD, request.fingerprint, 15)


@pytest.mark.parametrize("request_", [large(20, 1), small(3, 1)])
def test_release_failure_leaves_cold_and_empty(request_):
    clock = Clock()
    scheduler = make(1, clock=clock)
    lease = lease_of(scheduler.acquire(request_))
    clock.advance(3)
    scheduler.release(lease, FAILED)
    slot = scheduler.slots[A0]
    assert slot.content == SlotContent(COLD) and slot.content.fingerprint == EMPTY
    assert slot.last_used == 3 and not slot.busy
    # nothing of it is matched afterwards
    follow = lease_of(scheduler.acquire(large(25, 1)))
    assert follow.plan.decision is Decision.MISS


def test_follow_up_hits_after_success():
    scheduler = make(2)
    scheduler.release(lease_of(scheduler.acquire(large(10, 1))), OK)
    lease = lease_of(scheduler.acquire(large(14, 1)))
    assert lease.slot.id == A0 and lease.plan.decision is Decision.HIT
    assert lease.previous.fingerprint == fp(10, base=1) and lease.previous.tokens == 15


def test_reset_backend_frees_all_of_that_backend():
    scheduler = make(2)
    scheduler.set_backend_slots("b", 1)
    leases = [lease_of(scheduler.acquire(large(20, c))) for c in (1, 2, 3)]
    for lease in leases[:2]:
        scheduler.release(lease, OK)
    busy_id = leases[2].slot.id
    scheduler.reset_backend(busy_id.backend)
    for slot in scheduler.slots.values():
        if slot.id.backend == busy_id.backend:
            assert slot.content == NOTHING and slot.state is FREE
        else:
            assert slot.state is HOT
    assert scheduler.slots[busy_id].busy  # the in-flight request still holds its lock
    scheduler.release(leases[2], FAILED)
    assert locked(scheduler) == set()


def test_set_backend_slots_keeps_state_of_surviving_slots():
    scheduler = make(2)
    scheduler.release(lease_of(scheduler.acquire(large(20, 1))), OK)
    scheduler.set_backend_slots("a", 3)
    assert scheduler.slots[A0].state is HOT and len(scheduler.slots) == 3
    scheduler.set_backend_slots("a", 1)
    assert list(scheduler.slots) == [A0]


def test_busy_slot_beyond_a_shrunk_count_goes_once_released():
    scheduler = make(2)
    lease_of(scheduler.acquire(large(20, 1)))
    second = lease_of(scheduler.acquire(large(20, 2)))
    scheduler.set_backend_slots("a", 1)
    assert A1 in scheduler.slots  # still busy: kept for now
    scheduler.release(second, OK)
    assert A1 not in scheduler.slots


def test_set_backend_slots_serves_waiters_on_new_slots():
    scheduler = make(1)
    lease_of(scheduler.acquire(large(20, 1)))
    waiting = scheduler.acquire(large(20, 2))
    scheduler.set_backend_slots("a", 2)
    assert lease_of(waiting).slot.id == A1


def test_disk_lookup_gives_a_restore_plan_for_large_requests_only():
    asked = []

    def lookup(request):
        asked.append(request)
        return DiskMatch("deadbeef", "a", len(request.fingerprint.blocks), 1.0)

    scheduler = make(2, disk_lookup=lookup)
    lease = lease_of(scheduler.acquire(large(20, 1)))
    assert lease.plan.decision is Decision.RESTORE and lease.plan.restore.key == "deadbeef"
    asked.clear()
    lease = lease_of(scheduler.acquire(small(2, 2)))
    assert lease.plan.decision is Decision.SMALL and asked == []


# -- exclusive maintenance ---------------------------------------------------------


def test_try_hold_and_release():
    scheduler = make(1)
    hold = scheduler.try_hold(A0)
    assert hold is not None and scheduler.slots[A0].busy
    assert scheduler.try_hold(A0) is None  # already held
    waiting = scheduler.acquire(large(20, 1))
    assert not waiting.called and scheduler.queue_depth == 1
    hold.release()
    lease = lease_of(waiting)
    assert lease.slot.id == A0 and scheduler.slots[A0].busy
    assert scheduler.try_hold(A0) is None  # leased
    scheduler.release(lease, OK)
    with scheduler.try_hold(A0) as held:  # type: ignore[union-attr]
        assert held.slot.busy
    assert not scheduler.slots[A0].busy
    hold.release()  # a second release of a hold changes nothing
    assert not scheduler.slots[A0].busy and scheduler.try_hold(SlotId("a", 9)) is None


def test_a_hold_when_idle_comes_before_the_queue_and_hands_the_slot_on():
    clock = Clock()
    scheduler = make(1, clock=clock)
    lease = lease_of(scheduler.acquire(large(10, 1)))
    held = Deferred.fromCoroutine(scheduler.hold_when_idle(A0, 30.0))
    waiting = scheduler.acquire(large(20, 2))
    assert not held.called and not waiting.called
    scheduler.release(lease, OK)
    hold = held.result
    assert hold is not None and not waiting.called  # the save on stop goes first
    hold.release()
    assert lease_of(waiting).slot.id == A0


def test_a_hold_when_idle_gives_up_after_its_timeout():
    clock = Clock()
    scheduler = make(1, clock=clock)
    lease = lease_of(scheduler.acquire(large(10, 1)))
    held = Deferred.fromCoroutine(scheduler.hold_when_idle(A0, 30.0))
    clock.advance(30.0)
    assert held.called and held.result is None
    scheduler.release(lease, OK)
    assert not scheduler.slots[A0].busy  # the abandoned wait took nothing
    assert Deferred.fromCoroutine(scheduler.hold_when_idle(SlotId("a", 9), 1.0)).result is None


def test_mark_saved_records_a_save_only_over_the_content_it_saved():
    scheduler = make(1)
    first = lease_of(scheduler.acquire(large(10, 1)))
    scheduler.release(first, OK)
    saving = scheduler.slots[A0].content
    follow_up = lease_of(scheduler.acquire(large(14, 1)))  # the slot moved on while the save ran
    scheduler.release(follow_up, OK)
    assert not scheduler.mark_saved(A0, saving, "00000000000000a1")
    assert scheduler.slots[A0].content.saved_key is None
    now = scheduler.slots[A0].content
    assert scheduler.mark_saved(A0, now, "00000000000000a2")
    assert scheduler.slots[A0].content == attrs.evolve(now, saved_key="00000000000000a2", lineage="00000000000000a2")
    assert not scheduler.mark_saved(SlotId("a", 9), now, "00000000000000a3")


def test_a_closed_backend_takes_no_lease_until_reopened():
    scheduler = make(1)
    scheduler.close_backend("a")
    waiting = scheduler.acquire(large(10, 1))
    assert not waiting.called and scheduler.closed == {"a"}
    scheduler.reopen("a")
    assert lease_of(waiting).slot.id == A0 and scheduler.closed == set()


def test_the_slot_map_is_read_only_outside_the_scheduler():
    scheduler = make(1)
    with pytest.raises(TypeError):
        scheduler.slots[A0] = scheduler.slots[A0]  # type: ignore[index]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        scheduler.slots[A0].content = SlotContent(HOT)  # type: ignore[misc]


def test_reset_gives_a_waiting_follow_up_an_idle_slot_at_once():
    clock = Clock()
    scheduler = make(2, clock=clock)
    lease_of(scheduler.acquire(large(10, 1)))
    follow_up = scheduler.acquire(large(14, 1))  # waits for a#0 while a#1 is idle
    hold = scheduler.try_hold(A1)
    assert hold is not None  # nobody wants a#1: the follow-up waits for a#0
    hold.release()
    assert not follow_up.called
    scheduler.reset_backend("a")  # a#0 no longer holds the prefix: no reason to wait
    assert lease_of(follow_up).slot.id == A1
    assert scheduler.try_hold(A1) is None


# -- invariants over random sequences --------------------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.integers(0, 3), st.integers(1, 12), st.booleans()),
        st.tuples(st.just("cancel"), st.integers(0, 50)),
        st.tuples(st.just("release"), st.integers(0, 50), st.booleans()),
        st.tuples(st.just("advance"), st.sampled_from([0.0, 0.5, 1.0, 2.5])),
        st.tuples(st.just("exclusive"), st.integers(0, 2)),
        st.tuples(st.just("done"), st.integers(0, 50)),
        st.tuples(st.just("reset"),),
    ),
    min_size=5,
    max_size=40,
)


class Model:
    """Drives a scheduler and checks, at every grant, that the slot was free in our own books."""

    def __init__(self, slots: int, max_queue: int) -> None:
        self.clock = Clock()
        self.scheduler = make(slots, affinity_wait=2.0, max_queue=max_queue, clock=self.clock)
        self.holders: dict[SlotId, object] = {}  # slot -> lease or "exclusive"
        self.leases: list[Lease] = []
        self.pending: list[Deferred] = []
        self.exclusive: list = []

    def _granted(self, lease: Lease) -> Lease:
        assert lease.slot.id not in self.holders, f"two requests on {lease.slot.id}"
        assert lease.slot.busy and lease.plan.slot == lease.slot.id
        assert lease.plan.decision is not Decision.WAIT
        self.holders[lease.slot.id] = lease
        self.leases.append(lease)
        return lease

    def acquire(self, request: Request) -> None:
        try:
            d = self.scheduler.acquire(request)
        except QueueFull:
            assert self.scheduler.queue_depth == self.scheduler.max_queue
            return
        d.addCallback(self._granted)
        d.addErrback(lambda f: f.trap(CancelledError))
        self.pending.append(d)

    def step(self, op) -> None:
        kind = op[0]
        if kind == "acquire":
            _, conversation, blocks, is_small = op
            self.acquire(Request(fp(blocks, base=conversation), is_small))
        elif kind == "cancel" and self.pending:
            self.pending[op[1] % len(self.pending)].cancel()  # granted ones ignore it
        elif kind == "release" and self.leases:
            lease = self.leases.pop(op[1] % len(self.leases))
            del self.holders[lease.slot.id]
            self.scheduler.release(lease, OK if op[2] else FAILED)
        elif kind == "advance":
            self.clock.advance(op[1])
        elif kind == "exclusive":
            hold = self.scheduler.try_hold(SlotId("a", op[1]))
            if hold is not None:
                assert hold.slot.id not in self.holders
                self.holders[hold.slot.id] = "exclusive"
                self.exclusive.append(hold)
        elif kind == "done" and self.exclusive:
            hold = self.exclusive.pop(op[1] % len(self.exclusive))
            del self.holders[hold.slot.id]
            hold.release()
        elif kind == "reset":
            self.scheduler.reset_backend("a")
        self.check()

    def check(self) -> None:
        self.pending = [d for d in self.pending if not d.called]
        assert locked(self.scheduler) == set(self.holders)
        assert self.scheduler.queue_depth == len(self.pending)
        assert self.scheduler.queue_depth <= self.scheduler.max_queue

    def drain(self) -> None:
        """Release everything; every waiter is served in the end; nothing stays locked."""
        for _ in range(1000):
            if self.exclusive:
                self.step(("done", 0))
            elif self.leases:
                self.step(("release", 0, True))
            elif self.pending:
                self.step(("advance", 2.5))  # affinity runs out
            else:
                break
        assert not self.leases and not self.pending and not self.exclusive
        assert locked(self.scheduler) == set()
        assert self.scheduler.queue_depth == 0
        assert self.clock.getDelayedCalls() == []


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 3), st.integers(0, 4), operations)
def test_property_one_request_per_slot_and_no_lock_left(slots, max_queue, ops):
    model = Model(slots, max_queue)
    for op in ops:
        model.step(op)
    model.drain()


def test_seeded_long_random_sequences():
    for seed in range(15):
        rng = random.Random(seed)
        model = Model(rng.randint(1, 4), rng.randint(0, 6))
        for _ in range(300):
            kind = rng.choice(["acquire"] * 4 + ["release"] * 3 + ["cancel", "advance", "exclusive", "done", "reset"])
            if kind == "acquire":
                op = (kind, rng.randint(0, 4), rng.randint(1, 12), rng.random() < 0.3)
            elif kind == "release":
                op = (kind, rng.randint(0, 50), rng.random() < 0.8)
            elif kind == "advance":
                op = (kind, rng.choice([0.0, 0.3, 1.0, 2.5]))
            elif kind == "reset":
                op = (kind,)
            else:
                op = (kind, rng.randint(0, 50))
            model.step(op)
        model.drain()


# -- branches, forks, lineage ---------------------------------------------------------


def branch(shared: int, own: int, conversation: int, user: int) -> Request:
    """C{shared} blocks of C{conversation} (a system prompt), then C{own} blocks of C{user}."""
    blocks = fp(shared, base=conversation).blocks + tuple(10**9 + user * 10**6 + i for i in range(own))
    return Request(Fingerprint(blocks, len(blocks) * 100, len(blocks) * 16), small=False)


def test_branch_does_not_wait_for_a_busy_slot_while_another_is_free():
    clock = Clock()
    scheduler = make(2, clock=clock, affinity_wait=30.0)
    user_a = lease_of(scheduler.acquire(branch(20, 4, 1, user=1)))
    user_b = scheduler.acquire(branch(20, 5, 1, user=2))  # same system prompt, own part
    lease = lease_of(user_b)
    assert lease.slot.id != user_a.slot.id and lease.plan.decision is Decision.MISS and lease.waited == 0
    # A's next turn, once A's slot is free again, is a hit on its own slot
    scheduler.release(user_a, OK)
    follow_up = Request(Fingerprint(user_a.request.fingerprint.blocks + (5, 6), 2800, 448), small=False)
    again = lease_of(scheduler.acquire(follow_up))
    assert again.slot.id == user_a.slot.id and again.plan.decision is Decision.HIT and not again.plan.evicts


def test_continuation_waits_for_its_busy_slot_until_affinity_ends_even_with_a_free_slot():
    clock = Clock()
    scheduler = make(2, clock=clock, affinity_wait=2.0)
    first = lease_of(scheduler.acquire(large(10, 1)))
    follow_up = scheduler.acquire(large(14, 1))
    assert not follow_up.called
    clock.advance(2.0)
    assert lease_of(follow_up).slot.id != first.slot.id


def test_fork_holds_the_source_slot_until_the_tier_releases_it():
    scheduler = make(3)
    scheduler.fork_pays = lambda view, common: True
    user_a = lease_of(scheduler.acquire(branch(20, 4, 1, user=1)))
    scheduler.release(user_a, OK)
    fork = lease_of(scheduler.acquire(branch(20, 5, 1, user=2)))
    assert fork.plan.decision is Decision.RESTORE and fork.plan.fork == user_a.slot.id
    assert fork.source is not None and fork.source.id == user_a.slot.id and scheduler.slots[user_a.slot.id].busy
    assert fork.slot.id != user_a.slot.id
    assert fork.lineage is None  # a branch starts an entry of its own
    # A's follow-up waits for its slot while the fork saves it
    follow_up = scheduler.acquire(Request(Fingerprint(user_a.request.fingerprint.blocks + (9,), 2500, 400), False))
    assert not follow_up.called
    scheduler.release_source(fork)
    assert lease_of(follow_up).slot.id == user_a.slot.id
    scheduler.release_source(fork)  # twice: no effect on A's lease
    assert scheduler.slots[user_a.slot.id].busy
    scheduler.release(fork, OK)
    assert scheduler.slots[fork.slot.id].content.state is HOT


def test_a_fork_source_held_for_its_save_is_seen_saving_and_a_sibling_waits_for_it():
    # Three team members behind one system prompt: B's fork holds A's slot while it is saved.  That slot is
    # busy only with a save, as under a write-behind: C's branch waits for it (its prefix is there) rather
    # than compute the shared prompt again on the free slot, then forks it too, as saved.
    clock = Clock()
    scheduler = make(3, clock=clock, affinity_wait=30.0)
    scheduler.fork_pays = lambda view, common: True
    user_a = lease_of(scheduler.acquire(branch(20, 4, 1, user=1)))
    scheduler.release(user_a, OK)
    fork = lease_of(scheduler.acquire(branch(20, 5, 1, user=2)))
    source = user_a.slot.id
    assert fork.plan.fork == source
    assert scheduler.slots[source].saving and [v.saving for v in scheduler.views() if v.id == source] == [True]
    assert not scheduler.slots[fork.slot.id].saving  # the fork's own slot serves a request
    user_c = scheduler.acquire(branch(20, 6, 1, user=3))
    assert not user_c.called
    clock.advance(0.5)
    scheduler.release_source(fork)  # saved
    lease = lease_of(user_c)
    assert lease.plan.decision is Decision.RESTORE and lease.plan.fork == source
    assert lease.save_waited == lease.waited == 0.5
    assert scheduler.slots[source].saving  # held again, for C's fork (nothing to write: saved already)
    scheduler.release_source(lease)
    assert not scheduler.slots[source].busy and not scheduler.slots[source].saving


def test_release_lets_an_unreleased_fork_source_go():
    scheduler = make(2)
    scheduler.fork_pays = lambda view, common: True
    scheduler.release(lease_of(scheduler.acquire(branch(20, 4, 1, user=1))), OK)
    fork = lease_of(scheduler.acquire(branch(20, 5, 1, user=2)))
    assert fork.source is not None and fork.source.busy
    scheduler.release(fork, FAILED)
    assert locked(scheduler) == set()


def test_lineage_follows_the_conversation_not_the_prefix():
    scheduler = make(2)
    first = lease_of(scheduler.acquire(large(10, 1)))
    scheduler.release(first, OK)
    assert scheduler.mark_saved(first.slot.id, scheduler.slots[first.slot.id].content, "00000000000000a1")
    follow_up = lease_of(scheduler.acquire(large(14, 1)))
    assert follow_up.plan.decision is Decision.HIT and follow_up.lineage == "00000000000000a1"
    scheduler.release(follow_up, OK)
    released = scheduler.slots[follow_up.slot.id].content
    assert released.lineage == "00000000000000a1" and released.saved_key is None
    # another user behind the same prefix, on the only idle slots: no lineage of A's
    other = lease_of(scheduler.acquire(branch(10, 3, 1, user=7)))
    assert other.slot.id != follow_up.slot.id and other.lineage is None


def test_restore_gives_the_restored_entry_as_lineage():
    scheduler = make(2, disk_lookup=lambda request: DiskMatch("00000000000000b2", "a", 8, 1.0))
    lease = lease_of(scheduler.acquire(large(20, 1)))
    assert lease.plan.decision is Decision.RESTORE and lease.lineage == "00000000000000b2"


def test_the_disk_index_is_looked_up_once_per_arriving_request():
    # The fair queue's cost and the plan made at arrival need the same answer of the index: one
    # lookup (a scan of every saved entry), not one for each.
    asked = []

    def lookup(request):
        asked.append(request)
        return None

    scheduler = make(1, disk_lookup=lookup)
    running = lease_of(scheduler.acquire(large(20, 1)))
    assert len(asked) == 1
    waiting = scheduler.acquire(large(20, 2))  # planned at once too: the slot is busy, so it waits
    assert len(asked) == 2 and not waiting.called
    scheduler.release(running, OK)  # planned again later: looked up afresh, saves may have come meanwhile
    assert lease_of(waiting).slot.id == A0 and len(asked) == 3


def test_a_waiting_request_is_planned_against_the_index_as_it_is_when_a_slot_frees():
    saved: dict[Request, DiskMatch] = {}
    scheduler = make(1, disk_lookup=saved.get)
    running = lease_of(scheduler.acquire(large(20, 1)))
    second = large(20, 2)
    waiting = scheduler.acquire(second)
    saved[second] = DiskMatch("00000000000000c2", "a", 20, 1.0)  # saved while it waited
    scheduler.release(running, OK)
    lease = lease_of(waiting)
    assert lease.plan.decision is Decision.RESTORE and lease.plan.restore.key == "00000000000000c2"
