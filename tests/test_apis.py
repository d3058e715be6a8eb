"""
Every client API through the real daemon to a real llama.cpp server, each
driven by its own client: the anthropic SDK (Messages), the openai SDK
(Responses, chat), an editor-like /infill client.  A conversation's next turn
is a hit whatever the API; evicted, it comes back from disk.
"""

from __future__ import annotations

import json

import anthropic
import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import ResponseStreamEvent

from tests.conftest import SMALL_LIMITS, start_proxy
from proxycache.testing import ProxyProcess, ReplyTap, http
from proxycache.tinymodel import FORCE_TOOL_CALL_BIAS

KEY = "sk-test-apis"
# For the proxy fixture. A slow health poll: a /slots poll racing a never-used slot's first request is
# taken for a llama-server restart (monitor issue, reported), which would empty the slot map mid-test.
PROXY_OPTIONS = dict(limits=SMALL_LIMITS, saves=True, api_keys=KEY, health_interval=60)
SYSTEM = "You answer questions about the project, tersely and precisely. " * 8


def _anthropic(proxy):
    return anthropic.Anthropic(base_url=proxy.url, api_key=KEY, max_retries=0)


def _messages_turn(client, messages, **extra):
    raw = client.messages.with_raw_response.create(model="any", max_tokens=4, system=SYSTEM, messages=messages, **extra)
    message = raw.parse()
    text = "".join(block.text for block in message.content if block.type == "text")
    messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
    return raw.headers["x-proxycache-decision"], message.usage


def _latest_slot(llama):
    """The slot llama.cpp ran its latest task on (C{/slots} C{id_task})."""
    slots = [slot for slot in llama.slots() if slot.get("id_task") is not None]
    return max(slots, key=lambda slot: slot["id_task"])["id"]


