"""
--isolate-tenants: no prefix reuse, fork or restore across tenants.  The
scheduler and the index in-process; the erase that keeps llama.cpp from
reusing another tenant's prefix against a real llama.cpp server.
"""

from __future__ import annotations

import openai
from twisted.internet.task import Clock

from proxycache.cache import MetaEntry
from proxycache.routing import Decision, Request, SlotId
from proxycache.slots import Outcome, Scheduler
from proxycache.testing import ProxyProcess
from tests.conversations import User
from tests.fakes import fp
from tests.test_disk import entry, index_of
from tests.test_scheduler import lease_of

OK = Outcome(succeeded=True, cache_n=3, prompt_n=5, predicted_n=7)


def request(blocks: int, tenant: str) -> Request:
    return Request(fp(blocks, base=1), small=False, tenant=tenant)


def make(isolate: bool, slots: int = 2) -> Scheduler:
    scheduler = Scheduler(Clock(), min_ratio=0.5, affinity_wait=5.0, max_queue=10, isolate_tenants=isolate)
    scheduler.set_backend_slots("a", slots)
    return scheduler


def test_another_tenants_prefix_is_not_reused_nor_waited_for():
    for isolate, expected in ((False, Decision.HIT), (True, Decision.MISS)):
        scheduler = make(isolate)
        scheduler.release(lease_of(scheduler.acquire(request(10, "alice"))), OK)
        lease = lease_of(scheduler.acquire(request(14, "bob")))  # bob's prompt extends alice's
        assert lease.plan.decision is expected, isolate
    # with isolation, alice's own follow-up still hits; bob does not wait for alice's busy slot
    scheduler = make(True)
    first = lease_of(scheduler.acquire(request(10, "alice")))
    assert lease_of(scheduler.acquire(request(14, "bob"))).slot.id == SlotId("a", 1)
    scheduler.release(first, OK)
    assert lease_of(scheduler.acquire(request(16, "alice"))).plan.decision is Decision.HIT


def test_entries_are_found_for_their_own_tenant_only():
    saved = entry(fp(8), tenant="key1")
    index = index_of(saved)
    assert index.best(fp(10), saved.model, ["a"], 0.0) is not None
    assert index.best(fp(10), saved.model, ["a"], 0.0, "key1") is not None
    assert index.best(fp(10), saved.model, ["a"], 0.0, "key2") is None
    assert MetaEntry.from_json(saved.to_json()).tenant == "key1"


KEYS = ("sk-alice", "sk-bob")


def test_isolated_tenants_share_no_cached_prefix_on_a_real_server(llama_factory, tmp_path):
    llama = llama_factory(slots=1)
    proxy = ProxyProcess(
        tmp_path, llama.url, api_keys=",".join(KEYS), env={"ISOLATE_TENANTS": "1"}, slot_save_path=str(llama.save_dir),
        health_interval=60, min_prefix_chars=10, min_prefix_words=5, min_prefix_blocks=1,
    ).start()
    try:
        alice_client, bob_client = (openai.OpenAI(base_url=proxy.url + "/v1", api_key=k, max_retries=0) for k in KEYS)
        alice = User("alice", context_words=700)  # long enough that a restore clearly pays
        alice.turn(alice_client)
        # bob sends alice's very conversation: on the one slot, llama.cpp would reuse all of it
        bob = User("alice", context_words=700)
        record = bob.turn(bob_client)
        assert record["cache_n"] == 0 and record["decision"] == "miss", record
        # alice's own conversation came back from disk (saved before bob took the slot), not computed again
        record = alice.turn(alice_client)
        assert record["decision"] == "restore" and record["cache_n"] > 300, record
    finally:
        proxy.stop()


# -- each tenant's share of the disk budget ----------------------------------------


def test_a_tenant_over_its_disk_share_loses_its_own_oldest_entries_only():
    from proxycache.cache._shares import over_tenant_share

    team = entry(fp(8, base=1), tenant="key2", bytes=100, last_used=1.0)
    flood = [entry(fp(8, base=10 + n), tenant="key1", bytes=100, last_used=2.0 + n) for n in range(6)]
    pinned = entry(fp(8, base=99), tenant="key1", bytes=100, last_used=0.5, pinned=True)
    victims = over_tenant_share([team, pinned, *flood], 1000, 0.5, frozenset())
    # key1 holds 700 of a 1000 budget: its two oldest unpinned entries go, key2's stays
    assert victims == flood[:2]
    assert over_tenant_share([team, *flood], 1000, 1.0) == []  # 1: no limit
    assert over_tenant_share([team, *flood], 0, 0.5) == []  # no budget: no share either


def saved_tenants(meta_dir) -> list[str]:
    import json

    return sorted(json.loads(path.read_text())["tenant"] for path in meta_dir.glob("*.meta"))


def test_one_tenants_many_conversations_do_not_push_out_anothers_on_a_real_server(llama_factory, tmp_path):
    llama = llama_factory(slots=1)
    proxy = ProxyProcess(
        tmp_path, llama.url, api_keys=",".join(KEYS), slot_save_path=str(llama.save_dir), health_interval=60,
        max_cache_bytes=3_000_000, tenant_disk_share=0.5, min_prefix_chars=10, min_prefix_words=5,
        min_prefix_blocks=1,
    ).start()
    try:
        alice_client, bob_client = (openai.OpenAI(base_url=proxy.url + "/v1", api_key=k, max_retries=0) for k in KEYS)
        bob = User("bob", context_words=300)
        bob.turn(bob_client)
        for n in range(5):  # alice's agent: conversation after conversation, each evicting the last (saved)
            User(f"alice{n}", context_words=300).turn(alice_client)
        tenants = saved_tenants(tmp_path / "meta")
        assert "key2" in tenants, tenants  # bob's conversation is still on disk
        assert tenants.count("key1") < 3, tenants  # alice keeps to her half of the budget
    finally:
        proxy.stop()
