"""
Bad input gets a clear error in the client API's shape with the right status,
and changes nothing: one table per shape.  Every case in them is decided
before a slot is taken, so each runs in process, through the daemon's own
request path over a fake llama-server (L{tests.fakes.InProcessDaemon}:
milliseconds); a few run end to end as well, through the real daemon in front
of a real llama.cpp server, beside what only llama.cpp decides (images, a gzip
body served) and the SDKs' view.
"""

from __future__ import annotations

import gzip
import json

import anthropic
import openai
import pytest

from proxycache.testing import ProxyProcess, http
from tests.fakes import InProcessDaemon, chat_response, parse_response

GOOD = [{"role": "user", "content": "hello"}]


def chat(**fields):
    return json.dumps({"messages": GOOD, "max_tokens": 2, **fields}).encode()


def calling(tool_calls):
    """A conversation in which the assistant made C{tool_calls}."""
    return chat(messages=GOOD + [{"role": "assistant", "tool_calls": tool_calls}, *GOOD])


def nested(depth):
    value = []
    for _ in range(depth - 1):
        value = [value]
    return value


# (name, method, path, raw body, headers, expected status, expected code or None)
CASES = [
    ("body not JSON", "POST", "/v1/chat/completions", b"{oops", {}, 400, "invalid_json"),
    ("JSON not an object", "POST", "/v1/chat/completions", b"[1, 2]", {}, 400, "invalid_json"),
    # past 256 KiB the body is parsed in a worker thread: the same error
    ("large body not JSON", "POST", "/v1/chat/completions", b'{"messages": [' + b"1," * 150_000 + b"oops", {}, 400,
     "invalid_json"),
    ("NaN is not JSON", "POST", "/v1/chat/completions", b'{"messages": NaN}', {}, 400, "invalid_json"),
    # Twisted would parse a form into request.args first, and answer a bare 400 of its own to a bad one
    ("a form, not JSON", "POST", "/v1/chat/completions", b"{oops", {"Content-Type": "multipart/form-data; boundary=zz"},
     400, "invalid_json"),
    ("body over the limit", "POST", "/v1/chat/completions", chat(pad="x" * 500_000), {}, 413, "body_too_large"),
    ("messages missing", "POST", "/v1/chat/completions", b'{"max_tokens": 2}', {}, 400, "missing_messages"),
    ("messages empty", "POST", "/v1/chat/completions", b'{"messages": []}', {}, 400, "invalid_request"),
    ("messages not a list", "POST", "/v1/chat/completions", b'{"messages": "hi"}', {}, 400, "invalid_request"),
    ("message not an object", "POST", "/v1/chat/completions", b'{"messages": ["hi"]}', {}, 400, "invalid_request"),
    ("role missing", "POST", "/v1/chat/completions", b'{"messages": [{"content": "hi"}]}', {}, 400, "invalid_request"),
    (
        "role unknown",
        "POST",
        "/v1/chat/completions",
        b'{"messages": [{"role": "wizard", "content": "hi"}]}',
        {},
        400,
        "invalid_request",
    ),
    (
        "content a number",
        "POST",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": 5}]}',
        {},
        400,
        "invalid_request",
    ),
    (
        "content part without type",
        "POST",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": [{"text": "hi"}]}]}',
        {},
        400,
        "invalid_request",
    ),
    (
        "invalid UTF-8",
        "POST",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
        {},
        400,
        "invalid_utf8",
    ),
    (
        "raw NUL byte",
        "POST",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "a\x00b"}]}',
        {},
        400,
        "invalid_json",
    ),
    (
        "lone surrogate",
        "POST",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
        {},
        400,
        "invalid_string",
    ),
    ("stream not a boolean", "POST", "/v1/chat/completions", chat(stream="yes"), {}, 400, "invalid_request"),
    # valid JSON, but Infinity to Python, and "Infinity" is no JSON to llama.cpp (it answered 500)
    ("number too large", "POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], '
     b'"temperature": 1e999}', {}, 400, "invalid_json"),
    ("encoding not gzip", "POST", "/v1/chat/completions", chat(), {"Content-Encoding": "br"}, 415,
     "unsupported_encoding"),
    ("gzip cut off", "POST", "/v1/chat/completions", gzip.compress(chat())[:-12], {"Content-Encoding": "gzip"},
     400, "invalid_gzip"),
    # 2 KB that inflate past --max-body-bytes (400 KB here): decoding stops at the limit
    ("gzip bomb", "POST", "/v1/chat/completions", gzip.compress(b" " * 2_000_000), {"Content-Encoding": "gzip"},
     413, "body_too_large"),
    # a tool call re-sent cut off: llama.cpp answers 500 ("Failed to parse tool call arguments as JSON")
    ("tool call arguments cut off", "POST", "/v1/chat/completions",
     calling([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"city": "Lis'}}]), {}, 400,
     "invalid_tool_arguments"),
    ("tool call arguments empty", "POST", "/v1/chat/completions",
     calling([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}]), {}, 400,
     "invalid_tool_arguments"),
    ("responses function call cut off", "POST", "/v1/responses", json.dumps({"input": [
        {"role": "user", "content": "hi"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"city": "Lis'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]}).encode(), {}, 400,
     "invalid_tool_arguments"),
    # llama.cpp answers these with a 500
    ("tools not an array", "POST", "/v1/chat/completions", chat(tools={"a": 1}), {}, 400, "invalid_request"),
    ("tool without a type", "POST", "/v1/chat/completions", chat(tools=[{"function": {"name": "f"}}]), {}, 400,
     "unsupported_tool"),
    ("tool of another type", "POST", "/v1/chat/completions", chat(tools=[{"type": "web_search"}]), {}, 400,
     "unsupported_tool"),
    ("tool calls not an array", "POST", "/v1/chat/completions", calling({"a": 1}), {}, 400, "invalid_request"),
    ("tool call without a type", "POST", "/v1/chat/completions", calling([{"function": {"name": "f"}}]), {}, 400,
     "invalid_request"),
    ("tool call named by a number", "POST", "/v1/chat/completions",
     calling([{"type": "function", "function": {"name": 1}}]), {}, 400, "invalid_request"),
    ("tool call id a number", "POST", "/v1/chat/completions",
     calling([{"id": 3, "type": "function", "function": {"name": "f", "arguments": "{}"}}]), {}, 400,
     "invalid_request"),
    ("function without a name", "POST", "/v1/chat/completions", chat(tools=[{"type": "function", "function": {}}]),
     {}, 400, "invalid_request"),
    # 200 KB of brackets: Python's JSON decoder runs out of recursion (it was a 500)
    ("JSON nested beyond recursion", "POST", "/v1/chat/completions",
     b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400, "invalid_json"),
    # decodable, but encoding it again for llama.cpp deeper in the stack could run out
    ("JSON nested 300 deep", "POST", "/v1/chat/completions", chat(extra=nested(300)), {}, 400, "invalid_json"),
    (
        "n on /completion",
        "POST",
        "/completion",
        json.dumps({"prompt": "hi", "n": 2}).encode(),
        {},
        400,
        "unsupported_n",
    ),
    (
        "n on /completion streamed",
        "POST",
        "/completion",
        json.dumps({"prompt": "hi", "n": 2, "stream": True}).encode(),
        {},
        400,
        "unsupported_n",
    ),
    ("n not a number", "POST", "/v1/chat/completions", chat(n="two"), {}, 400, "invalid_request"),
    # served one after another on one slot, a million choices would hold it for ever
    ("n above the slots", "POST", "/v1/chat/completions", chat(n=1_000_000), {}, 400, "unsupported_n"),
    ("n above the slots streamed", "POST", "/v1/chat/completions", chat(n=1_000_000, stream=True), {}, 400,
     "unsupported_n"),
    ("n_cmpl above the slots", "POST", "/v1/completions", json.dumps({"prompt": "hi", "n_cmpl": 17}).encode(), {},
     400, "unsupported_n"),
    ("max_tokens not a number", "POST", "/v1/chat/completions", chat(max_tokens="ten"), {}, 400, "invalid_request"),
    (
        "previous_response_id",
        "POST",
        "/v1/responses",
        json.dumps({"input": "hi", "previous_response_id": "resp_1"}).encode(),
        {},
        400,
        "previous_response_id_not_supported",
    ),
    ("responses without input", "POST", "/v1/responses", b'{"model": "x"}', {}, 400, "missing_input"),
    # the Responses reference allows them, no local server can serve them (llama.cpp: "Cannot determine type")
    ("responses item reference", "POST", "/v1/responses",
     json.dumps({"input": [{"type": "item_reference", "id": "msg_1"}]}).encode(), {}, 400,
     "item_reference_not_supported"),
    ("responses hosted tool item", "POST", "/v1/responses",
     json.dumps({"input": [{"type": "web_search_call", "id": "ws_1", "status": "completed"}]}).encode(), {}, 400,
     "unsupported_item"),
    (
        "client names a slot on infill",
        "POST",
        "/infill",
        json.dumps({"input_prefix": "a", "id_slot": 0}).encode(),
        {},
        400,
        "slot_not_allowed",
    ),
    ("client names a slot", "POST", "/v1/chat/completions", chat(id_slot=1), {}, 400, "slot_not_allowed"),
    ("unknown route", "GET", "/v2/everything", None, {}, 404, "unknown_route"),
    ("wrong method", "GET", "/v1/chat/completions", None, {}, 405, None),
    ("wrong method on a passthrough", "DELETE", "/tokenize", None, {}, 405, "method_not_allowed"),
    (
        "slot save by a client",
        "POST",
        "/slots/0?action=save",
        b'{"filename": "../../etc/passwd"}',
        {},
        403,
        "slots_forbidden",
    ),
    (
        "slot restore by a client",
        "POST",
        "/slots/1?action=restore",
        b'{"filename": "slotcache_0.bin"}',
        {},
        403,
        "slots_forbidden",
    ),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory, module_llama):
    workdir = tmp_path_factory.mktemp("bad-input")
    proxy = ProxyProcess(
        workdir, module_llama.url, max_body_bytes=400_000, slot_save_path=str(module_llama.save_dir)
    ).start()
    proxy.client().chat.completions.create(model="any", messages=GOOD, max_tokens=2)  # a known slot map
    yield proxy, module_llama
    proxy.stop()


@pytest.fixture(scope="module")
def in_process():
    """The daemon's request path in process (over a fake llama-server), set up as C{served} is."""
    daemon = InProcessDaemon(max_body_bytes=400_000)
    answer = daemon.send("POST", "/v1/chat/completions", chat())
    daemon.backend.pending[0].callback(chat_response({"cache_n": 0, "prompt_n": 9}))  # a known slot map
    assert parse_response(answer.value())[0] == 200
    return daemon


def _slot_map(status):
    return [(s["slot"], s["state"], s["conversation"], s["tokens"]) for s in status["slots"]]


# Through the real daemon's socket too: the header guard, a decoding error, a refused slot name, /slots.
END_TO_END = ["body over the limit", "invalid UTF-8", "client names a slot", "slot save by a client"]


@pytest.mark.parametrize(
    "name, method, path, body, headers, status, code", [c for c in CASES if c[0] in END_TO_END], ids=END_TO_END
)
def test_bad_input_end_to_end(served, name, method, path, body, headers, status, code):
    proxy, _ = served
    _refused_and_nothing_changed(proxy, lambda: http(method, proxy.url + path, body, headers), status, code)


@pytest.mark.parametrize("name, method, path, body, headers, status, code", CASES, ids=[c[0] for c in CASES])
def test_bad_input(in_process, name, method, path, body, headers, status, code):
    proxy = in_process
    _refused_and_nothing_changed(proxy, lambda: proxy.http(method, path, body, headers), status, code)


def test_a_json_body_sent_as_a_form_is_served_as_llama_server_serves_it():
    # curl -F / a client's wrong Content-Type: the body is read as JSON whatever the header says
    daemon = InProcessDaemon()
    for content_type in ("multipart/form-data; boundary=zz", "multipart/form-data", "application/x-www-form-urlencoded"):
        answer = daemon.send("POST", "/v1/chat/completions", chat(), {"Content-Type": content_type})
        daemon.backend.pending[-1].callback(chat_response({"cache_n": 0, "prompt_n": 9}))
        assert parse_response(answer.value())[0] == 200, (content_type, answer.value()[:200])


def _refused_and_nothing_changed(proxy, send, status, code):
    """C{send()} is refused with C{status} (and C{code}) in OpenAI's shape; no slot or count changed."""
    before = proxy.status()
    got, response_headers, error = send()
    assert got == status, error
    assert response_headers["Content-Type"].startswith("application/json")
    assert set(error["error"]) == {"message", "type", "code"}
    assert error["error"]["message"]
    if code is not None:
        assert error["error"]["code"] == code
    after = proxy.status()
    assert not any(slot["busy"] for slot in after["slots"])
    assert _slot_map(after) == _slot_map(before)
    assert after["totals"]["requests"] == before["totals"]["requests"]


def messages(**fields):
    return json.dumps({"max_tokens": 2, "messages": GOOD, **fields}).encode()


# Messages: Anthropic's error shape.  (name, raw body, headers, expected status, Anthropic error type)
MESSAGES_CASES = [
    # llama.cpp answers these with a 500 (which the SDKs retry)
    ("role missing", messages(messages=[{"content": "hi"}]), {}, 400, "invalid_request_error"),
    ("role a number", messages(messages=[{"role": 1, "content": "hi"}]), {}, 400, "invalid_request_error"),
    ("message not an object", messages(messages=["hi"]), {}, 400, "invalid_request_error"),
    ("number too large", b'{"max_tokens": 2, "temperature": 1e999, "messages": [{"role": "user", "content": "hi"}]}',
     {}, 400, "invalid_request_error"),
    ("tool use input cut off", messages(messages=GOOD + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": '{"city": "Lis'}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"}]}]),
     {}, 400, "invalid_request_error"),
    # llama.cpp answers it with a 200
    ("no messages", messages(messages=[]), {}, 400, "invalid_request_error"),
    ("encoding not gzip", messages(), {"Content-Encoding": "deflate"}, 415, "invalid_request_error"),
]


@pytest.mark.parametrize("name, body, headers, status, kind", MESSAGES_CASES, ids=[c[0] for c in MESSAGES_CASES])
def test_bad_messages_input(in_process, name, body, headers, status, kind):
    proxy = in_process
    before = proxy.status()
    got, _, error = proxy.http("POST", "/v1/messages", body, headers)
    assert got == status, error
    assert error["type"] == "error" and error["error"]["type"] == kind and error["error"]["message"]
    after = proxy.status()
    assert _slot_map(after) == _slot_map(before)
    assert after["totals"]["requests"] == before["totals"]["requests"]


def test_the_anthropic_sdk_gets_a_400_for_a_message_without_a_role(served):
    proxy, _ = served
    requests = proxy.status()["totals"]["requests"]
    client = anthropic.Anthropic(base_url=proxy.url, api_key="none")  # retries 5xx twice by default
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="m", max_tokens=2, messages=[{"content": "hi"}])  # type: ignore[typeddict-item]
    assert "role" in caught.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="m", max_tokens=2, messages=[])
    assert proxy.status()["totals"]["requests"] == requests


def test_a_gzip_body_is_decoded(served):
    proxy, _ = served
    for path, body in (("/v1/chat/completions", chat()), ("/v1/messages", messages()), ("/tokenize",
                                                                                       b'{"content": "hello"}')):
        status, _, answer = http("POST", proxy.url + path, gzip.compress(body), {"Content-Encoding": "gzip"})
        assert status == 200, (path, answer)
    assert answer["tokens"]  # passed through decoded


def test_images_pass_through_and_fingerprint_on_text(served):
    proxy, _ = served
    image = "data:image/png;base64," + "iVBORw0KGgo" * 20000
    content = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": image}}]
    status, _, body = http(
        "POST",
        proxy.url + "/v1/chat/completions",
        {"messages": [{"role": "user", "content": content}], "max_tokens": 2},
    )
    # The proxy passes the image on (a vision model would answer); the text-only test model
    # refuses it with llama.cpp's message, as the 400 it is (llama.cpp says 500, which SDKs retry).
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert "image input is not supported" in body["error"]["message"]
    assert not any(slot["busy"] for slot in proxy.status()["slots"])
    requests = proxy.status()["totals"]["requests"]
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="none")  # retries 5xx twice by default
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], max_tokens=2)
    assert proxy.status()["totals"]["requests"] == requests + 1  # sent once
    status, _, body = http(  # the same for choices served one after another
        "POST", proxy.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], "n": 2}
    )
    assert status == 400 and "image input is not supported" in body["error"]["message"]


def test_the_openai_sdk_gets_a_400_for_a_tool_call_cut_off(served):
    proxy, _ = served
    requests = proxy.status()["totals"]["requests"]
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="none")  # retries 5xx twice by default
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"city": "Lis'}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", max_tokens=2, messages=GOOD + [
            {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "tool_call_id": "c1", "content": "sunny"}])
    assert "not valid JSON" in caught.value.message
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="m", input=GOOD + [
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"city": "Lis'},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"}])
    assert proxy.status()["totals"]["requests"] == requests  # refused before a slot, and not retried
