"""
A team behind one coding agent, against a real llama.cpp server: every user's
conversation starts with the same long system prompt, then diverges (issue 13).
"""

from __future__ import annotations

import concurrent.futures
from functools import partial
from typing import Any

from tests import conftest
from tests.conversations import User, close_to_new, text
from proxycache.testing import ProxyProcess
from proxycache.testing import wait_for as poll_until

SYSTEM_WORDS = 600  # the shared system prompt: ~37 blocks of 16 words
PRIVATE_WORDS = 40  # each user's own part: a few blocks
LONG_ANSWER = 1500  # tokens: keeps a slot busy while another user arrives


start_proxy = partial(conftest.start_proxy, saves=True)


class TeamUser(User):
    """A user whose system message is the team's prompt, then a private part."""

    def __init__(self, name: str, system: str) -> None:
        super().__init__(name, context_words=PRIVATE_WORDS)
        self.messages[0]["content"] = system + "\n" + self.messages[0]["content"]
        self.system_chars = len(system)

    def long_turn(self, client: Any) -> dict[str, Any]:
        """A turn whose answer takes a while (the slot stays busy meanwhile)."""
        self.messages.append({"role": "user", "content": text(self.rng, 12)})
        raw = client.chat.completions.with_raw_response.create(
            model="any", messages=self.messages, max_tokens=LONG_ANSWER, extra_body={"ignore_eos": True},
        )
        answer = raw.parse().choices[0].message.content or ""
        self.messages.append({"role": "assistant", "content": answer})
        self.turns.append({"answer": answer, "slot": raw.headers["x-proxycache-slot"],
                           "decision": raw.headers["x-proxycache-decision"]})
        return self.turns[-1]


def team_prompt() -> str:
    import random

    return "Team agent instructions. " + text(random.Random("team"), SYSTEM_WORDS)


def busy_slots(proxy: ProxyProcess) -> set[str]:
    return {str(s["slot"]) for s in proxy.status()["slots"] if s["busy"]}


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    return poll_until(predicate, timeout, what)

def test_a_user_sharing_the_system_prompt_does_not_wait_for_a_busy_slot(llama, tmp_path):
    proxy = start_proxy(tmp_path, llama, write_behind=0.2, affinity_wait=60)
    try:
        client = proxy.client(timeout=300)
        system = team_prompt()
        alice, bob = TeamUser("alice", system), TeamUser("bob", system)
        first = alice.turn(client)
        assert first["decision"] == "miss"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            busy = pool.submit(alice.long_turn, client)  # alice's slot busy for a while
            wait_for(lambda: busy_slots(proxy) or busy.done(), what="alice's slot busy")
            assert not busy.done()
            record = bob.turn(client)  # same system prompt, own private part
            # bob did not queue behind alice's busy slot: served elsewhere while she still streams
            assert record["slot"] != first["slot"], record
            assert record["decision"] in ("miss", "restore"), record
            assert not busy.done() and busy_slots(proxy)
            assert busy.result()["decision"] == "hit" and busy.result()["slot"] == first["slot"]
        # alice's next turn still finds her conversation: a hit on her slot (or a restore), not a recompute
        again = alice.turn(client)
        assert again["decision"] in ("hit", "restore") and again["cache_n"] >= alice.system_chars, again
        assert close_to_new(again, slack=64), again
        # and bob's too
        assert bob.turn(client)["decision"] in ("hit", "restore")
    finally:
        proxy.stop()


def test_a_branch_is_served_by_a_fork_of_the_idle_slot_holding_the_shared_prefix(llama, tmp_path):
    # write-behind far away: alice's slot is HOT and unsaved when bob arrives, so the
    # fork saves it first, then restores its file into the free slot
    proxy = start_proxy(tmp_path, llama, write_behind=600)
    try:
        client = proxy.client(timeout=300)
        system = team_prompt()
        alice, bob = TeamUser("alice", system), TeamUser("bob", system)
        first = alice.turn(client)
        assert first["decision"] == "miss"
        assert proxy.status()["disk"]["entries"] == 0
        record = bob.turn(client)
        assert record["decision"] == "restore", record
        assert record["slot"] != first["slot"], record
        # llama.cpp reused the whole shared prompt from the forked file, computed bob's part only
        assert record["restored_tokens"] >= record["cache_n"] >= alice.system_chars, record
        assert record["prompt_n"] < record["cache_n"] / 4, record
        forked = {p.name for p in (tmp_path / "meta").glob("*.meta")}  # alice's entry, saved for the fork
        assert len(forked) == 1
        # alice's slot was not touched: her next turn is a hit there
        again = alice.turn(client)
        assert again["decision"] == "hit" and again["slot"] == first["slot"] and close_to_new(again), again
    finally:
        proxy.stop()  # saves both hot slots
    # bob's save did not replace alice's entry: two conversations, two entries, unless bob's own part (a
    # short tail after the shared prompt its entry covers) was cheaper to compute again than to save (issue 24)
    after = {p.name for p in (tmp_path / "meta").glob("*.meta")}
    assert forked <= after and len(after) <= 2
