"""
Editor completions (/infill, llama.vscode's request shape) keep to their own
slot: they reuse their context request after request and never evict a chat
conversation's hot slot.
"""

from __future__ import annotations

from tests.conftest import SMALL_LIMITS
from tests.conversations import User
from proxycache.testing import ProxyProcess, http
from proxycache.testing.editor import FILES, infill_body


def infill(proxy, prefix: str, extra=FILES, head: str = "def acquire(self):\n", suffix: str = "\n\n"):
    """An editor's FIM request (L{infill_body}), answered."""
    status, headers, answer = http("POST", proxy.url + "/infill", infill_body(prefix, extra, head, suffix))
    assert status == 200, answer
    return headers, answer


def test_infill_reuses_its_context_and_spares_chat_slots(llama_factory, tmp_path):
    llama = llama_factory(slots=3)
    proxy = ProxyProcess(tmp_path, llama.url, **SMALL_LIMITS).start()
    try:
        client = proxy.client()
        headers, _ = infill(proxy, "    x = 1\n")
        fim_slot = headers["X-Proxycache-Slot"]
        alice, bob = User("alice", context_words=200), User("bob", context_words=200)
        for user in (alice, bob):
            user.turn(client)
        for i in range(4):
            headers, answer = infill(proxy, f"    x = {i}\n    y = {i * 2}\n")
            assert headers["X-Proxycache-Slot"] == fim_slot
            assert headers["X-Proxycache-Decision"] == "hit"
            assert answer["timings"]["cache_n"] > 300  # the files in input_extra were not computed again
        for user in (alice, bob):
            record = user.turn(client)
            assert record["decision"] == "hit" and record["slot"] != fim_slot, record
    finally:
        proxy.stop()
