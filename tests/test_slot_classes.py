"""
Request classes in the scheduler (L{proxycache.routing._classes}), on a
L{Clock}: FIM slots by demand, side calls kept off conversations in use.
"""

from __future__ import annotations

import attrs
from twisted.internet.task import Clock

from proxycache.routing import Decision, Request, SlotId
from proxycache.slots import Outcome, Scheduler
from tests.fakes import fp
from tests.test_scheduler import lease_of

OK = Outcome(succeeded=True, cache_n=3, prompt_n=5, predicted_n=7)
A0, A1, A2 = SlotId("a", 0), SlotId("a", 1), SlotId("a", 2)


def chat(conversation: int, blocks: int = 20, tenant: str = "t") -> Request:
    return Request(fp(blocks, base=conversation), small=False, tenant=tenant)


def side_call(conversation: int, tenant: str = "t") -> Request:
    return Request(fp(2, base=conversation), small=True, tenant=tenant)


def fim(editor: int) -> Request:
    return Request(fp(20, base=500 + editor), small=False, kind="fim", tenant=f"editor{editor}")


def make(clock: Clock, slots: int = 3, **options) -> Scheduler:
    scheduler = Scheduler(clock, min_ratio=0.5, affinity_wait=0.0, max_queue=100, **options)
    scheduler.set_backend_slots("a", slots)
    return scheduler


def three_conversations(clock: Clock, scheduler: Scheduler) -> None:
    """Conversations 1, 2, 3 on a#0, a#1, a#2, used in that order (3 the most recent)."""
    for conversation in (1, 2, 3):
        clock.advance(10)
        lease = lease_of(scheduler.acquire(chat(conversation)))
        assert lease.slot.id == SlotId("a", conversation - 1)
        scheduler.release(lease, OK)
    clock.advance(10)


def test_fim_takes_the_least_recently_used_conversation_not_the_last_slot():
    clock = Clock()
    scheduler = make(clock)
    three_conversations(clock, scheduler)
    lease = lease_of(scheduler.acquire(fim(1)))
    assert lease.slot.id == A0 and lease.plan.evicts  # conversation 1 is the coldest: saved, then replaced
    assert scheduler.slot_class(A0) == "fim" and scheduler.slot_class(A2) == "chat"


def test_at_most_fim_slots_hold_fim_at_a_time():
    clock = Clock()
    scheduler = make(clock)
    three_conversations(clock, scheduler)
    first = lease_of(scheduler.acquire(fim(1)))
    burst = [scheduler.acquire(fim(e)) for e in (2, 3, 4)]
    assert not any(d.called for d in burst), "a second slot taken for FIM"
    scheduler.release(first, OK)
    assert lease_of(burst[0]).slot.id == A0


def test_two_fim_slots_when_asked_for():
    clock = Clock()
    scheduler = make(clock, fim_slots=2)
    three_conversations(clock, scheduler)
    leases = [scheduler.acquire(fim(e)) for e in (1, 2, 3)]
    assert {lease_of(d).slot.id for d in leases[:2]} == {A0, A1} and not leases[2].called


def test_chat_keeps_off_a_fim_slot_while_fim_is_in_use_and_takes_it_back_when_fim_is_idle():
    clock = Clock()
    scheduler = make(clock, fim_idle=30.0)
    three_conversations(clock, scheduler)
    scheduler.release(lease_of(scheduler.acquire(fim(1))), OK)  # a#0 holds FIM now
    busy = [lease_of(scheduler.acquire(chat(c))) for c in (2, 3)]  # hits on a#1, a#2
    assert {lease.slot.id for lease in busy} == {A1, A2}
    waiting = scheduler.acquire(chat(9))
    clock.advance(29)
    assert not waiting.called, "chat took the FIM slot while FIM is in use"
    clock.advance(1)
    lease = lease_of(waiting)
    assert lease.slot.id == A0 and scheduler.slot_class(A0) == "chat"


def test_with_fewer_than_three_slots_fim_shares_them():
    clock = Clock()
    scheduler = make(clock, slots=2)
    leases = [lease_of(scheduler.acquire(fim(e))) for e in (1, 2)]
    assert {lease.slot.id for lease in leases} == {A0, SlotId("a", 1)}
    assert scheduler.slot_class(A0) == "any"


