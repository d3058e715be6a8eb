"""
The pure Messages <-> chat translation (proxycache.web._anthropic and the
request conversion in proxycache.routing._translate), against fixtures shaped
like llama.cpp's output; the streams are read back by the real anthropic SDK.
"""

from __future__ import annotations

import json

import anthropic

try:  # the HTTP library of the anthropic SDK (httpx2 in recent ones)
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

from proxycache.routing import fingerprint_text
from proxycache.routing._render import chat_text, messages_text
from proxycache.routing._translate import anthropic_to_chat
from proxycache.web._anthropic import MessagesStream, chat_to_message, upstream_body

STAMPED = "x-anthropic-billing-header: cc_version=2.1.101.e51; cc_entrypoint=cli; cch=a5145;You are Claude Code."

BODY = {
    "model": "claude-whatever", "max_tokens": 64, "id_slot": 1, "n_probs": 3, "stream": True, "temperature": 0.2,
    "system": [{"type": "text", "text": STAMPED}, {"type": "text", "text": " Be terse.", "cache_control": {}}],
    "tools": [{"name": "get_weather", "description": "weather", "input_schema": {"type": "object"}}],
    "tool_choice": {"type": "any"}, "stop_sequences": ["END"], "thinking": {"type": "enabled", "budget_tokens": 99},
    "metadata": {"user_id": "u1"},
    "messages": [
        {"role": "user", "content": "Weather in Lisbon?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Use the tool."},
            {"type": "text", "text": "Looking.", "cache_control": {"type": "ephemeral"}},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"units": "C", "city": "Lisbon"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"},
                                                                         {"type": "text", "text": ", 24C"}]},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]},
            {"type": "text", "text": "Thanks."},
        ]},
        {"role": "assistant"},
    ],
}


def test_request_converts_as_llama_cpp_does():
    chat = anthropic_to_chat(BODY)
    assert chat["messages"][0] == {
        "role": "system",
        "content": "x-anthropic-billing-header: cc_version=2.1.101.e51; cc_entrypoint=cli; cch=fffff;"
                   "You are Claude Code. Be terse.",
    }
    assert chat["messages"][1] == {"role": "user", "content": "Weather in Lisbon?"}
    assert chat["messages"][2] == {
        "role": "assistant", "content": [{"type": "text", "text": "Looking.", "cache_control": {"type": "ephemeral"}}],
        "tool_calls": [{"id": "toolu_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"units":"C","city":"Lisbon"}'}}],
        "reasoning_content": "Use the tool.",
    }
    # the user's text first, then one tool message per result; an assistant without content is dropped
    assert chat["messages"][3:] == [
        {"role": "user", "content": [{"type": "text", "text": "Thanks."}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny, 24C"},
        {"role": "tool", "tool_call_id": "toolu_2",
         "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
    ]
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "weather", "parameters": {"type": "object"}}}]
    assert chat["tool_choice"] == "required" and chat["stop"] == ["END"] and chat["max_tokens"] == 64
    assert chat["thinking_budget_tokens"] == 99 and chat["temperature"] == 0.2 and chat["stream"] is True
    assert chat["__metadata_user_id"] == "u1"
    assert "id_slot" not in chat and "n_probs" not in chat and "model" not in chat  # dropped, as llama.cpp does


def test_request_defaults_and_odd_input():
    chat = anthropic_to_chat({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]},
                                           {"role": "user", "content": 5}, "odd"], "system": 7})
    assert chat["max_tokens"] == 4096
    assert chat["messages"] == [{"role": "system", "content": ""}, {"role": "tool", "tool_call_id": "t", "content": ""},
                                {"role": "user", "content": 5}, "odd"]
    assert "tools" not in chat and "stream" not in chat


def test_stream_asks_for_timings_and_usage():
    sent = upstream_body(dict(BODY, stream=True))
    assert sent["stream_options"] == {"include_usage": True} and sent["timings_per_token"] is True
    assert "stream_options" not in upstream_body(dict(BODY, stream=False))


