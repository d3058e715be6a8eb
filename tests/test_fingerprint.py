"""
Tests for L{proxycache.routing}: the stable text rendering of a chat
request, the chained block hashes, and the L{Fingerprint} operations.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxycache.routing import Fingerprint, conversation_text, fingerprint, fingerprint_text

FAST = settings(max_examples=50, deadline=None)


def reference_words(text: str) -> list[str]:
    """Words, a word longer than 32 characters as pieces of 32, each after the first after a tab."""
    words = []
    for word in text.split():
        words += [("\t" if i else "") + word[i : i + 32] for i in range(0, len(word), 32)]
    return words


def reference_blocks(text: str, block_words: int) -> tuple[int, ...]:
    """The block hashes exactly as specified, written the plain way."""
    words = reference_words(text)
    blocks = []
    previous = b""
    for i in range(len(words) // block_words):
        chunk = " ".join(words[i * block_words : (i + 1) * block_words]).encode("utf-8", "surrogatepass")
        previous = hashlib.blake2b(previous + chunk, digest_size=8).digest()
        blocks.append(int.from_bytes(previous, "big"))
    return tuple(blocks)


def chat(*contents: Any, role: str = "user", **extra: Any) -> dict:
    return {"model": "m", "messages": [{"role": role, "content": c} for c in contents], **extra}


def words(n: int, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


def data_url(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(payload).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

TOOL_CALLS = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]


def reorder(value: Any) -> Any:
    """The same JSON value with every dict's keys in reverse order."""
    if isinstance(value, dict):
        return {k: reorder(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [reorder(v) for v in value]
    return value


# Strategies

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
spaced_text = st.text(
    alphabet=st.sampled_from(list("ab") + [" ", "\n", "\t", "\xa0", "\u3000", "\x1c", "é", "日", "🚀", "\u2028"]),
    max_size=200,
)
prose = st.lists(st.sampled_from("alpha beta gamma delta the cat sat on mat".split()), max_size=60).map(" ".join)
content_values = (
    prose
    | st.none()
    | st.lists(
        st.fixed_dictionaries({"type": st.just("text"), "text": prose})
        | st.builds(lambda b: image_part(data_url(b)), st.binary(max_size=16)),
        max_size=3,
    )
    | json_values
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": content_values},
        optional={"name": st.sampled_from(["alice", "bob"]), "tool_calls": st.just(TOOL_CALLS)},
    ),
    max_size=8,
)


def blocks_with_prefix(draw: Any, prefix: tuple[int, ...], tail: int, tag: int) -> tuple[int, ...]:
    # Like chained hashes: once two fingerprints differ, every later block differs too.
    return prefix + tuple(2**63 + tag * 10**6 + i for i in range(tail))


@st.composite
def fingerprint_pairs(draw: Any) -> tuple[Fingerprint, Fingerprint]:
    shared = tuple(draw(st.lists(st.integers(0, 2**62), max_size=20)))
    a = blocks_with_prefix(draw, shared, draw(st.integers(0, 20)), 1)
    b = blocks_with_prefix(draw, shared, draw(st.integers(0, 20)), 2)
    return Fingerprint(a, 100, 16), Fingerprint(b, 100, 16)


# Rendering


def test_text_is_stable_and_role_aware():
    request = chat("hello there", "second")
    assert conversation_text(request) == conversation_text(json.loads(json.dumps(request)))
    assert fingerprint(request) == fingerprint(request)
    as_assistant = chat("hello there", "second", role="assistant")
    assert conversation_text(request) != conversation_text(as_assistant)
    text = conversation_text(request)
    assert "<|user|>" in text and "hello there" in text and text.index("hello") < text.index("second")


def test_name_and_tool_call_id_are_in_the_marker():
    base = {"messages": [{"role": "tool", "content": "42"}]}
    named = {"messages": [{"role": "tool", "content": "42", "name": "calc", "tool_call_id": "call_9"}]}
    text = conversation_text(named)
    assert "name=calc" in text and "tool_call_id=call_9" in text
    assert text != conversation_text(base)


def test_none_content_is_empty_not_the_word_none():
    with_none = {"messages": [{"role": "assistant", "content": None, "tool_calls": TOOL_CALLS}]}
    missing = {"messages": [{"role": "assistant", "tool_calls": TOOL_CALLS}]}
    empty = {"messages": [{"role": "assistant", "content": "", "tool_calls": TOOL_CALLS}]}
    assert "None" not in conversation_text(with_none)
    assert "null" not in conversation_text(with_none)
    assert conversation_text(with_none) == conversation_text(missing) == conversation_text(empty)
    assert "None" not in conversation_text({"messages": [{"role": "user", "content": [None, "x"]}]})


def test_text_parts_are_joined():
    request = chat([{"type": "text", "text": "first part"}, {"type": "text", "text": "second part"}])
    text = conversation_text(request)
    assert "first part" in text and "second part" in text and "type" not in text


def test_image_data_is_never_included():
    payload = bytes(range(256)) * 3000  # ~1 MB of base64
    url = data_url(payload)
    assert len(url) > 1_000_000
    plain = chat([{"type": "text", "text": "what is this?"}])
    with_image = chat([{"type": "text", "text": "what is this?"}, image_part(url)])
    text = conversation_text(with_image)
    assert len(text) - len(conversation_text(plain)) < 40
    assert "base64" not in text and url[30:60] not in text
    marker = re.search(r"<image_url:([0-9a-f]{8})>", text)
    assert marker is not None
    # One marker is one word: it does not shift the words around it much.
    assert fingerprint(with_image).words == fingerprint(plain).words + 1


def test_different_images_give_different_text_and_same_image_the_same():
    one = chat(["look", image_part(data_url(b"\x89PNG one"))])
    same = chat(["look", image_part(data_url(b"\x89PNG one"))])
    other = chat(["look", image_part(data_url(b"\x89PNG two"))])
    remote = chat(["look", image_part("https://example.com/cat.png")])
    assert conversation_text(one) == conversation_text(same)
    assert len({conversation_text(one), conversation_text(other), conversation_text(remote)}) == 3


def test_audio_and_other_parts_become_markers():
    audio = base64.b64encode(b"RIFF" + bytes(5000)).decode()
    request = chat(
        [
            {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
            {"type": "file", "file": {"file_data": audio, "filename": "a.wav"}},
            {"type": "mystery"},
            {"no_type": True},
        ]
    )
    text = conversation_text(request)
    assert audio[:40] not in text
    assert re.search(r"<input_audio:[0-9a-f]{8}>", text)
    assert re.search(r"<file:[0-9a-f]{8}>", text)
    assert re.search(r"<mystery:[0-9a-f]{8}>", text)
    assert re.search(r"<part:[0-9a-f]{8}>", text)


def test_tools_come_first_and_are_key_order_insensitive():
    request = chat("hi", tools=TOOLS)
    text = conversation_text(request)
    assert text.startswith("<|tools|>")
    assert text.index("get_weather") < text.index("hi")
    assert conversation_text(reorder(request)) == text
    assert text != conversation_text(chat("hi"))


def test_tool_calls_are_key_order_insensitive():
    request = {"messages": [{"role": "user", "content": "weather?"}, {"role": "assistant", "tool_calls": TOOL_CALLS}]}
    text = conversation_text(request)
    assert "get_weather" in text and "call_1" in text
    assert conversation_text(reorder(request)) == text
    other_args = json.loads(json.dumps(request))
    other_args["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"city":"Rome"}'
    assert conversation_text(other_args) != text


def test_reasoning_content_counts_when_given():
    plain = {"messages": [{"role": "assistant", "content": "42"}]}
    thought = {"messages": [{"role": "assistant", "content": "42", "reasoning_content": "six times seven"}]}
    assert "six times seven" in conversation_text(thought)
    assert conversation_text(plain) != conversation_text(thought)


@pytest.mark.parametrize(
    "request_body",
    [
        {"messages": [{"role": "user", "content": 12}]},
        {"messages": [{"role": "user", "content": {"a": [1, {"b": None}]}}]},
        {"messages": [{"role": "user", "content": [[["deep"]], 3.5, True, None]}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 7}]}]},
        {"messages": [{"role": 5, "name": ["x"], "content": "hi"}]},
        {"messages": ["just a string", 3, None]},
        {"messages": {"role": "user"}},
        {"messages": None, "tools": {"odd": True}},
        {},
        ["not", "a", "dict"],
    ],
)
def test_odd_valid_json_does_not_crash(request_body: Any):
    text = conversation_text(request_body)
    assert isinstance(text, str)
    assert conversation_text(reorder(request_body)) == text
    fingerprint(request_body)


