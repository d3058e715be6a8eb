"""
A conversation's fingerprint: chained hashes of its word blocks.

The conversation is rendered to text in a stable, role-aware way
(L{conversation_text}), split into words (C{str.split()}), and grouped into
blocks of C{block_words} words; a word longer than L{MAX_WORD_CHARS} counts
as pieces of that many characters (text without spaces: CJK, base64, minified
code, a 5 MB "word"), so that words and blocks measure its size too.  Block
i's hash covers the block and the hash before it, so equal hashes at i mean
equal prefixes up to i: the common prefix of two fingerprints is found by
binary search.  A trailing partial block is
left out because the next turn appends to it.

Appending messages never changes the blocks already there: the text of the
longer conversation starts with the text of the shorter one followed by a
newline, so its words start with the shorter one's words.

Pure code: no I/O, no Twisted.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from typing import Any

import attrs

__all__ = ["Fingerprint", "conversation_text", "fingerprint", "fingerprint_text"]

_HASH_BYTES = 8
_HEX_PER_BLOCK = 2 * _HASH_BYTES
_MARKER_DIGEST_BYTES = 4
_HEX = re.compile(r"[0-9a-fA-F]*")
# What str.split() splits on besides ASCII whitespace; bytes.split() does not
# know them.  ASCII text without these splits the same both ways.
_ASCII_ONLY_STR_SEPARATORS = "\x1c\x1d\x1e\x1f"
# Longer words are split into pieces this long; every piece after a word's first is marked with a
# tab (never part of a word), so "abc…p qrst" and "abc…pqrst" stay different.
MAX_WORD_CHARS = 32  # more than a media marker (<image_url:0123abcd>), an identifier, most URLs


def _stable_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _digest(text: str) -> str:
    data = text.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=_MARKER_DIGEST_BYTES).hexdigest()


def _label(value: Any) -> str:
    return value if isinstance(value, str) else _stable_json(value)


def _part_text(part: Any) -> str:
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        return _stable_json(part)
    kind = part.get("type")
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    # Images, audio, files: a digest of the payload stands in for it, never the data itself.
    payload = part.get(kind) if isinstance(kind, str) else None
    if payload is None:
        payload = part
    name = kind if isinstance(kind, str) and kind else "part"
    return f"<{name}:{_digest(payload if isinstance(payload, str) else _stable_json(payload))}>"


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_part_text(part) for part in content)
    return _stable_json(content)


def _message_pieces(message: Any) -> list[str]:
    if not isinstance(message, dict):
        return [_stable_json(message)]
    marker = "<|" + _label(message.get("role", ""))
    for field in ("name", "tool_call_id"):
        if message.get(field) is not None:
            marker += f" {field}={_label(message[field])}"
    pieces = [marker + "|>"]
    reasoning = message.get("reasoning_content")
    if reasoning:
        # Chat templates that keep earlier thinking render it before the answer.
        pieces.append("<|reasoning|>\n" + _content_text(reasoning))
    pieces.append(_content_text(message.get("content")))
    if message.get("tool_calls"):
        pieces.append("<|tool_calls|>\n" + _stable_json(message["tool_calls"]))
    return pieces


def conversation_text(request: dict) -> str:
    """
    Render C{request}'s tools and messages as text, the same way every time.

    Tools come first (chat templates put them in the system prompt), then
    each message as a role marker and its content.  Media parts become a
    short marker with a digest of their payload.  Odd but valid JSON (content
    as a number, a dict, nested lists) is rendered as stable JSON.
    """
    if not isinstance(request, dict):
        return _stable_json(request)
    pieces = []
    tools = request.get("tools")
    if tools:
        pieces.append("<|tools|>\n" + _stable_json(tools))
    messages = request.get("messages")
    if isinstance(messages, list):
        for message in messages:
            pieces.extend(_message_pieces(message))
    elif messages is not None:
        pieces.append(_stable_json(messages))
    return "\n".join(pieces)


@attrs.frozen
class Fingerprint:
    """
    @ivar blocks: chained 64-bit block hashes; C{blocks[i]} identifies the whole
        prefix of C{i + 1} blocks.
    @ivar chars: characters of the conversation text.
    @ivar words: words of the conversation text.
    """

    blocks: tuple[int, ...] = attrs.field(converter=tuple)
    chars: int
    words: int

    def common_blocks(self, other: "Fingerprint") -> int:
        """How many leading blocks the two share (chained hashes make this monotone)."""
        a, b = self.blocks, other.blocks
        low, high = 0, min(len(a), len(b))
        if high and a[high - 1] == b[high - 1]:
            return high
        while low < high:
            middle = (low + high + 1) // 2
            if a[middle - 1] == b[middle - 1]:
                low = middle
            else:
                high = middle - 1
        return low

    def similarity(self, other: "Fingerprint") -> float:
        """Shared leading blocks over the shorter one's blocks; 0.0 when either has none."""
        shorter = min(len(self.blocks), len(other.blocks))
        return self.common_blocks(other) / shorter if shorter else 0.0

    @property
    def key(self) -> str:
        """A short id of the whole fingerprint (its last block): lowercase hex, "" when empty."""
        return f"{self.blocks[-1]:016x}" if self.blocks else ""

    def to_hex(self) -> str:
        """Blocks as lowercase hex, 16 characters each."""
        try:
            return struct.pack(f">{len(self.blocks)}Q", *self.blocks).hex()
        except struct.error as e:
            raise ValueError(f"fingerprint blocks must be 64-bit unsigned ints: {e}") from None

    @classmethod
    def from_hex(cls, text: str, chars: int, words: int) -> "Fingerprint":
        """The inverse of L{to_hex}."""
        if not isinstance(text, str):
            raise TypeError(f"fingerprint hex must be a str, not {type(text).__name__}")
        if len(text) % _HEX_PER_BLOCK:
            raise ValueError("fingerprint hex length is not a multiple of 16")
        if not _HEX.fullmatch(text):
            raise ValueError(f"invalid literal for fingerprint hex: {text[:40]!r}")
        data = bytes.fromhex(text)
        return cls(struct.unpack(f">{len(data) // _HASH_BYTES}Q", data), chars, words)


