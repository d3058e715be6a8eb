"""
FIM slots by demand, against a real llama.cpp server: editor completions take
the coldest slot (the least recently used conversation, saved first), never a
fixed index, and at most C{--fim-slots} slots hold FIM at a time.
"""

from __future__ import annotations

import concurrent.futures

from tests.conftest import SMALL_LIMITS
from tests.conversations import User
from tests.test_infill import infill as editor_infill
from proxycache.testing import ProxyProcess



def editor_files(editor: int) -> list[dict[str, str]]:
    return [{"filename": f"editor{editor}/module.py", "text": f"class Editor{editor}:\n    def run(self): pass\n" * 30}]


def infill(proxy: ProxyProcess, editor: int, line: str) -> tuple[dict[str, str], dict]:
    return editor_infill(proxy, line, extra=editor_files(editor), head="def f():\n", suffix="\n")


def test_a_fim_burst_takes_the_least_recently_used_conversation_not_the_last_slot(llama_factory, tmp_path):
    llama = llama_factory(slots=3)
    proxy = ProxyProcess(tmp_path, llama.url, slot_save_path=str(llama.save_dir), **SMALL_LIMITS).start()
    try:
        client = proxy.client()
        alice, bob, carol = User("alice", context_words=200), User("bob", context_words=200), User("carol", 200)
        for user in (alice, bob, carol):  # carol is the most recent, alice the least
            user.turn(client)
        assert len({u.turns[0]["slot"] for u in (alice, bob, carol)}) == 3
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # four editors at once
            burst = list(pool.map(lambda e: infill(proxy, e, f"    x = {e}\n"), range(4)))
        fim_slots = {headers["X-Proxycache-Slot"] for headers, _ in burst}
        assert fim_slots == {alice.turns[0]["slot"]}, (fim_slots, [u.turns[0]["slot"] for u in (alice, bob, carol)])
        for user in (carol, bob):
            record = user.turn(client)
            assert record["decision"] == "hit", record
        # FIM is in use: alice's next turn goes to a chat slot, not the one FIM holds now
        assert alice.turn(client)["slot"] not in fim_slots
    finally:
        proxy.stop()