def test_odd_contents_differ_from_each_other():
    texts = {conversation_text(chat(c)) for c in (12, "12 ", {"a": 1}, {"a": 2}, [1], [[1]])}
    assert len(texts) == 6


@FAST
@given(messages, st.none() | st.just(TOOLS))
def test_any_request_renders(msgs: list, tools: Any):
    request = {"messages": msgs, **({"tools": tools} if tools else {})}
    text = conversation_text(request)
    assert text == conversation_text(reorder(request))
    fp = fingerprint(request, 4)
    assert fp.chars == len(text) and fp.words == len(reference_words(text))


# Blocks


def test_blocks_match_the_specification():
    request = chat(words(100))
    text = conversation_text(request)
    fp = fingerprint(request)
    assert fp.blocks == reference_blocks(text, 16)
    assert (fp.chars, fp.words) == (len(text), len(reference_words(text)))
    assert all(0 <= b < 2**64 for b in fp.blocks)


def test_known_answer():
    # Pins the text rendering and the hash: fingerprints saved in .meta files by an
    # earlier run must still match.  Update it only on purpose (stale disk entries).
    fp = fingerprint(chat(words(40)), 8)
    assert len(fp.blocks) == 5
    assert fp.key == KNOWN_KEY


KNOWN_KEY = "6cf61e6e2f91bbed"