# -- side calls ------------------------------------------------------------------


def test_side_call_takes_the_fim_slot_rather_than_a_conversation_just_used():
    # The Claude Code trio: a main turn, a title and a quota call at once, one slot holding FIM.
    clock = Clock()
    scheduler = make(clock)
    three_conversations(clock, scheduler)
    scheduler.release(lease_of(scheduler.acquire(fim(1))), OK)  # a#0 holds FIM
    clock.advance(60)
    main = lease_of(scheduler.acquire(chat(3, blocks=24, tenant="claude")))  # its hit on a#2
    assert main.slot.id == A2 and main.plan.decision is Decision.HIT
    title = lease_of(scheduler.acquire(side_call(70, tenant="claude")))
    scheduler.release(main, OK)  # the main turn ends first
    quota = lease_of(scheduler.acquire(side_call(71, tenant="claude")))
    assert {title.slot.id, quota.slot.id} == {A0, A1}, "a side call evicted the conversation just used"
    next_turn = lease_of(scheduler.acquire(chat(3, blocks=28, tenant="claude")))
    assert next_turn.slot.id == A2 and next_turn.plan.decision is Decision.HIT


def test_side_call_takes_the_fim_slot_an_editor_just_used_rather_than_wait_or_evict_the_main_conversation():
    # The trio while an editor types: the FIM slot was used a moment ago.  It is where side calls run,
    # not a conversation to protect: the quota call takes it at once instead of waiting out
    # --side-call-wait and then taking whichever slot is least recently used (the main conversation's).
    clock = Clock()
    scheduler = make(clock)
    three_conversations(clock, scheduler)
    clock.advance(60)
    main = lease_of(scheduler.acquire(chat(3, blocks=24, tenant="claude")))  # its hit on a#2
    scheduler.release(lease_of(scheduler.acquire(fim(1))), OK)  # the editor: a#0 holds FIM
    clock.advance(0.3)
    title = lease_of(scheduler.acquire(side_call(70, tenant="claude")))
    scheduler.release(main, OK)
    quota = scheduler.acquire(side_call(71, tenant="claude"))
    assert quota.called, "the side call waited although the FIM slot was idle"
    assert {title.slot.id, lease_of(quota).slot.id} == {A0, A1}, "a side call evicted the conversation just used"
    next_turn = lease_of(scheduler.acquire(chat(3, blocks=28, tenant="claude")))
    assert next_turn.slot.id == A2 and next_turn.plan.decision is Decision.HIT


def test_side_call_waits_briefly_rather_than_evict_a_conversation_whose_owner_is_busy():
    clock = Clock()
    scheduler = make(clock, slots=2, side_call_wait=3.0)
    clock.advance(100)
    mine = lease_of(scheduler.acquire(chat(1, tenant="alice")))
    scheduler.release(mine, OK)
    clock.advance(100)  # long ago: by time alone it is fair game
    running = lease_of(scheduler.acquire(chat(2, tenant="alice")))  # alice works on another conversation
    call = scheduler.acquire(side_call(70, tenant="bob"))
    assert not call.called, "evicted a conversation whose owner has a request in flight"
    clock.advance(3.0)
    assert lease_of(call).slot.id == A0  # it waited briefly, then took it
    scheduler.release(running, OK)


def test_side_call_takes_a_conversation_idle_for_a_while_at_once():
    clock = Clock()
    scheduler = make(clock, slots=1)
    scheduler.release(lease_of(scheduler.acquire(chat(1, tenant="alice"))), OK)
    clock.advance(3.0)
    assert scheduler.acquire(side_call(70, tenant="bob")).called


def test_side_call_waits_for_a_conversation_released_just_now_then_takes_a_slot_freed_meanwhile():
    clock = Clock()
    scheduler = make(clock, slots=2)
    first = lease_of(scheduler.acquire(chat(1, tenant="alice")))
    other = lease_of(scheduler.acquire(chat(2, tenant="bob")))
    scheduler.release(first, OK)
    call = scheduler.acquire(side_call(70, tenant="carol"))
    assert not call.called
    scheduler.release(other, attrs.evolve(OK, succeeded=False))  # a#1 COLD now: no eviction needed
    assert lease_of(call).slot.id == A1