def test_anthropic_messages_conversation_hits_and_streams(proxy):
    client = _anthropic(proxy)  # sends x-api-key
    messages = [{"role": "user", "content": "What does the scheduler do with a busy hot slot?"}]
    decision, usage = _messages_turn(client, messages)
    assert decision in ("miss", "small")
    messages.append({"role": "user", "content": [{"type": "text", "text": "And when the queue is full?"}]})
    decision, usage = _messages_turn(client, messages)
    assert decision == "hit"
    assert usage.cache_read_input_tokens > 100  # llama.cpp's reuse, as Anthropic usage
    assert usage.input_tokens < usage.cache_read_input_tokens / 4  # only the new turn is computed
    messages.append({"role": "user", "content": "One more thing."})
    with client.messages.stream(model="any", max_tokens=16, system=SYSTEM, messages=messages) as stream:
        assert stream.response.headers["x-proxycache-decision"] == "hit"
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert texts and "".join(texts) == "".join(b.text for b in final.content if b.type == "text")
    assert final.stop_reason in ("max_tokens", "end_turn") and final.usage.output_tokens > 0
    assert final.usage.cache_read_input_tokens > 100
    status = http("GET", proxy.url + "/status", None, {"x-api-key": KEY})[2]
    assert status["recent"][0]["cache_n"] > 100  # the Outcome read llama.cpp's timings from the stream
    # create(stream=True): the raw events, in Anthropic's order
    messages.append({"role": "assistant", "content": [{"type": "text", "text": "".join(texts)}]})
    messages.append({"role": "user", "content": "Last one."})
    events = list(client.messages.create(model="any", max_tokens=4, system=SYSTEM, messages=messages, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert events[0].message.usage.cache_read_input_tokens > 100
    assert events[-2].usage.output_tokens > 0


def test_messages_are_pinned_to_the_proxys_slot(proxy, llama):
    """
    llama.cpp b11549 ignores id_slot on /v1/messages (it ran a request pinned to slot 0 on slot 1); the proxy
    sends Messages as chat, so the slot it names is the slot llama.cpp used, turn after turn.
    """
    client = _anthropic(proxy)
    first = [{"role": "user", "content": "First conversation, about the disk tier. " * 10}]
    second = [{"role": "user", "content": "Second conversation, about the scheduler. " * 10}]
    slots = []
    for messages in (first, second, first, second):
        raw = client.messages.with_raw_response.create(model="any", max_tokens=2, system=SYSTEM, messages=messages)
        message = raw.parse()
        assert int(raw.headers["x-proxycache-slot"]) == _latest_slot(llama), llama.slots()
        slots.append(int(raw.headers["x-proxycache-slot"]))
        messages.append({"role": "assistant", "content": "".join(b.text for b in message.content if b.type == "text")})
        messages.append({"role": "user", "content": "Go on."})
        if len(slots) > 2:
            assert raw.headers["x-proxycache-decision"] == "hit"
            assert message.usage.cache_read_input_tokens > 100
    assert slots[0] != slots[1] and slots[2:] == slots[:2]


def test_messages_say_which_stop_sequence_matched(proxy):
    client = _anthropic(proxy)
    messages = [{"role": "user", "content": "Tell me a story about the sea and the wind. " * 5}]
    greedy = dict(model="any", max_tokens=24, system=SYSTEM, messages=messages, extra_body={"temperature": 0})
    first = client.messages.create(**greedy)
    text = "".join(block.text for block in first.content if block.type == "text")
    # the same greedy answer again, stopped by two of its characters (the noise model writes some broken UTF-8)
    stop = next(text[i:i + 2] for i in range(2, len(text) - 1) if "\ufffd" not in text[i:i + 2])
    again = client.messages.create(**greedy, stop_sequences=["never in a noise answer", stop])
    assert (again.stop_reason, again.stop_sequence) == ("stop_sequence", stop), (text, again)
    with client.messages.stream(**greedy, stop_sequences=[stop]) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)
    assert first.stop_sequence is None and first.stop_reason == "max_tokens"


def test_anthropic_errors_have_anthropic_shape(proxy):
    bad = anthropic.Anthropic(base_url=proxy.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        bad.messages.create(model="any", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "authentication_error"
    status, _, body = http("POST", proxy.url + "/v1/messages", {"max_tokens": 4}, {"x-api-key": KEY})
    assert status == 400 and body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    # refused by llama.cpp itself (chat's OpenAI error), answered in Anthropic's shape
    status, _, body = http(
        "POST",
        proxy.url + "/v1/messages",
        {"max_tokens": 4, "messages": [{"role": "user", "content": 123}]},
        {"x-api-key": KEY},
    )
    assert status == 400 and body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
    # a text block without its text: llama.cpp answers 500 ("key 'text' not found")
    with pytest.raises(anthropic.BadRequestError) as caught:
        _anthropic(proxy).messages.create(
            model="any", max_tokens=4, messages=[{"role": "user", "content": [{"type": "text"}]}],  # type: ignore
        )
    assert "text must be a string" in caught.value.body["error"]["message"]
    # an image for the text-only model: llama.cpp's 500, answered as the client's mistake it is
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError) as caught:
        _anthropic(proxy).messages.create(model="any", max_tokens=4, messages=[{"role": "user", "content": [image]}])
    assert "image input is not supported" in caught.value.body["error"]["message"]
    status, _, body = http(
        "POST",
        proxy.url + "/v1/messages/count_tokens",
        {"model": "any", "messages": [{"role": "user", "content": "count me"}]},
        {"x-api-key": KEY},
    )
    assert status == 200 and body["input_tokens"] > 0


def test_responses_conversation_hits_and_streams(proxy):
    client = proxy.client(api_key=KEY)
    raw = client.responses.with_raw_response.create(
        model="any", instructions=SYSTEM, input="What does the dispatcher own?", max_output_tokens=4
    )
    first = raw.parse()
    assert raw.headers["x-proxycache-decision"] in ("miss", "small")
    items = [
        {"role": "user", "content": "What does the dispatcher own?"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": first.output_text}]},
        {"role": "user", "content": "And who releases the lease?"},
    ]
    raw = client.responses.with_raw_response.create(model="any", instructions=SYSTEM, input=items, max_output_tokens=4)
    second = raw.parse()
    assert raw.headers["x-proxycache-decision"] == "hit"
    assert second.usage.input_tokens_details.cached_tokens > 100
    items += [
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": second.output_text}]},
        {"role": "user", "content": "Thanks."},
    ]
    with client.responses.with_streaming_response.create(
        model="any", instructions=SYSTEM, input=items, max_output_tokens=4, stream=True
    ) as response:
        assert response.headers["x-proxycache-decision"] == "hit"
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    completed = [e for e in events if e["type"] == "response.completed"][0]
    assert completed["response"]["usage"]["input_tokens_details"]["cached_tokens"] > 100
    status, _, body = http(
        "POST",
        proxy.url + "/v1/responses",
        {"input": "x", "previous_response_id": "resp_1"},
        {"Authorization": f"Bearer {KEY}"},
    )
    assert status == 400 and "previous_response_id" in body["error"]["message"]


def test_responses_input_as_the_conversation_state_guide_writes_it(proxy):
    """
    OpenAI's conversation-state guide sends earlier answers as {"role": "assistant", "content": "..."}, no type;
    llama.cpp refuses that ("Cannot determine type of 'item'"): the proxy sends it as an output message.
    """
    client = proxy.client(api_key=KEY)
    items = [{"role": "user", "content": "Tell me a joke about the slot map."}]
    first = client.responses.create(model="any", instructions=SYSTEM, input=items, max_output_tokens=4)
    items += [
        {"role": "assistant", "content": first.output_text},
        {"type": "reasoning", "id": "rs_1", "summary": []},  # nothing readable in it: left out
        {"role": "user", "content": "Tell me another."},
    ]
    raw = client.responses.with_raw_response.create(model="any", instructions=SYSTEM, input=items, max_output_tokens=4)
    second = raw.parse()
    assert raw.headers["x-proxycache-decision"] == "hit"
    assert second.usage.input_tokens_details.cached_tokens > 100
    items += [{"role": "assistant", "content": [{"type": "input_text", "text": second.output_text}]},
              {"type": "message", "role": "assistant", "content": [{"type": "refusal", "refusal": "Not that."}]},
              {"role": "user", "content": "One more."}]
    with client.responses.with_streaming_response.create(
        model="any", instructions=SYSTEM, input=items, max_output_tokens=4, stream=True
    ) as response:
        assert response.headers["x-proxycache-decision"] == "hit"
        assert any('"response.completed"' in line for line in response.iter_lines())
    with pytest.raises(openai.BadRequestError) as caught:  # a stored item cannot be referred to
        client.responses.create(model="any", input=items + [{"type": "item_reference", "id": "msg_1"}])
    assert "item reference" in caught.value.message


def test_evicted_conversations_come_back_from_disk_on_every_api(llama_factory, tmp_path):
    """Four conversations (Messages, Responses, two chats) on two slots: the evicted ones come back as restores."""
    # No RAM prompt cache: llama.cpp would otherwise empty idle slots itself (--cache-idle-slots).
    llama = llama_factory(cache_ram_mib=0)
    proxy = start_proxy(tmp_path, llama, **PROXY_OPTIONS)
    try:
        _evicted_comes_back(proxy)
    finally:
        proxy.stop()


def _evicted_comes_back(proxy):
    messages_client, openai_client = _anthropic(proxy), proxy.client(api_key=KEY)
    # Long enough that a restore clearly beats recomputing (the cost model decides; the tiny model is fast)
    conversation = [{"role": "user", "content": "Tell me about the slot map. " * 80}]
    _messages_turn(messages_client, conversation)
    items = [{"role": "user", "content": "Tell me about the disk tier. " * 80}]
    openai_client.responses.create(model="any", instructions=SYSTEM, input=items, max_output_tokens=4)
    # Two more conversations take both slots, whichever the placement evicts first (under load, a
    # write-behind save can make either slot the cheaper one to take).
    for project in ("A third project. ", "A fourth project. "):
        openai_client.chat.completions.create(
            model="any", max_tokens=4, messages=[{"role": "user", "content": project * 120}]
        )
    conversation.append({"role": "user", "content": "And when it is stale?"})
    raw = messages_client.messages.with_raw_response.create(
        model="any", max_tokens=4, system=SYSTEM, messages=conversation
    )
    status = http("GET", proxy.url + "/status", None, {"x-api-key": KEY})[2]
    assert raw.headers["x-proxycache-decision"] == "restore", json.dumps(status)
    assert raw.parse().usage.cache_read_input_tokens > 100
    items.append({"role": "user", "content": "And its budget?"})
    raw = openai_client.responses.with_raw_response.create(
        model="any", instructions=SYSTEM, input=items, max_output_tokens=4
    )
    assert raw.headers["x-proxycache-decision"] == "restore", json.dumps(
        http("GET", proxy.url + "/status", None, {"x-api-key": KEY})[2]
    )
    assert raw.parse().usage.input_tokens_details.cached_tokens > 100


WEATHER = {
    "name": "get_weather",
    "description": "weather of a city",
    "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["Lisbon"]}}, "required": ["city"]
    },
}
# tool_choice "required" and the generated model's biased <tool_call> token: a call, at once (proxycache.tinymodel);
# one call: llama.cpp's grammar lets a call hold several ("<tool_call>{...}, {...}</tool_call>") unless told not to
FORCED = dict(
    tool_choice="required", parallel_tool_calls=False, temperature=0, extra_body={"logit_bias": FORCE_TOOL_CALL_BIAS}
)


@pytest.fixture
def tapped(llama, tmp_path):
    """The daemon in front of llama.cpp through a L{ReplyTap}: C{(proxy, tap)}."""
    tap = ReplyTap(llama.url)
    process = ProxyProcess(
        tmp_path, tap.url, api_keys=KEY, slot_save_path=str(llama.save_dir), health_interval=60, **SMALL_LIMITS
    ).start()
    yield process, tap
    process.stop()
    tap.close()


def _sent(tap, marker):
    """The one response body llama.cpp sent that has C{marker}."""
    [body] = [body for body in tap.bodies() if marker in body]
    return body


def test_streamed_tool_call_is_relayed_byte_for_byte_and_its_result_turn_hits(tapped):
    proxy, tap = tapped
    client = proxy.client(api_key=KEY)
    tools = [{"type": "function", "function": WEATHER}]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Weather in Lisbon?"}]
    with client.chat.completions.with_streaming_response.create(
        model="any", messages=messages, tools=tools, max_tokens=512, stream=True, **FORCED
    ) as response:
        received = b"".join(response.iter_bytes())
    assert received == _sent(tap, b'"tool_calls"')  # what llama.cpp streamed, byte for byte
    # what the openai SDK makes of those bytes
    chunks = list(openai.Stream(cast_to=ChatCompletionChunk, response=httpx2.Response(200, content=received),
                                client=client))
    deltas = [call for chunk in chunks for choice in chunk.choices for call in choice.delta.tool_calls or []]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    arguments = "".join(delta.function.arguments or "" for delta in deltas)
    assert json.loads(arguments) == {"city": "Lisbon"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    call = {"id": deltas[0].id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": deltas[0].id, "content": "sunny, 24C"},
    ]
    raw = client.chat.completions.with_raw_response.create(model="any", messages=messages, tools=tools, max_tokens=4)
    assert raw.headers["x-proxycache-decision"] == "hit"
    assert raw.parse().usage.prompt_tokens_details.cached_tokens > 100


def test_responses_function_call_is_relayed_byte_for_byte_and_its_output_turn_hits(tapped):
    proxy, tap = tapped
    client = proxy.client(api_key=KEY)
    tools = [{"type": "function", **WEATHER}]
    items = [{"role": "user", "content": "Weather in Lisbon?"}]
    with client.responses.with_streaming_response.create(
        model="any", instructions=SYSTEM, input=items, tools=tools, max_output_tokens=512, stream=True, **FORCED
    ) as response:
        received = b"".join(response.iter_bytes())
    assert received == _sent(tap, b'"function_call"')
    events = list(openai.Stream(cast_to=ResponseStreamEvent, response=httpx2.Response(200, content=received),
                                client=client))
    [call] = events[-1].response.output  # response.completed
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Lisbon"}
    items += [
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 24C"},
    ]
    raw = client.responses.with_raw_response.create(
        model="any", instructions=SYSTEM, input=items, tools=tools, max_output_tokens=4
    )
    assert raw.headers["x-proxycache-decision"] == "hit"
    assert raw.parse().usage.input_tokens_details.cached_tokens > 100


def test_messages_tool_use_round_trip_is_a_hit(proxy):
    client = _anthropic(proxy)
    tools = [
        {
            "name": "get_weather",
            "description": "weather of a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }
    ]
    messages = [{"role": "user", "content": "Weather in Lisbon?"}]
    raw = client.messages.with_raw_response.create(
        model="any", max_tokens=4, system=SYSTEM, messages=messages, tools=tools
    )
    assert raw.parse().type == "message"
    messages += [
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Lisbon"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny, 24C"}]}
            ],
        },
    ]
    with client.messages.stream(model="any", max_tokens=4, system=SYSTEM, messages=messages, tools=tools) as stream:
        assert stream.response.headers["x-proxycache-decision"] == "hit"
        final = stream.get_final_message()
    assert final.usage.cache_read_input_tokens > 100
    assert final.stop_reason in ("max_tokens", "end_turn", "tool_use")


