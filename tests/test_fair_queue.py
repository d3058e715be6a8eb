"""
The waiting queue shared fairly between tenants (L{proxycache.slots._fairqueue}),
on a L{Clock}: no reactor, no network.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from proxycache.routing import DiskMatch, Fingerprint, Request
from proxycache.slots import Lease, Outcome, QueueFull, Scheduler, TenantLimit
from tests.test_scheduler import lease_of

OK = Outcome(succeeded=True, cache_n=3, prompt_n=5, predicted_n=7)


def request(tenant: str, conversation: int, blocks: int = 20) -> Request:
    fp = Fingerprint(tuple(conversation * 10**6 + i for i in range(blocks)), blocks * 100, blocks * 16)
    return Request(fp, small=False, tenant=tenant)


def make(slots: int = 2, **options) -> Scheduler:
    scheduler = Scheduler(Clock(), min_ratio=0.5, affinity_wait=0.0, max_queue=100, **options)
    scheduler.set_backend_slots("a", slots)
    return scheduler


def serve(scheduler: Scheduler, running: Lease, waiting: list[Deferred[Lease]], turns: int) -> list[Deferred[Lease]]:
    """Release the running lease C{turns} times; the waiters granted, in the order they got the slot."""
    served: list[Deferred[Lease]] = []
    lease = running
    for _ in range(turns):
        scheduler.release(lease, OK)
        (d,) = [d for d in waiting if d.called and d not in served]
        served.append(d)
        lease = lease_of(d)
    return served


def test_another_tenants_request_is_served_at_the_next_free_slot_not_after_a_backlog():
    scheduler = make(2)
    running = [lease_of(scheduler.acquire(request("A", c))) for c in (1, 2)]
    flood = [scheduler.acquire(request("A", c)) for c in range(3, 19)]
    interactive = scheduler.acquire(request("B", 100))
    assert scheduler.queue_depth == 17
    scheduler.release(running[0], OK)
    assert interactive.called, "B waits behind A's backlog"
    assert not any(d.called for d in flood)


def test_fifo_switch_keeps_the_old_order():
    scheduler = make(2, fair=False)
    running = [lease_of(scheduler.acquire(request("A", c))) for c in (1, 2)]
    flood = [scheduler.acquire(request("A", c)) for c in range(3, 19)]
    interactive = scheduler.acquire(request("B", 100))
    scheduler.release(running[0], OK)
    assert flood[0].called and not interactive.called


def test_one_tenants_requests_stay_in_arrival_order():
    scheduler = make(1)
    running = lease_of(scheduler.acquire(request("A", 1)))
    mine = [scheduler.acquire(request("A", c, blocks=60 - 10 * c)) for c in (2, 3, 4)]  # later ones cheaper
    lease = running
    for d in mine:
        scheduler.release(lease, OK)
        assert d.called
        lease = lease_of(d)


def test_turns_alternate_between_tenants_with_equal_costs():
    scheduler = make(1)
    running = lease_of(scheduler.acquire(request("A", 1)))
    a = [scheduler.acquire(request("A", c)) for c in (2, 3, 4)]
    b = [scheduler.acquire(request("B", c)) for c in (12, 13, 14)]
    served = serve(scheduler, running, a + b, 6)
    assert ["A" if d in a else "B" for d in served] == ["B", "A", "B", "A", "B", "A"]


def test_huge_prompts_do_not_buy_equal_turns():
    # A sends prompts ten times the size of B's: B gets several turns per A turn.
    scheduler = make(1)
    running = lease_of(scheduler.acquire(request("X", 1)))
    a = [scheduler.acquire(request("A", c, blocks=200)) for c in (2, 3)]
    b = [scheduler.acquire(request("B", c, blocks=20)) for c in range(10, 16)]
    served = serve(scheduler, running, a + b, 5)
    assert sum(d in a for d in served) == 1, "equal turns for a prompt ten times larger"


def test_an_operator_weight_gives_a_tenant_more_turns():
    scheduler = make(1, tenant_weights={"A": 3.0})
    running = lease_of(scheduler.acquire(request("X", 1)))
    a = [scheduler.acquire(request("A", c)) for c in range(2, 8)]
    b = [scheduler.acquire(request("B", c)) for c in range(10, 16)]
    served = serve(scheduler, running, a + b, 4)
    assert sum(d in a for d in served) == 3


def test_in_flight_limit_leaves_slots_to_other_tenants():
    scheduler = make(3, tenant_max_in_flight=2)
    first = [scheduler.acquire(request("A", c)) for c in (1, 2, 3)]
    assert [d.called for d in first] == [True, True, False]  # a slot stays idle for others
    other = scheduler.acquire(request("B", 9))
    assert other.called
    scheduler.release(lease_of(first[0]), OK)
    assert first[2].called


def test_queued_limit_refuses_with_tenant_limit_and_leaves_others_alone():
    scheduler = make(1, tenant_max_queued=2)
    lease_of(scheduler.acquire(request("A", 1)))
    queued = [scheduler.acquire(request("A", c)) for c in (2, 3)]
    with pytest.raises(TenantLimit) as refused:
        scheduler.acquire(request("A", 4))
    assert isinstance(refused.value, QueueFull) and "A" in str(refused.value)
    scheduler.acquire(request("B", 5))  # another tenant still queues
    assert scheduler.queue_depth == 3 and not any(d.called for d in queued)


def test_a_cancelled_waiter_gives_its_share_back():
    scheduler = make(1)
    running = lease_of(scheduler.acquire(request("X", 1)))
    big = scheduler.acquire(request("A", 2, blocks=400))
    big.cancel()
    big.addErrback(lambda f: None)
    a = scheduler.acquire(request("A", 3))
    b = scheduler.acquire(request("B", 4))
    scheduler.release(running, OK)
    assert a.called and not b.called  # A's cancelled huge prompt cost it nothing


def test_a_conversation_that_comes_back_from_disk_costs_its_restore_not_its_context():
    # B's conversations were saved when the flood took their slots: each costs a restore and a
    # short tail, not the whole context again, so B is not charged like A's new huge prompts.
    def saved(request: Request) -> DiskMatch | None:
        if request.tenant != "B":
            return None
        return DiskMatch("saved" + str(request.fingerprint.blocks[0]), "a", common_blocks=190, similarity=0.95)

    scheduler = make(1, disk_lookup=saved)
    running = lease_of(scheduler.acquire(request("X", 1)))
    a = [scheduler.acquire(request("A", c, blocks=200)) for c in (2, 3, 4)]
    b = [scheduler.acquire(request("B", c, blocks=200)) for c in range(10, 16)]
    served = serve(scheduler, running, a + b, 5)
    assert sum(d in a for d in served) == 1, "a restore charged as the whole context"
