"""
Simulated users for routing tests: each has a large private context and adds
a short message per turn, as an IDE chat does.
"""

from __future__ import annotations

import random
from typing import Any

WORDS = (
    "def class return import self value list dict async await yield lambda for while "
    "if else try except raise with open read write parse render cache slot token prefix "
    "block hash route proxy server client request response stream chunk event error"
).split()


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


class User:
    def __init__(self, name: str, context_words: int = 400, seed: int | None = None) -> None:
        self.name = name
        self.rng = random.Random(seed if seed is not None else name)
        self.messages: list[dict[str, Any]] = [
            {"role": "system", "content": f"Project of {name}. " + text(self.rng, context_words)}
        ]
        self.turns: list[dict[str, Any]] = []

    def turn(self, client: Any, words: int = 12, max_tokens: int = 6) -> dict[str, Any]:
        """Send the next turn; returns what it cost (decision, slot, cache_n, prompt_n, new_chars)."""
        question = text(self.rng, words)
        self.messages.append({"role": "user", "content": question})
        raw = client.chat.completions.with_raw_response.create(
            model="any", messages=self.messages, max_tokens=max_tokens
        )
        completion = raw.parse()
        answer = completion.choices[0].message.content or ""
        self.messages.append({"role": "assistant", "content": answer})
        timings = completion.model_extra["timings"]
        record = {
            "user": self.name,
            "decision": raw.headers["x-proxycache-decision"],
            "restored_tokens": int(raw.headers["x-proxycache-restored-tokens"]),
            "slot": raw.headers["x-proxycache-slot"],
            "cache_n": timings["cache_n"],
            "prompt_n": timings["prompt_n"],
            # what a perfect cache would still compute: the previous answer as
            # re-sent text, this question, and the chat template around them
            "new_chars": len(question) + len(self.turns[-1]["answer"].encode()) if self.turns else None,
            "answer": answer,
        }
        self.turns.append(record)
        return record


def close_to_new(record: dict[str, Any], slack: int = 48) -> bool:
    """prompt_n is about the new text only (one token per byte or space here)."""
    return record["prompt_n"] <= record["new_chars"] + slack