def test_several_choices_are_served_on_one_slot(proxy, llama):
    client = proxy.client(api_key=KEY)
    other = [{"role": "user", "content": "Keep this conversation warm. " * 20}]
    client.chat.completions.create(model="any", messages=other, max_tokens=2)
    raw = client.chat.completions.with_raw_response.create(
        model="any", max_tokens=3, n=3, messages=[{"role": "user", "content": "Three answers please. " * 20}]
    )
    completion = raw.parse()
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert completion.usage.completion_tokens >= 3
    raw = client.chat.completions.with_raw_response.create(model="any", messages=other, max_tokens=2)
    assert raw.headers["x-proxycache-decision"] == "hit"  # the extra choices did not land on its slot


def test_several_streamed_choices_are_served_on_one_slot(proxy, llama):
    client = proxy.client(api_key=KEY)
    other = [{"role": "user", "content": "Keep this conversation warm. " * 20}]
    client.chat.completions.create(model="any", messages=other, max_tokens=2)
    computed = llama.prompt_tokens_total()
    stream = client.chat.completions.create(
        model="any", max_tokens=4, n=3, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Three streamed answers please. " * 20}],
        extra_body={"ignore_eos": True},
    )
    text: dict[int, str] = {}
    finish: dict[int, str] = {}
    usages = []
    for chunk in stream:
        usages += [chunk.usage] if chunk.usage is not None else []
        for choice in chunk.choices:
            text[choice.index] = text.get(choice.index, "") + (choice.delta.content or "")
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    # Every choice streamed (the noise model's bytes may all be held back as broken UTF-8, so a
    # choice's text can be empty: the summed completion tokens below prove each one generated).
    assert sorted(text) == [0, 1, 2]
    assert finish == {0: "length", 1: "length", 2: "length"}
    assert len(usages) == 1 and usages[0].completion_tokens == 12  # one usage chunk, summed
    # Each choice after the first reused the prompt the one before left in the slot.
    assert llama.prompt_tokens_total() - computed < 1.2 * usages[0].prompt_tokens
    raw = client.chat.completions.with_raw_response.create(model="any", messages=other, max_tokens=2)
    assert raw.headers["x-proxycache-decision"] == "hit"  # the extra choices did not land on its slot


