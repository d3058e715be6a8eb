"""
Siblings off one context, against a real llama.cpp server (issue 24): one large
context, then requests that share it and differ in the last user message (a
regenerate, many questions against one repository context).  llama-server alone
reuses the shared prefix in place; so must the proxy, with no save or restore
on a sibling's way.
"""

from __future__ import annotations

import random
from typing import Any

from tests.conversations import text
from proxycache.testing import ProxyProcess, wait_for

LIMITS = dict(min_prefix_chars=1000, min_prefix_words=150, min_prefix_blocks=8)


def ask(client: Any, context: str, question: str) -> dict[str, Any]:
    raw = client.chat.completions.with_raw_response.create(
        model="any", max_tokens=4,
        messages=[{"role": "system", "content": context}, {"role": "user", "content": question}],
    )
    timings = raw.parse().model_extra["timings"]
    return {
        "decision": raw.headers["x-proxycache-decision"],
        "path_ms": float(raw.headers["x-proxycache-path-ms"]),
        "save_ms": float(raw.headers["x-proxycache-save-ms"]),
        "restore_ms": float(raw.headers["x-proxycache-restore-ms"]),
        "queue_wait_ms": float(raw.headers["x-proxycache-queue-wait-ms"]),
        "save_wait_ms": float(raw.headers["x-proxycache-save-wait-ms"]),
        "slot": raw.headers["x-proxycache-slot"],
        "cache_n": timings["cache_n"],
        "prompt_n": timings["prompt_n"],
    }


def test_siblings_on_one_slot_reuse_the_shared_context_in_place(llama_factory, tmp_path):
    llama = llama_factory(slots=1)
    proxy = ProxyProcess(
        tmp_path, llama.url, slot_save_path=str(llama.save_dir), write_behind=0.2, **LIMITS
    ).start()
    try:
        client = proxy.client(timeout=300)
        rng = random.Random("siblings")
        context = "Repository context. " + text(rng, 600)
        first = ask(client, context, "What does the parser do? " + text(rng, 10))
        assert first["decision"] == "miss"
        # the first sibling is saved in the background (write-behind): a disk entry holds the context
        wait_for(lambda: proxy.status()["disk"]["saves"] == 1, 30, "the write-behind save")
        for n in range(4):  # back to back, each another question against the same context
            sibling = ask(client, context, f"Question {n}: " + text(rng, 10))
            # reused in place: no restore of what the slot holds, no save of the previous sibling's short tail
            assert sibling["decision"] == "hit", sibling
            assert sibling["cache_n"] >= len(context) * 0.9, sibling
            assert sibling["path_ms"] == 0, sibling
        disk = proxy.status()["disk"]
        assert (disk["saves"], disk["restores"]) == (1, 0), disk
    finally:
        proxy.stop()  # saves what is worth saving: not the last sibling's short tail either
    assert len(list((tmp_path / "meta").glob("*.meta"))) == 1


def test_siblings_on_two_slots_back_to_back_reuse_the_shared_context_in_place(llama_factory, tmp_path):
    # llama-server alone with 2 slots picks the most similar slot and reuses the context in place,
    # losing the previous sibling's short tail.  So does the proxy: no fork of that slot into the free
    # one, no save of it first.  Write-behind far off: nothing is saved (or measured) in the background.
    llama = llama_factory(slots=2)
    proxy = ProxyProcess(tmp_path, llama.url, slot_save_path=str(llama.save_dir), write_behind=600, **LIMITS).start()
    try:
        client = proxy.client(timeout=300)
        rng = random.Random("two slots")
        context = "Repository context. " + text(rng, 1000)
        first = ask(client, context, "Summarize the repository. " + text(rng, 10))
        assert first["decision"] == "miss"
        for n in range(4):
            sibling = ask(client, context, f"Question {n}: " + text(rng, 10))
            assert sibling["decision"] == "hit" and sibling["slot"] == first["slot"], sibling
            assert (sibling["path_ms"], sibling["save_ms"], sibling["restore_ms"]) == (0, 0, 0), sibling
            # llama.cpp computed the new question only
            assert sibling["cache_n"] >= len(context) * 0.95 and sibling["prompt_n"] < 200, sibling
        disk = proxy.status()["disk"]
        assert (disk["saves"], disk["restores"]) == (0, 0), disk
    finally:
        proxy.stop()


def test_the_save_and_restore_on_a_requests_path_are_shown(llama_factory, tmp_path):
    llama = llama_factory(slots=1)
    # write-behind far off: the save of ana's slot happens on ben's way
    proxy = ProxyProcess(tmp_path, llama.url, slot_save_path=str(llama.save_dir), write_behind=600, **LIMITS).start()
    try:
        client = proxy.client(timeout=300)
        rng = random.Random("path")
        ana, ben = "Ana's project. " + text(rng, 500), "Ben's project. " + text(rng, 500)
        assert ask(client, ana, "hi")["path_ms"] == 0
        raw = client.chat.completions.with_raw_response.create(
            model="any", max_tokens=4, messages=[{"role": "system", "content": ben}, {"role": "user", "content": "hi"}])
        assert raw.headers["x-proxycache-decision"] == "miss"
        assert int(raw.headers["x-proxycache-save-ms"]) > 0 and int(raw.headers["x-proxycache-restore-ms"]) == 0
        assert int(raw.headers["x-proxycache-path-ms"]) >= int(raw.headers["x-proxycache-save-ms"])
        back = ask(client, ana, "hi again")  # ben is saved on the way, ana restored
        assert back["decision"] == "restore" and back["path_ms"] > 0, back
        recent = proxy.status()["recent"]
        assert recent[0]["path_ms"] > 0 and recent[0]["decision"] == "restore"
        assert proxy.metrics()["proxycache_path_seconds_count"] == 3
    finally:
        proxy.stop()


def test_while_a_branch_streams_the_idle_slot_of_another_branch_is_saved(llama_factory, tmp_path):
    # Write-behind far off and no eviction (free slots: the backend is not contended): only the rule
    # "a request that branched pre-saves the idle slots holding its prefix" saves carl's slot before
    # a later branch needs it.
    llama = llama_factory(slots=3)
    proxy = ProxyProcess(tmp_path, llama.url, slot_save_path=str(llama.save_dir), write_behind=600, **LIMITS).start()
    try:
        client = proxy.client(timeout=300)
        rng = random.Random("team")
        system = "Team agent instructions. " + text(rng, 600)
        alice, carl, dan = (system + f"\n{name}'s files. " + text(rng, 500) for name in ("Alice", "Carl", "Dan"))
        assert ask(client, alice, "What does it do?")["decision"] == "miss"
        # carl forks alice's slot: alice saved on his way, her file restored into a free slot
        assert ask(client, carl, "What does it do?")["decision"] == "restore"
        assert proxy.status()["disk"]["saves"] == 1
        # dan starts from alice's saved entry (the shared prompt) in the last free slot; while his
        # answer streams, carl's slot, idle and holding another branch of that prompt, is saved
        stream = client.chat.completions.with_raw_response.create(
            model="any", max_tokens=8, stream=True,
            messages=[{"role": "system", "content": dan}, {"role": "user", "content": "What does it do?"}])
        assert stream.headers["x-proxycache-decision"] == "restore"
        assert list(stream.parse())
        wait_for(lambda: proxy.status()["disk"]["saves"] == 2, 30, "the save of carl's slot")
        assert [s["saved"] for s in sorted(proxy.status()["slots"], key=lambda s: s["slot"])] == [True, True, False]
    finally:
        proxy.stop()
