"""
The decision reported once a request ends follows what llama.cpp did (its
C{timings.cache_n}), not only what the proxy planned: in the header of a whole
answer, the log line and C{/status}.  (The lifecycle soak once saw a 'hit'
with no cached tokens and a 'miss' with 3,441.)
"""

from __future__ import annotations

import json

from proxycache.routing import Decision, Fingerprint, Plan, Request, SlotId, carried_out
from tests.fakes import InProcessDaemon, chat_response, parse_response

SYSTEM = {"role": "system", "content": "You review the slot scheduler of a caching proxy. " * 40}


def chat(*questions: str, stream: bool = False) -> bytes:
    messages = [SYSTEM] + [{"role": "user", "content": q} for q in questions]
    return json.dumps({"messages": messages, "max_tokens": 2, "stream": stream}).encode()


def answered(daemon: InProcessDaemon, body: bytes, timings: dict) -> tuple[str, str]:
    """The decision the header and /status report for C{body}, llama.cpp answering with C{timings}."""
    answer = daemon.send("POST", "/v1/chat/completions", body)
    daemon.backend.pending.pop(0).callback(chat_response(timings))
    status, headers, _ = parse_response(answer.value())
    assert status == 200
    return headers["x-proxycache-decision"], daemon.status()["recent"][0]["decision"]


def test_a_hit_llama_cpp_computed_from_scratch_is_reported_a_miss():
    daemon = InProcessDaemon()
    assert answered(daemon, chat("first question"), {"cache_n": 0, "prompt_n": 600}) == ("miss", "miss")
    # planned as a hit on the slot that holds the conversation; its cache was gone (cleared behind our back)
    assert answered(daemon, chat("first question", "second"), {"cache_n": 0, "prompt_n": 620}) == ("miss", "miss")
    assert answered(daemon, chat("first question", "second", "third"), {"cache_n": 610, "prompt_n": 20}) == (
        "hit", "hit"
    )


def test_a_miss_on_which_llama_cpp_reused_most_of_the_prompt_is_reported_a_hit():
    daemon = InProcessDaemon()
    # planned as a miss (nothing known of it); llama.cpp held it all the same
    assert answered(daemon, chat("a question"), {"cache_n": 3441, "prompt_n": 30}) == ("hit", "hit")
    assert daemon.status()["totals"]["by_decision"] == {"hit": 1}


def test_the_rule():
    request = Request(Fingerprint((1, 2, 3, 4), 400, 64), small=False)
    small = Request(Fingerprint((1,), 10, 2), small=True)
    hit = Plan(Decision.HIT, SlotId("b", 0), common_blocks=3, similarity=0.75)
    miss = Plan(Decision.MISS, SlotId("b", 0), common_blocks=0, similarity=0.0)
    assert carried_out(Decision.HIT, hit, request, 300, 100) is Decision.HIT
    assert carried_out(Decision.HIT, hit, request, 0, 400) is Decision.MISS
    assert carried_out(Decision.RESTORE, hit, request, 10, 390) is Decision.MISS
    assert carried_out(Decision.MISS, hit, request, 0, 400) is Decision.MISS  # a restore that failed, recomputed
    assert carried_out(Decision.MISS, miss, request, 3441, 30) is Decision.HIT
    assert carried_out(Decision.MISS, miss, request, 200, 30) is Decision.MISS  # a few tokens: a template's start
    assert carried_out(Decision.SMALL, miss, small, 0, 10) is Decision.SMALL
    assert carried_out(Decision.HIT, hit, small, 0, 400) is Decision.SMALL


def test_against_llama_cpp_the_decision_follows_its_timings(llama_factory, tmp_path):
    """
    A real llama.cpp server: a slot erased behind the proxy's back makes its planned hit a recomputation,
    and a proxy started afresh (its slot map empty) plans a miss where llama.cpp still holds the prompt.
    """
    from tests.conftest import start_proxy
    from tests.conversations import User

    llama = llama_factory()  # 2 slots: a proxy's weights probe at start takes the one llama.cpp used least
    proxy = start_proxy(tmp_path / "first", llama)
    ana = User("ana")
    try:
        assert ana.turn(proxy.client())["decision"] in ("miss", "small")
        status, reply = llama.call("POST", "/slots/0?action=erase", {})
        assert status == 200 and reply["n_erased"] > 1000
        record = ana.turn(proxy.client())  # planned as a hit: llama.cpp computed it all
        assert record["cache_n"] < 100 and record["decision"] == "miss"
        assert proxy.status()["recent"][0]["decision"] == "miss"
    finally:
        proxy.stop()
    proxy = start_proxy(tmp_path / "second", llama)  # knows nothing of slot 0
    try:
        record = ana.turn(proxy.client())  # planned as a miss on slot 0: llama.cpp reused the conversation
        assert record["slot"] == "0"
        assert record["cache_n"] > 1000 and record["decision"] == "hit"
        recent = proxy.status()["recent"][0]
        assert (recent["decision"], recent["cache_n"]) == ("hit", record["cache_n"])
    finally:
        proxy.stop()