@FAST
@given(spaced_text, st.integers(1, 6))
def test_blocks_match_the_specification_for_any_whitespace(text: str, block_words: int):
    # Covers both splitting paths: ASCII text (bytes.split) and the rest (str.split).
    request = {"messages": [{"role": "user", "content": text}]}
    fp = fingerprint(request, block_words)
    rendered = conversation_text(request)
    assert fp.blocks == reference_blocks(rendered, block_words)
    assert fp.words == len(reference_words(rendered))


@pytest.mark.parametrize("separator", ["\x1c", "\x1f", "\xa0", "\u3000", "\u2028", "\x85"])
def test_unicode_and_control_separators_split_words_like_str_split(separator: str):
    joined = chat(separator.join(f"w{i}" for i in range(40)))
    spaced = chat(words(40))
    assert fingerprint(joined, 8).blocks == fingerprint(spaced, 8).blocks


def test_lone_surrogates_do_not_crash():
    request = chat("a \ud800 b " + words(20))
    fp = fingerprint(request, 4)
    assert len(fp.blocks) == 6  # "<|user|>" and 23 words
    assert fp.blocks == reference_blocks(conversation_text(request), 4)


def test_only_full_blocks_count():
    def count(n: int) -> int:
        return len(fingerprint({"messages": [{"role": "user", "content": words(n)}]}, 4).blocks)

    # The marker "<|user|>" is the first word.
    assert [count(n) for n in (0, 2, 3, 6, 7, 10)] == [0, 0, 1, 1, 2, 2]
    assert fingerprint({}).blocks == () and fingerprint({}).key == ""


def test_whitespace_layout_does_not_matter_words_do():
    a = fingerprint(chat("alpha  beta\n\tgamma " + words(20)), 4)
    b = fingerprint(chat("alpha beta gamma\n" + words(20)), 4)
    c = fingerprint(chat("alpha beta gamma " + words(20, start=1)), 4)
    assert a.blocks == b.blocks
    assert a.blocks[0] != c.blocks[0] or a.blocks[-1] != c.blocks[-1]


def test_block_words_must_be_positive():
    with pytest.raises(ValueError):
        fingerprint(chat("x"), 0)