def test_fingerprint_is_the_chat_rendering_and_grows_turn_by_turn():
    assert messages_text(BODY) == chat_text(anthropic_to_chat(BODY))
    turn1 = {"system": "You help. " * 40, "messages": [{"role": "user", "content": "First question " * 40}]}
    turn2 = dict(turn1, messages=turn1["messages"] + [
        {"role": "assistant", "content": [{"type": "text", "text": "An answer."}]},
        {"role": "user", "content": [{"type": "text", "text": "Second question."}]}])
    one, two = (fingerprint_text(chat_text(upstream_body(t)), 16) for t in (turn1, turn2))
    assert len(one.blocks) > 3 and one.common_blocks(two) >= len(one.blocks) - 1
    # a stamped system prompt fingerprints alike whatever its checksum
    again = fingerprint_text(messages_text(dict(BODY, system=STAMPED.replace("a5145", "77777"))), 16)
    assert again.blocks == fingerprint_text(messages_text(dict(BODY, system=STAMPED)), 16).blocks


CHAT_ANSWER = {
    "id": "chatcmpl-1", "model": "m.gguf", "object": "chat.completion",
    "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Looking.", "reasoning_content": "Think.",
        "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Lisbon"}'}},
                       {"id": "call_2", "type": "function", "function": {"name": "broken", "arguments": "{"}}]}}],
    "usage": {"completion_tokens": 9, "prompt_tokens": 120, "total_tokens": 129,
              "prompt_tokens_details": {"cached_tokens": 100}},
    "timings": {"cache_n": 100, "prompt_n": 20, "predicted_n": 9},
}


def test_whole_answer():
    message = chat_to_message(CHAT_ANSWER)
    assert message == {
        "id": "chatcmpl-1", "type": "message", "role": "assistant", "model": "m.gguf",
        "content": [
            {"type": "thinking", "thinking": "Think.", "signature": ""},
            {"type": "text", "text": "Looking."},
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Lisbon"}},
            {"type": "tool_use", "id": "call_2", "name": "broken", "input": {}},
        ],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"cache_read_input_tokens": 100, "input_tokens": 20, "output_tokens": 9},
    }
    length = dict(CHAT_ANSWER, choices=[{"finish_reason": "length", "message": {"content": ""}}], usage=None)
    assert chat_to_message(length)["stop_reason"] == "max_tokens" and chat_to_message(length)["content"] == []
    assert chat_to_message(length)["usage"]["cache_read_input_tokens"] == 100  # from timings
    assert chat_to_message({"error": {"code": 400}}) == {"error": {"code": 400}}


def test_tool_arguments_nested_beyond_recursion_are_no_input():
    # The model writes the arguments: 200 KB of brackets must not break the answer's translation.
    deep = "[" * 100_000 + "]" * 100_000
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": deep}}
    answer = dict(CHAT_ANSWER, choices=[{"finish_reason": "tool_calls", "message": {"tool_calls": [call]}}])
    assert chat_to_message(answer)["content"] == [{"type": "tool_use", "id": "call_1", "name": "f", "input": {}}]


def _chunk(delta=None, finish=None, **extra):
    choices = [] if delta is None else [{"index": 0, "finish_reason": finish, "delta": delta}]
    body = {"choices": choices, "id": "chatcmpl-9", "model": "m.gguf", "object": "chat.completion.chunk", **extra}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


TIMINGS = {"cache_n": 100, "prompt_n": 20, "predicted_n": 1}
# A llama.cpp chat stream (timings_per_token, include_usage): reasoning, text, two tool calls.
CHAT_STREAM = b"".join([
    _chunk({"role": "assistant", "content": None}),
    _chunk({"reasoning_content": "Think"}, timings=TIMINGS),
    _chunk({"reasoning_content": "ing."}, timings=TIMINGS),
    _chunk({"content": "Loo"}, timings=TIMINGS),
    _chunk({"content": "king é."}, timings=TIMINGS),
    _chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather"}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Lisbon"}'}}]}),
    _chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                            "function": {"name": "get_time", "arguments": "{}"}}]}),
    _chunk({}, finish="tool_calls"),
    _chunk(usage={"completion_tokens": 12, "prompt_tokens": 120, "prompt_tokens_details": {"cached_tokens": 100}},
           timings=dict(TIMINGS, predicted_n=12)),
    b"data: [DONE]\n\n",
])


