"""
How long C{fingerprint()} takes on a large conversation.

Builds a deterministic ~60k-token chat (30 messages of prose and code, ~240 KB
of text, ~40k words) and prints the median of 20 runs in milliseconds, once
with some non-ASCII text (accents, CJK, emoji: the slower path) and once with
the same conversation reduced to ASCII.

    python bench/fingerprint_speed.py [--runs N] [--kb SIZE] [--block-words N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxycache.routing import conversation_text, fingerprint  # noqa: E402

PROSE = (
    "The proxy keeps a map from each llama.cpp slot to the prompt it last held, and "
    "routes a follow-up turn to the slot whose cached prefix matches best; when no slot "
    "matches, it may restore a saved cache from disk — or évaluer the cost of a cold start. "
    "Ça marche bien, même avec des caractères accentués, 日本語のテキスト, and emoji 🚀."
).split()

CODE = '''\
def handle(self, request: dict[str, Any]) -> Deferred:
    """Route C{request} to the best slot."""
    for index, slot in enumerate(self.slots):
        if slot.state is SlotState.HOT and slot.fingerprint.blocks:
            score = request.fingerprint.similarity(slot.fingerprint)
            candidates.append((score, -slot.last_used, index))
    candidates.sort(reverse=True)
    return self.acquire(candidates[0][2] if candidates else None)
'''.split("\n")


def message_text(rng: random.Random, target_chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < target_chars:
        if rng.random() < 0.2:
            block = "```python\n" + "\n".join(rng.sample(CODE, len(CODE))) + "\n```"
        else:
            block = " ".join(rng.choice(PROSE) for _ in range(rng.randint(20, 80))) + "."
        out.append(block)
        size += len(block) + 2
    return "\n\n".join(out)


def conversation(total_kb: int = 240, messages: int = 30, seed: int = 1, ascii: bool = False) -> dict:
    rng = random.Random(seed)
    per_message = total_kb * 1000 // messages
    body = [{"role": "system", "content": "You are a helpful coding assistant."}]
    for i in range(messages):
        role = "user" if i % 2 == 0 else "assistant"
        content = message_text(rng, per_message)
        if ascii:
            content = content.encode("ascii", "ignore").decode()
        body.append({"role": role, "content": content})
    return {"model": "m", "messages": body}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--kb", type=int, default=240, help="approximate text size in KB")
    parser.add_argument("--block-words", type=int, default=16)
    args = parser.parse_args()

    for label, ascii in (("unicode", False), ("ascii", True)):
        measure(label, conversation(args.kb, ascii=ascii), args)


def measure(label: str, request: dict, args: argparse.Namespace) -> None:
    text = conversation_text(request)
    fp = fingerprint(request, args.block_words)
    for _ in range(3):
        fingerprint(request, args.block_words)
    times = []
    for _ in range(args.runs):
        started = time.perf_counter()
        fingerprint(request, args.block_words)
        times.append((time.perf_counter() - started) * 1000)
    print(
        f"{label:8} {len(text.encode()) / 1000:.0f} KB, {fp.chars} chars, {fp.words} words, "
        f"{len(fp.blocks)} blocks of {args.block_words}: "
        f"median {statistics.median(times):.2f} ms over {args.runs} runs "
        f"(min {min(times):.2f}, max {max(times):.2f})"
    )


if __name__ == "__main__":
    main()
