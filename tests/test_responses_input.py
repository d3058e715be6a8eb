"""
Responses input items in every shape the reference allows, made into what
llama.cpp takes (proxycache.web._responses), and the ones no local server can
take refused up front.  Pure: the real-server proof is in tests/test_apis.py.
"""

from __future__ import annotations

import pytest

from proxycache.routing._translate import responses_to_chat
from proxycache.web._errors import ApiError
from proxycache.web._responses import check_input, upstream_body

USER = {"role": "user", "content": "Weather in Lisbon?"}


def test_easy_assistant_messages_become_output_messages():
    body = {"input": [
        USER,
        {"role": "assistant", "content": "Sunny."},  # OpenAI's conversation-state guide
        {"role": "assistant", "content": [{"type": "input_text", "text": "More."}]},  # an easy message's parts
        {"role": "assistant", "content": [{"type": "output_text", "text": "Yes."}], "phase": "final_answer"},
        {"type": "message", "role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
        USER,
    ], "model": "x"}
    sent = upstream_body(body)
    assert sent["input"][0] is USER and sent["input"][-1] is USER and sent["model"] == "x"
    assert sent["input"][1] == {"type": "message", "role": "assistant",
                                "content": [{"type": "output_text", "text": "Sunny."}]}
    assert sent["input"][2]["content"] == [{"type": "output_text", "text": "More."}]
    assert sent["input"][3]["type"] == "message" and sent["input"][3]["phase"] == "final_answer"
    assert sent["input"][4]["content"] == [{"type": "output_text", "text": "No."}]
    assert body["input"][1] == {"role": "assistant", "content": "Sunny."}  # the client's body is left alone
    # one assistant turn, rendered as llama.cpp will convert it
    messages = responses_to_chat(sent)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert [p["text"] for p in messages[1]["content"]] == ["Sunny.", "More.", "Yes.", "No."]


def test_reasoning_without_readable_content_is_left_out():
    answer = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "x"}]}
    readable = {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "think"}]}
    body = {"input": [USER, {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},
                      readable, answer, USER]}
    sent = upstream_body(body)["input"]
    assert sent == [USER, dict(readable, summary=[]), answer, USER]


def test_what_llama_cpp_takes_is_sent_as_it_is():
    items = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "message", "role": "system", "content": "be terse"},
        {"role": "developer", "content": "and exact"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "ok"}]},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "t"}]},
    ]
    body = {"input": items}
    check_input(body)
    assert upstream_body(body)["input"] == items
    assert upstream_body({"input": "just text"}) == {"input": "just text"}


@pytest.mark.parametrize("item, says", [
    ("hello", "must be an object"),
    ({"content": "no role"}, "role must be one of"),
    ({"role": 5, "content": "x"}, "role must be one of"),
    ({"role": "wizard", "content": "x"}, "role must be one of"),
    ({"role": "user"}, "content must be a string or an array"),
    ({"id": "msg_123"}, "item reference"),
    ({"type": "item_reference", "id": "msg_123"}, "item reference"),
    ({"type": "web_search_call", "id": "ws_1", "status": "completed"}, "function tools only"),
    ({"type": "custom_tool_call", "call_id": "c", "name": "f", "input": "x"}, "function tools only"),
    ({"type": "function_call", "call_id": "c", "name": "f", "arguments": '{"city": "Lis'}, "not valid JSON"),
    ({"type": "function_call", "call_id": "c", "name": "f", "arguments": ""}, "not valid JSON"),
    ({"type": "function_call", "call_id": "c", "name": "f", "arguments": {"a": 1}}, "must be a string"),
    ({"type": "function_call", "call_id": "c", "arguments": "{}"}, "name must be a string"),
    ({"type": "function_call_output", "output": "x"}, "call_id must be a string"),
])
def test_items_no_local_server_takes_are_refused(item, says):
    with pytest.raises(ApiError) as caught:
        check_input({"input": [USER, item]})
    assert caught.value.status == 400 and "input[1]" in caught.value.message and says in caught.value.message


def test_input_of_another_type_is_refused():
    with pytest.raises(ApiError):
        check_input({"input": {"role": "user"}})