def test_several_choices_with_a_fixed_seed_differ_and_come_again(proxy):
    """Served one after another, each choice has its own seed (seed + index): not n copies of one answer."""
    client = proxy.client(api_key=KEY)
    ask = dict(model="any", max_tokens=8, n=3, seed=42, temperature=1.0, extra_body={"ignore_eos": True},
               messages=[{"role": "user", "content": "Three different answers please. " * 20}])
    texts = [choice.message.content for choice in client.chat.completions.create(**ask).choices]
    assert len(set(texts)) == 3, texts
    assert [choice.message.content for choice in client.chat.completions.create(**ask).choices] == texts
    streamed: dict[int, str] = {}
    for chunk in client.chat.completions.create(**ask, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert sorted(streamed) == [0, 1, 2] and len(set(streamed.values())) == 3, streamed
    completions = client.completions.create(model="any", prompt="Two completions please. " * 20, max_tokens=8, n=2,
                                            seed=7, temperature=1.0, extra_body={"ignore_eos": True})
    assert completions.choices[0].text != completions.choices[1].text


def test_several_streamed_completions_come_with_one_summed_usage(proxy):
    stream = proxy.client(api_key=KEY).completions.create(
        model="any", prompt="Two streamed completions please. " * 20, max_tokens=3, n=2, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    finished = [choice.index for chunk in chunks for choice in chunk.choices if choice.finish_reason]
    assert finished == [0, 1]
    usages = [chunk.usage for chunk in chunks if chunk.usage is not None]
    assert len(usages) == 1 and usages[0].completion_tokens == 6


def test_llama_cpp_runs_extra_choices_on_other_slots(llama):
    """Why n > 1 is never sent as is: llama.cpp overwrites another slot's cache (here slot 1's)."""
    conversation = [{"role": "user", "content": "Slot one holds this conversation. " * 20}]
    llama.post_json("/v1/chat/completions", {"messages": conversation, "max_tokens": 2, "id_slot": 1})
    again = llama.post_json("/v1/chat/completions", {"messages": conversation, "max_tokens": 2, "id_slot": 1})
    assert again["timings"]["cache_n"] > 100
    llama.post_json(
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Something else entirely. " * 20}],
            "max_tokens": 2,
            "id_slot": 0,
            "n_cmpl": 2,
        },
    )
    after = llama.post_json("/v1/chat/completions", {"messages": conversation, "max_tokens": 2, "id_slot": 1})
    assert after["timings"]["cache_n"] < 50


def test_lenient_input_and_http_niceties(llama, tmp_path):
    proxy = ProxyProcess(tmp_path, llama.url, cors_origins="https://app.example", **SMALL_LIMITS).start()
    try:
        body = json.dumps({"messages": [{"role": "ipython", "content": "result"}], "max_tokens": 10**9}).encode()
        # curl -d: a JSON body with a form Content-Type; a role llama.cpp knows; max_tokens above the context
        status, _, answer = http(
            "POST", proxy.url + "/v1/chat/completions", body, {"Content-Type": "application/x-www-form-urlencoded"}
        )
        assert status == 200, answer
        assert http("GET", proxy.url + "/v1/health")[0] == 200
        assert http("HEAD", proxy.url + "/v1/models")[0] == 200
        status, headers, _ = http(
            "OPTIONS",
            proxy.url + "/v1/messages",
            None,
            {
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-api-key, content-type",
            },
        )
        assert status == 204
        assert headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "x-api-key" in headers["Access-Control-Allow-Headers"]
        status, headers, _ = http("GET", proxy.url + "/v1/models", None, {"Origin": "https://evil.example"})
        assert status == 403
        assert "Access-Control-Allow-Origin" not in headers
    finally:
        proxy.stop()


def test_responses_input_tokens_counts_what_a_request_would_compute(proxy):
    """
    llama-server converts a /v1/responses/input_tokens body as it converts a /v1/responses one: the proxy
    normalises it the same way, so the count is that of the prompt the request computes (the easy assistant
    message it used to pass on, llama.cpp refused: "Cannot determine type of 'item'").
    """
    client = proxy.client(api_key=KEY)
    items = [
        {"role": "user", "content": "How many tokens is this?"},
        {"role": "assistant", "content": "Quite a few."},  # the conversation-state guide's shape
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},  # nothing readable
        {"type": "message", "role": "assistant", "content": [{"type": "refusal", "refusal": "Not that."}]},
        {"role": "user", "content": "And now?"},
    ]
    counted = client.responses.input_tokens.count(model="any", instructions=SYSTEM, input=items)
    assert counted.object == "response.input_tokens"
    answer = client.responses.create(model="any", instructions=SYSTEM, input=items, max_output_tokens=2)
    assert counted.input_tokens == answer.usage.input_tokens > 100
    # what /v1/responses refuses up front (llama.cpp answered the cut-off call with a 500), in the same shape
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.input_tokens.count(model="any", input=[
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"city": "Lis'},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        ])
    assert caught.value.status_code == 400 and caught.value.code == "invalid_tool_arguments"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.input_tokens.count(model="any", input="x", previous_response_id="resp_1")
    assert caught.value.code == "previous_response_id_not_supported"


def test_messages_count_tokens_counts_what_a_request_would_compute(proxy):
    """
    llama-server converts a /v1/messages/count_tokens body as the proxy converts a /v1/messages one (system
    blocks, cache_control, tool_use/tool_result, thinking): the count is the prompt a request computes.  What
    /v1/messages refuses up front is refused here too, in Anthropic's shape (llama.cpp answered 500s the SDK
    retries, OpenAI-shaped errors, and counted an empty conversation).
    """
    client = _anthropic(proxy)
    tools = [{"name": "get_weather", "description": "weather of a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    system = [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1; cch=a5145;"},
        {"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}},
    ]
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Lisbon?", "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "The user wants the weather.", "signature": "sig"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Lisbon"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny, 24C"}]},
            {"type": "text", "text": "And tomorrow?"},
        ]},
    ]
    for extra in ({}, {"system": system}, {"system": system, "tools": tools}):
        counted = client.messages.count_tokens(model="any", messages=messages, **extra).input_tokens
        usage = client.messages.create(model="any", max_tokens=2, messages=messages, **extra).usage
        assert counted == usage.input_tokens + usage.cache_read_input_tokens > 30, extra
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    refused = {
        "text must be a string": [{"role": "user", "content": [{"type": "text"}]}],  # llama.cpp: 500
        "role must be a string": [{"content": "hi"}],  # llama.cpp: 500
        "must hold at least one message": [],  # llama.cpp counted it
        "image input is not supported": [{"role": "user", "content": [image]}],  # llama.cpp: 500, OpenAI-shaped
        "to be a string or an array": [{"role": "user", "content": 123}],  # llama.cpp: 400, OpenAI-shaped
    }
    for said, wrong in refused.items():
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.messages.count_tokens(model="any", messages=wrong)  # type: ignore[arg-type]
        body = caught.value.body
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
        assert said in body["error"]["message"]
