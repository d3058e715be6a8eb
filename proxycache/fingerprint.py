"""
A conversation's fingerprint: chained hashes of its word blocks.

The conversation is rendered to text in a stable, role-aware way, split into
words, and grouped into blocks of C{block_words} words.  Block i's hash covers
the block and the hash before it, so equal hashes at i mean equal prefixes up
to i: the common prefix of two fingerprints is found by binary search, and a
trailing partial block is left out because the next turn appends to it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import attrs

_HASH_BYTES = 8


def _stable_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()


def _part_text(part: Any) -> str:
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        return _stable_json(part)
    kind = part.get("type")
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    # Images, audio, files: a digest stands in for the payload, never the data itself.
    payload = part.get(kind) if isinstance(kind, str) else None
    return f"<{kind or 'part'}:{_digest(_stable_json(payload if payload is not None else part))}>"


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_part_text(part) for part in content)
    return _stable_json(content)


def conversation_text(request: dict) -> str:
    """Render C{request}'s tools and messages as text, the same way every time."""
    pieces = []
    tools = request.get("tools")
    if tools:
        pieces.append("<|tools|>\n" + _stable_json(tools))
    messages = request.get("messages")
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            pieces.append(_stable_json(message))
            continue
        marker = f"<|{message.get('role', '')}"
        for field in ("name", "tool_call_id"):
            if message.get(field) is not None:
                marker += f" {field}={message[field]}"
        pieces.append(marker + "|>")
        pieces.append(_content_text(message.get("content")))
        if message.get("tool_calls"):
            pieces.append("<|tool_calls|>" + _stable_json(message["tool_calls"]))
    return "\n".join(pieces)


@attrs.frozen
class Fingerprint:
    blocks: tuple[int, ...]
    chars: int
    words: int

    def common_blocks(self, other: "Fingerprint") -> int:
        """How many leading blocks the two share (chained hashes make this monotone)."""
        a, b = self.blocks, other.blocks
        low, high = 0, min(len(a), len(b))
        while low < high:
            middle = (low + high + 1) // 2
            if a[middle - 1] == b[middle - 1]:
                low = middle
            else:
                high = middle - 1
        return low

    def similarity(self, other: "Fingerprint") -> float:
        shorter = min(len(self.blocks), len(other.blocks))
        return self.common_blocks(other) / shorter if shorter else 0.0

    @property
    def key(self) -> str:
        """A short id of the whole fingerprint: lowercase hex, "" when empty."""
        return f"{self.blocks[-1]:016x}" if self.blocks else ""

    def to_hex(self) -> str:
        return "".join(f"{block:016x}" for block in self.blocks)

    @classmethod
    def from_hex(cls, text: str, chars: int, words: int) -> "Fingerprint":
        if len(text) % 16:
            raise ValueError("fingerprint hex length is not a multiple of 16")
        return cls(tuple(int(text[i : i + 16], 16) for i in range(0, len(text), 16)), chars, words)


def fingerprint(request: dict, block_words: int = 16) -> Fingerprint:
    text = conversation_text(request)
    words = text.split()
    blocks = []
    previous = b""
    for start in range(0, len(words) - block_words + 1, block_words):
        chunk = " ".join(words[start : start + block_words]).encode("utf-8", "surrogatepass")
        previous = hashlib.blake2b(previous + chunk, digest_size=_HASH_BYTES).digest()
        blocks.append(int.from_bytes(previous, "big"))
    return Fingerprint(tuple(blocks), len(text), len(words))
