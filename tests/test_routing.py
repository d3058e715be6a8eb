"""
Slot routing against a real llama.cpp server: prefix matches, small requests,
LRU eviction, concurrency.
"""

from __future__ import annotations

import concurrent.futures
import time

from tests.conftest import CONVERSATION_LIMITS, start_proxy
from tests.conversations import User, close_to_new
from proxycache.testing import ProxyProcess, http, open_raw_chat


def test_two_users_on_two_slots_reuse_their_prefix(proxy):
    client = proxy.client()
    alice, bob = User("alice"), User("bob")
    for turn in range(5):
        for user in (alice, bob):
            record = user.turn(client)
            if turn == 0:
                assert record["decision"] == "miss"
                assert record["cache_n"] == 0
            else:
                assert record["decision"] == "hit", record
                assert close_to_new(record), record
    # each kept its own slot
    assert len({r["slot"] for r in alice.turns}) == 1
    assert {r["slot"] for r in alice.turns} != {r["slot"] for r in bob.turns}


def test_small_side_requests_do_not_destroy_hot_slots(llama_factory, tmp_path):
    llama = llama_factory(slots=3)
    proxy = start_proxy(tmp_path, llama)
    try:
        client = proxy.client()
        alice, bob = User("alice"), User("bob")
        for turn in range(3):
            for user in (alice, bob):
                record = user.turn(client)
                if turn:
                    assert record["decision"] == "hit" and close_to_new(record), record
                raw = client.chat.completions.with_raw_response.create(
                    model="any",
                    max_tokens=4,
                    messages=[{"role": "user", "content": f"Title for turn {turn}, five words max."}],
                )
                assert raw.headers["x-proxycache-decision"] in ("small", "hit")
                assert raw.headers["x-proxycache-slot"] not in {r["slot"] for r in alice.turns + bob.turns}
        states = sorted(slot["state"] for slot in proxy.status()["slots"])
        assert states == ["cold", "hot", "hot"]
    finally:
        proxy.stop()


def test_three_users_on_two_slots_evict_the_least_recently_used(llama, tmp_path):
    # no save path known to the proxy and no disk tier help: pure slot LRU
    proxy = start_proxy(tmp_path, llama)
    try:
        client = proxy.client()
        alice, bob, carol = User("alice"), User("bob"), User("carol")
        alice.turn(client)
        bob.turn(client)
        assert alice.turn(client)["decision"] == "hit"  # bob is now least recently used
        carol_first = carol.turn(client)
        assert carol_first["slot"] == bob.turns[0]["slot"]
        assert alice.turn(client)["decision"] == "hit"
    finally:
        proxy.stop()


def _timeline_overlaps(records):
    by_slot = {}
    for r in records:
        by_slot.setdefault(r["slot"], []).append((r["start"], r["end"]))
    for intervals in by_slot.values():
        intervals.sort()
        for (s1, e1), (s2, e2) in zip(intervals, intervals[1:]):
            if s2 < e1 - 1e-6:
                return True
    return False


def test_twenty_concurrent_requests_on_two_slots(proxy, llama):
    users = [User(f"u{i}", context_words=200) for i in range(20)]

    def one(user):
        return user.turn(proxy.client(timeout=120), max_tokens=24)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        records = list(pool.map(one, users))
    assert len(records) == 20
    status = proxy.status()
    assert not any(slot["busy"] for slot in status["slots"])
    assert status["queue_depth"] == 0
    # the proxy's own timeline: never two requests on one slot at once
    timeline = [{"slot": r["slot"], "start": r["started"], "end": r["finished"]} for r in status["recent"][:20]]
    assert not _timeline_overlaps(timeline)
    assert sum(1 for r in status["recent"][:20] if r["wait"] > 0) >= 10  # most had to queue


def test_cancelled_requests_leave_no_lock(proxy, llama):
    """Clients that disconnect while queued or while streaming free everything."""
    sockets = []
    body = (
        b'{"messages":[{"role":"user","content":"'
        + b"tell me a long story " * 30
        + b'"}],"max_tokens":3000,"stream":true,"ignore_eos":true}'
    )
    for _ in range(6):  # 2 run, 4 queue
        sockets.append(open_raw_chat(proxy.port, body))
    time.sleep(0.5)
    assert proxy.status()["queue_depth"] == 4
    for s in sockets:
        s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = proxy.status()
        idle = not any(slot["is_processing"] for slot in llama.slots())
        if idle and status["queue_depth"] == 0 and not any(slot["busy"] for slot in status["slots"]):
            break
        time.sleep(0.05)
    assert status["queue_depth"] == 0
    assert not any(slot["busy"] for slot in status["slots"])
    assert not any(slot["is_processing"] for slot in llama.slots())
    assert (
        http(
            "POST",
            proxy.url + "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )[0]
        == 200
    )


def test_queue_limit_gives_429_with_retry_after(llama, tmp_path):
    proxy = start_proxy(tmp_path, llama, max_queue=1)
    try:
        body = b'{"messages":[{"role":"user","content":"go on"}],"max_tokens":3000,"stream":true,"ignore_eos":true}'
        sockets = [open_raw_chat(proxy.port, body) for _ in range(3)]  # 2 run, 1 queues
        time.sleep(0.5)
        status, headers, error = http(
            "POST", proxy.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}
        )
        assert status == 429
        assert headers["Retry-After"] == "5"
        assert error["error"]["code"] == "queue_full"
        for s in sockets:
            s.close()
    finally:
        proxy.stop()


def test_two_backends_behind_one_proxy(llama_factory, tmp_path):
    first, second = llama_factory(slots=1), llama_factory(slots=1)
    proxy = ProxyProcess(tmp_path, f"{first.url},{second.url}", **CONVERSATION_LIMITS).start()
    try:
        client = proxy.client()
        alice, bob = User("alice"), User("bob")
        for turn in range(3):
            for user in (alice, bob):
                record = user.turn(client)
                if turn:
                    assert record["decision"] == "hit" and close_to_new(record), record
        backends = {s["backend"] for s in proxy.status()["slots"]}
        assert backends == {first.url, second.url}
        # each conversation stayed on its own backend's slot
        assert first.metrics()["llamacpp:prompt_tokens_total"] > 1000  # more than the identity probe
        assert second.metrics()["llamacpp:prompt_tokens_total"] > 1000
    finally:
        proxy.stop()