def test_chaining_makes_later_blocks_depend_on_earlier_ones():
    a = fingerprint(chat(words(8) + " " + words(8, start=100)), 8)
    b = fingerprint(chat(words(8, start=50) + " " + words(8, start=100)), 8)
    # Same second block of words, different first block: the second hash differs too.
    assert a.blocks[0] != b.blocks[0] and a.blocks[1] != b.blocks[1]


# Extension: what a follow-up turn shares with the turn before


@FAST
@given(messages, st.integers(0, 8), st.booleans(), st.integers(1, 8))
def test_appending_messages_keeps_every_full_block(msgs: list, cut: int, tools: bool, block_words: int):
    # The longer text is the shorter one plus "\n" plus more, and "\n" ends a word,
    # so the longer one's words start with all the shorter one's words: every full
    # block of the shorter fingerprint is a block of the longer one.
    extra = {"tools": TOOLS} if tools else {}
    older = fingerprint({"messages": msgs[:cut], **extra}, block_words)
    newer = fingerprint({"messages": msgs, **extra}, block_words)
    assert newer.blocks[: len(older.blocks)] == older.blocks
    assert older.common_blocks(newer) == newer.common_blocks(older) == len(older.blocks)
    if older.blocks:
        assert older.similarity(newer) == 1.0


@FAST
@given(st.lists(prose, min_size=1, max_size=5), prose, st.integers(1, 8))
def test_appending_to_the_last_message_may_change_only_the_last_full_block(
    contents: list, more: str, block_words: int
):
    # Text glued onto the last message can lengthen its last word; if that word
    # closed the last full block, that block changes.  Nothing before it can.
    older = fingerprint(chat(*contents), block_words)
    newer = fingerprint(chat(*contents[:-1], contents[-1] + more), block_words)
    assert older.common_blocks(newer) >= len(older.blocks) - 1


def test_glued_text_changes_the_last_block_only_at_a_block_boundary():
    # "<|user|>" plus 7 words: exactly two blocks of 4, "w6" closes the second.
    older = fingerprint(chat(words(7)), 4)
    assert len(older.blocks) == 2
    glued = fingerprint(chat(words(7) + "x more words here"), 4)  # "w6" becomes "w6x"
    assert glued.common_blocks(older) == 1
    spaced = fingerprint(chat(words(7) + " more words here"), 4)
    assert spaced.common_blocks(older) == 2
    # Mid-block, gluing only touches the dropped partial block.
    partial = fingerprint(chat(words(6)), 4)
    assert fingerprint(chat(words(6) + "x y z"), 4).common_blocks(partial) == len(partial.blocks) == 1


def test_a_conversation_growing_turn_by_turn():
    msgs: list[dict] = [{"role": "system", "content": words(50)}]
    previous = fingerprint({"messages": msgs})
    for turn in range(6):
        msgs.append({"role": "user", "content": words(13 + turn, start=1000 * turn)})
        msgs.append({"role": "assistant", "content": words(21, start=1000 * turn + 500)})
        current = fingerprint({"messages": msgs})
        assert current.common_blocks(previous) == len(previous.blocks)
        assert len(current.blocks) > len(previous.blocks)
        previous = current


def test_a_different_early_message_shares_only_what_comes_before_it():
    system = {"role": "system", "content": words(64)}
    a = fingerprint({"messages": [system, {"role": "user", "content": words(64, start=1000)}]})
    b = fingerprint({"messages": [system, {"role": "user", "content": words(64, start=2000)}]})
    assert a.common_blocks(b) == 4  # the marker shifts words by one: block 5 straddles the messages
    assert 0 < a.similarity(b) < 1


# Fingerprint operations


def test_two_blocks_against_ninety_nine():
    long = fingerprint(chat(words(99 * 16 - 1)))
    assert len(long.blocks) == 99
    short = Fingerprint(long.blocks[:2], 40, 32)
    assert short.common_blocks(long) == long.common_blocks(short) == 2
    assert short.similarity(long) == long.similarity(short) == 1.0
    unrelated = fingerprint(chat(words(32, start=5000)))
    assert len(unrelated.blocks) == 2
    assert unrelated.common_blocks(long) == 0 and unrelated.similarity(long) == 0.0
    empty = Fingerprint((), 0, 0)
    assert empty.similarity(long) == long.similarity(empty) == 0.0 == empty.similarity(empty)
    assert empty.common_blocks(long) == 0