def _translate(stream: bytes, step: int) -> bytes:
    translator = MessagesStream()
    out = b"".join(translator.feed(stream[i:i + step]) for i in range(0, len(stream), step))
    assert translator.ended
    return out


def _events(sse: bytes) -> list[dict]:
    return [json.loads(line[5:]) for line in sse.split(b"\n") if line.startswith(b"data:")]


def test_stream_events_in_order_whatever_the_chunking():
    whole = _translate(CHAT_STREAM, len(CHAT_STREAM))
    assert _translate(CHAT_STREAM, 1) == whole == _translate(CHAT_STREAM, 7)
    events = _events(whole)
    assert [(e["type"], e.get("index")) for e in events] == [
        ("message_start", None),
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_delta", 0),
        ("content_block_delta", 0), ("content_block_stop", 0),  # the signature, then the thinking block ends
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_delta", 1), ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_delta", 2), ("content_block_stop", 2),
        ("content_block_start", 3), ("content_block_delta", 3), ("content_block_stop", 3),
        ("message_delta", None), ("message_stop", None),
    ]
    assert events[0]["message"]["usage"] == {"cache_read_input_tokens": 100, "input_tokens": 20, "output_tokens": 0}
    assert events[0]["message"]["id"] == "chatcmpl-9"
    assert events[10]["content_block"] == {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}
    assert events[11]["delta"] == {"type": "input_json_delta", "partial_json": '{"city":'}
    assert events[-2]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[-2]["usage"] == {"cache_read_input_tokens": 100, "input_tokens": 20, "output_tokens": 12}


def test_the_sdk_reads_the_translated_stream():
    sse = _translate(CHAT_STREAM, 5)
    transport = httpx.MockTransport(lambda request: httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=sse))
    client = anthropic.Anthropic(api_key="k", base_url="http://proxy", http_client=httpx.Client(transport=transport))
    with client.messages.stream(model="any", max_tokens=8, messages=[{"role": "user", "content": "hi"}]) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == "Looking é."
    assert [block.type for block in final.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert final.content[0].thinking == "Thinking."
    assert final.content[2].input == {"city": "Lisbon"} and final.content[3].name == "get_time"
    assert final.stop_reason == "tool_use"
    assert final.usage.cache_read_input_tokens == 100 and final.usage.output_tokens == 12


def test_stream_without_timings_and_with_an_error():
    plain = _chunk({"role": "assistant", "content": None}) + _chunk({"content": "Hi"}) + _chunk({}, finish="stop")
    events = _events(_translate(plain + b"data: [DONE]\n\n", 3))
    assert [e["type"] for e in events][:2] == ["message_start", "content_block_start"]
    assert events[-2]["delta"]["stop_reason"] == "end_turn"
    broken = plain + b'error: {"code": 500, "message": "slot died", "type": "server_error"}\n\n' + b"data: [DONE]\n\n"
    events = _events(_translate(broken, 4))
    assert events[-1] == {"type": "error", "error": {"type": "api_error", "message": "slot died"}}
    empty = MessagesStream()
    assert _events(empty.feed(b"data: [DONE]\n\n"))[0]["type"] == "message_start"  # nothing generated: still whole


def test_the_stop_sequence_that_matched_is_said():
    assert upstream_body(dict(BODY, stream=False))["verbose"] is True  # llama.cpp then says which stop word
    assert "verbose" not in upstream_body({"messages": [], "stop_sequences": []})
    verbose = {"stop_type": "word", "stopping_word": "END", "prompt": "..."}
    stopped = dict(CHAT_ANSWER, choices=[{"finish_reason": "stop", "message": {"content": "x"}}], __verbose=verbose)
    message = chat_to_message(stopped)
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "END")
    eos = dict(stopped, __verbose=dict(verbose, stop_type="eos", stopping_word=""))
    assert (chat_to_message(eos)["stop_reason"], chat_to_message(eos)["stop_sequence"]) == ("end_turn", None)
    # streamed: llama.cpp puts __verbose on the first chunk of its final result
    plain = _chunk({"role": "assistant", "content": None}) + _chunk({"content": "Hi"})
    events = _events(_translate(plain + _chunk({}, finish="stop", __verbose=verbose) + b"data: [DONE]\n\n", 3))
    assert events[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
