"""
A real llama.cpp slot busy only with a background save, as an operator and a
client see it: C{/status} and C{/metrics} say "saving" while the write-behind
runs, and a sibling that waits for it says so in its headers.  The save is
held at a relay in front of llama-server until the test has looked, so that
what is seen does not depend on how long the write takes.
"""

from __future__ import annotations

import random
import threading
from typing import Any

from proxycache.testing import ProxyProcess, ReplyTap, wait_for
from tests.conversations import text
from tests.test_siblings import LIMITS, ask

def test_status_shows_a_slot_saving_and_a_sibling_the_wait_for_it(llama_factory, tmp_path):
    llama = llama_factory(slots=2)
    gate = ReplyTap(llama.url)  # a save request is held there until the test has looked
    saving, opened = gate.hold_requests(b"action=save")
    proxy = ProxyProcess(
        tmp_path, gate.url, slot_save_path=str(llama.save_dir), write_behind=0.2, affinity_wait=300, **LIMITS
    ).start()
    try:
        client = proxy.client(timeout=300)
        rng = random.Random("saving visible")
        context = "Repository context. " + text(rng, 600)
        first = ask(client, context, "What does the parser do? " + text(rng, 10))
        assert first["decision"] == "miss"
        assert saving.wait(60), "no write-behind save of the context's slot"
        # the write-behind holds the slot now, until llama-server has written the file
        slots = {str(s["slot"]): s for s in proxy.status()["slots"]}
        assert (slots[first["slot"]]["busy"], slots[first["slot"]]["saving"]) == (True, True), slots
        assert [s["saving"] for n, s in slots.items() if n != first["slot"]] == [False], slots
        assert proxy.status()["backends"][0]["saving"] == 1
        assert proxy.metrics()["proxycache_slots_saving"] == 1

        answers: list[dict[str, Any]] = []
        sibling = threading.Thread(target=lambda: answers.append(ask(client, context, "And the lexer? ")))
        sibling.start()
        try:
            # the sibling waits for the slot holding its context instead of computing it on the free one
            wait_for(lambda: proxy.status()["queue_depth"] == 1, 30, "the sibling queued behind the save")
        finally:
            opened.set()
            sibling.join(300)
        (answer,) = answers
        assert answer["decision"] == "hit" and answer["slot"] == first["slot"], answer
        save_wait = answer["save_wait_ms"]
        assert save_wait > 0, answer
        assert answer["queue_wait_ms"] >= save_wait, answer
        parts = save_wait + answer["save_ms"] + answer["restore_ms"]
        assert abs(answer["path_ms"] - parts) <= 1, answer  # each rounded to the ms on its own
        status = proxy.status()
        assert not any(s["saving"] for s in status["slots"]), status["slots"]
        assert status["disk"]["saves"] == 1
        assert status["recent"][0]["save_wait_ms"] == save_wait and status["recent"][0]["path_ms"] >= save_wait
        assert proxy.metrics()["proxycache_slots_saving"] == 0
    finally:
        opened.set()
        proxy.stop()
        gate.close()