def _pieces(words: list[Any], mark: Any) -> list[Any]:
    """C{words} with each one longer than L{MAX_WORD_CHARS} as its pieces (see there)."""
    limit = MAX_WORD_CHARS
    lengths = list(map(len, words))
    if max(lengths, default=0) <= limit:
        return words
    pieces: list[Any] = []
    start = 0
    for i in [i for i, n in enumerate(lengths) if n > limit]:
        pieces += words[start:i]
        word = words[i]
        pieces.append(word[:limit])
        pieces += [mark + word[j : j + limit] for j in range(limit, len(word), limit)]
        start = i + 1
    pieces += words[start:]
    return pieces


def _block_bytes(text: str, block_words: int) -> tuple[list[bytes], int]:
    """The full blocks of C{text}'s words, each as its words joined by a space; and the word count."""
    if text.isascii() and not any(c in text for c in _ASCII_ONLY_STR_SEPARATORS):
        # Same words as str.split(), without encoding each block separately.
        words: list[Any] = _pieces(text.encode("ascii").split(), b"\t")
        full = len(words) - len(words) % block_words
        join = b" ".join
        return [join(words[i : i + block_words]) for i in range(0, full, block_words)], len(words)
    unicode_words = _pieces(text.split(), "\t")
    full = len(unicode_words) - len(unicode_words) % block_words
    return [
        " ".join(unicode_words[i : i + block_words]).encode("utf-8", "surrogatepass")
        for i in range(0, full, block_words)
    ], len(unicode_words)


def fingerprint(request: dict, block_words: int = 16) -> Fingerprint:
    """Fingerprint C{request}: chained blake2b hashes of its full blocks of C{block_words} words."""
    return fingerprint_text(conversation_text(request), block_words)


def fingerprint_text(text: str, block_words: int = 16) -> Fingerprint:
    """Fingerprint already rendered C{text} (see L{proxycache.routing._render})."""
    if block_words < 1:
        raise ValueError(f"block_words must be at least 1, not {block_words}")
    chunks, words = _block_bytes(text, block_words)
    blake2b = hashlib.blake2b
    digests: list[bytes] = []
    append = digests.append
    previous = b""
    for chunk in chunks:
        previous = blake2b(previous + chunk, digest_size=_HASH_BYTES).digest()
        append(previous)
    blocks = struct.unpack(f">{len(digests)}Q", b"".join(digests))
    return Fingerprint(blocks, len(text), words)
