"""
A Claude Code-shaped trio against a real llama.cpp server (3 slots, one
holding an editor's FIM, with the editor idle or typing all along): the main
turn, a title call and a quota call at once.  The side calls must not cost the main conversation its slot: its next
turn stays a hit.
"""

from __future__ import annotations

import concurrent.futures
import random

import anthropic

from tests.conftest import CONVERSATION_LIMITS
from tests.conversations import text
from tests.test_fim_slots import infill
from proxycache.testing import ProxyProcess
from proxycache.testing import wait_for
from proxycache.testing.editor import Editor

# A main conversation is large, a title or quota call small (the defaults scaled to the test model).
SYSTEM = "You are Claude Code. " + text(random.Random("system"), 600)
USER_ID = "user_" + "ab" * 32 + "_account__session_1234"


def turn(client: anthropic.Anthropic, messages: list, **extra) -> tuple[str, str]:
    raw = client.messages.with_raw_response.create(
        model="any", max_tokens=4, system=SYSTEM, messages=messages, metadata={"user_id": USER_ID}, **extra
    )
    message = raw.parse()
    answer = "".join(block.text for block in message.content if block.type == "text")
    messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return raw.headers["x-proxycache-decision"], raw.headers["x-proxycache-slot"]


def test_claude_code_trio_keeps_the_main_conversation_a_hit(llama_factory, tmp_path):
    llama = llama_factory(slots=3)
    proxy = ProxyProcess(
        tmp_path, llama.url, slot_save_path=str(llama.save_dir), health_interval=60, **CONVERSATION_LIMITS
    ).start()
    try:
        client = anthropic.Anthropic(base_url=proxy.url, api_key="none", max_retries=0)
        openai_client = proxy.client()
        infill(proxy, 0, "    x = 1\n")  # an editor: one slot holds FIM
        main = [{"role": "user", "content": "Refactor the scheduler. " + text(random.Random("main"), 40)}]
        turn(client, main)
        busy_before = {s["slot"] for s in proxy.status()["slots"] if s["busy"]}
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            # The title call outlasts the main turn (its answer is long): the quota call must not wait for
            # a slot and then take the main conversation's, just released.
            title = pool.submit(
                openai_client.chat.completions.create, model="any", max_tokens=800, extra_body={"ignore_eos": True},
                messages=[{"role": "user", "content": "Write a 5-10 word title for: refactor the scheduler"}],
            )
            wait_for(lambda: len([s for s in proxy.status()["slots"] if s["busy"]]) > len(busy_before),
                     30, "the title call running")
            main.append({"role": "user", "content": "Go on. " + text(random.Random("turn2"), 12)})
            main_turn = pool.submit(turn, client, main)
            quota = pool.submit(
                client.messages.with_raw_response.create, model="any", max_tokens=1,
                messages=[{"role": "user", "content": "quota"}], metadata={"user_id": USER_ID},
            )
            decision, main_slot = main_turn.result(timeout=120)
            assert decision == "hit"
            quota_reply = quota.result(timeout=120)
            assert quota_reply.headers["x-proxycache-slot"] != main_slot
            title.result(timeout=300)
        main.append({"role": "user", "content": "And the tests? " + text(random.Random("turn3"), 12)})
        decision, slot = turn(client, main)
        assert (decision, slot) == ("hit", main_slot)
    finally:
        proxy.stop()


def test_claude_code_trio_while_an_editor_types_keeps_the_main_conversation_a_hit(llama_factory, tmp_path):
    # 3 slots: the main conversation's, the one the editor's completions hold (one every 0.4 s all along),
    # and a free one.  The title and quota calls run beside them; nothing evicts the main conversation,
    # and no completion takes its slot.  (The wait of the side calls is measured in bench/side_calls.py.)
    llama = llama_factory(slots=3)
    proxy = ProxyProcess(
        tmp_path, llama.url, slot_save_path=str(llama.save_dir), health_interval=60, **CONVERSATION_LIMITS
    ).start()
    editor = Editor(proxy.url, every=0.4)
    try:
        client = anthropic.Anthropic(base_url=proxy.url, api_key="none", max_retries=0)
        main = [{"role": "user", "content": "Refactor the scheduler. " + text(random.Random("main"), 40)}]
        turn(client, main)
        editor.start()
        wait_for(lambda: len(editor.done) >= 2, 60, "the editor's first completions")
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            main.append({"role": "user", "content": "Go on. " + text(random.Random("turn2"), 12)})
            main_turn = pool.submit(turn, client, main)
            side_calls = [
                pool.submit(
                    client.messages.with_raw_response.create, model="any", max_tokens=tokens,
                    messages=[{"role": "user", "content": prompt}], metadata={"user_id": USER_ID},
                )
                for prompt, tokens in (("Write a 5-10 word title for: refactor the scheduler", 12), ("quota", 1))
            ]
            decision, main_slot = main_turn.result(timeout=120)
            assert decision == "hit"
            for call in side_calls:
                assert call.result(timeout=120).headers["x-proxycache-slot"] != main_slot
        served = len(editor.done)
        wait_for(lambda: len(editor.done) > served, 60, "the editor served after the trio")
        main.append({"role": "user", "content": "And the tests? " + text(random.Random("turn3"), 12)})
        decision, slot = turn(client, main)
        assert (decision, slot) == ("hit", main_slot)
    finally:
        editor.stop()
        proxy.stop()
    assert [c.status for c in editor.done] == [200] * len(editor.done)
    assert main_slot not in {c.slot for c in editor.done}, "an editor's completion took the main conversation's slot"