@FAST
@given(fingerprint_pairs())
def test_common_blocks_is_the_shared_prefix(pair: tuple[Fingerprint, Fingerprint]):
    a, b = pair
    linear = 0
    for x, y in zip(a.blocks, b.blocks):
        if x != y:
            break
        linear += 1
    assert a.common_blocks(b) == b.common_blocks(a) == linear
    assert a.common_blocks(a) == len(a.blocks)


@FAST
@given(fingerprint_pairs())
def test_similarity_is_symmetric_and_bounded(pair: tuple[Fingerprint, Fingerprint]):
    a, b = pair
    assert a.similarity(b) == b.similarity(a)
    assert 0.0 <= a.similarity(b) <= 1.0
    assert a.similarity(a) == (1.0 if a.blocks else 0.0)


@FAST
@given(st.lists(st.integers(0, 2**64 - 1), max_size=30), st.integers(0, 10**6), st.integers(0, 10**5))
def test_hex_round_trip(blocks: list, chars: int, n_words: int):
    fp = Fingerprint(tuple(blocks), chars, n_words)
    text = fp.to_hex()
    assert len(text) == 16 * len(blocks) and re.fullmatch("[0-9a-f]*", text)
    assert Fingerprint.from_hex(text, chars, n_words) == fp
    assert fp.key == text[-16:]


def test_hex_round_trip_of_a_real_fingerprint():
    fp = fingerprint(chat(words(500)))
    assert Fingerprint.from_hex(fp.to_hex(), fp.chars, fp.words) == fp
    assert Fingerprint.from_hex(fp.to_hex().upper(), fp.chars, fp.words) == fp


@pytest.mark.parametrize("bad", ["abc", "0x" + "0" * 14, "g" * 16, " " + "0" * 15, "0000_00000000000", "0" * 17])
def test_from_hex_rejects_garbage(bad: str):
    with pytest.raises(ValueError):
        Fingerprint.from_hex(bad, 0, 0)


def test_from_hex_rejects_non_strings():
    with pytest.raises(TypeError):
        Fingerprint.from_hex(None, 0, 0)  # type: ignore[arg-type]


def test_to_hex_rejects_blocks_that_are_not_64_bit():
    with pytest.raises(ValueError):
        Fingerprint((2**64,), 0, 0).to_hex()


def test_key():
    fp = fingerprint(chat(words(100)))
    assert re.fullmatch("[0-9a-f]{16}", fp.key)
    assert fp.key == f"{fp.blocks[-1]:016x}"
    assert Fingerprint((1,), 0, 0).key == "0000000000000001"
    assert Fingerprint((), 0, 0).key == ""
    assert fingerprint(chat(words(100, start=7))).key != fp.key


def test_blocks_are_stored_as_a_tuple():
    fp = Fingerprint([1, 2], 0, 0)  # type: ignore[arg-type]
    assert fp.blocks == (1, 2)
    assert hash(fp) == hash(Fingerprint((1, 2), 0, 0))


# Words without spaces


def test_a_long_word_is_measured_by_its_size():
    fp = fingerprint_text("x" * 5_000_000)  # a 5 MB prompt that is one "word"
    assert fp.words == 5_000_000 // 32
    assert len(fp.blocks) == fp.words // 16
    cjk = fingerprint_text("日本語のテキスト" * 1000)  # 8000 characters, no space
    assert cjk.words == 250 and len(cjk.blocks) == 15


def test_pieces_of_a_word_differ_from_words():
    glued, spaced = "a" * 32 + "b" * 8, "a" * 32 + " " + "b" * 8
    assert fingerprint_text(glued * 20, 4).blocks != fingerprint_text(spaced * 20, 4).blocks


def test_appending_to_a_long_word_keeps_every_full_block():
    # The next turn follows a newline: the last long word of the shorter text is whole in both.
    shorter = "y" * 10_000
    longer = shorter + "\n" + "z" * 5_000
    a, b = fingerprint_text(shorter, 8), fingerprint_text(longer, 8)
    assert a.blocks and b.blocks[: len(a.blocks)] == a.blocks
