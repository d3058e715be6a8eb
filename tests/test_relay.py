"""
The relay end to end: the real daemon (twistd -n proxycache) in front of a real
llama.cpp server, driven by the openai SDK.
"""

from __future__ import annotations

import http.client as httpclient
import json
import socket
import subprocess
import time

import pytest

from tests.conftest import SMALL_LIMITS
from proxycache.testing import TWISTD, ProxyProcess, free_port, http

PROXY_OPTIONS = dict(limits=SMALL_LIMITS)  # for the proxy fixture
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant. " * 10},
    {"role": "user", "content": "Say something about the weather in Lisbon today, please."},
]


def test_non_streaming_through_openai_sdk(proxy):
    # ignore_eos: the random model may otherwise stop at any token
    raw = proxy.client().chat.completions.with_raw_response.create(
        model="any", messages=MESSAGES, max_tokens=8, extra_body={"ignore_eos": True}
    )
    completion = raw.parse()
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage.completion_tokens == 8
    assert completion.model_extra["timings"]["prompt_n"] > 0  # llama.cpp's own field, untouched
    assert raw.headers["x-proxycache-decision"] in ("miss", "small")
    assert raw.headers["x-proxycache-slot"] in ("0", "1")
    assert raw.headers["x-proxycache-prompt-tokens"].isdigit()


def test_repeated_prompt_is_a_hit(proxy):
    client = proxy.client()
    client.chat.completions.create(model="any", messages=MESSAGES, max_tokens=4)
    raw = client.chat.completions.with_raw_response.create(model="any", messages=MESSAGES, max_tokens=4)
    assert raw.headers["x-proxycache-decision"] == "hit"
    timings = raw.parse().model_extra["timings"]
    assert timings["prompt_n"] <= 2 and timings["cache_n"] > 50


def test_streaming_through_openai_sdk(proxy):
    stream = proxy.client().chat.completions.create(
        model="any", messages=MESSAGES, max_tokens=64, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = list(stream)
    # The byte-level test model's tokens can end mid-character: llama.cpp then
    # joins a few into one chunk, so there are fewer chunks than tokens.
    assert len(chunks) >= 4
    assert "timings" in chunks[-1].model_extra
    assert chunks[-1].choices[0].finish_reason == "length"


def _raw_stream(url: str, body: dict) -> tuple[httpclient.HTTPResponse, httpclient.HTTPConnection]:
    host, port = url.removeprefix("http://").split(":")
    connection = httpclient.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    return connection.getresponse(), connection


def test_stream_is_relayed_as_it_arrives_with_one_done(proxy):
    response, connection = _raw_stream(
        proxy.url, {"messages": MESSAGES, "max_tokens": 400, "stream": True, "ignore_eos": True}
    )
    assert response.status == 200
    assert response.getheader("content-type").startswith("text/event-stream")
    started = time.monotonic()
    first = response.read1(65536)
    first_at = time.monotonic() - started
    rest = response.read()
    total = time.monotonic() - started
    connection.close()
    body = (first + rest).decode()
    assert first.startswith(b"data: ")
    assert body.count("data: [DONE]") == 1
    events = [line for line in body.splitlines() if line.startswith("data: {")]
    assert len(events) >= 100
    # The first chunk reached us long before the last one was generated.
    assert first_at < total / 2


def test_unknown_fields_pass_both_ways(proxy):
    completion = proxy.client().chat.completions.create(
        model="any", messages=MESSAGES, max_tokens=3, logprobs=True, top_logprobs=2,
        # the grammar keeps the random model to whole ASCII tokens: llama.cpp leaves the
        # probabilities out of a token that ends inside a UTF-8 character
        extra_body={"n_probs": 2, "samplers": ["top_k", "temperature"], "some_future_field": {"x": 1},
                    "grammar": "root ::= [a-z]+"},
    )
    assert completion.choices[0].logprobs is not None
    assert completion.choices[0].logprobs.content[0].top_logprobs
    assert "timings" in completion.model_extra


def test_passthrough_routes(proxy):
    status, _, models = http("GET", proxy.url + "/v1/models")
    assert status == 200 and models["data"]
    assert http("GET", proxy.url + "/health")[0] == 200
    assert http("GET", proxy.url + "/props")[2]["total_slots"] == 2
    status, _, tokens = http("POST", proxy.url + "/tokenize", {"content": "hello"})
    assert status == 200 and len(tokens["tokens"]) >= 5
    status, _, text = http("POST", proxy.url + "/detokenize", {"tokens": tokens["tokens"]})
    assert text["content"].strip() == "hello"
    status, _, prompt = http("POST", proxy.url + "/apply-template", {"messages": MESSAGES})
    assert status == 200 and "Lisbon" in prompt["prompt"]
    completion = proxy.client().completions.create(model="any", prompt="Once upon a time " * 5, max_tokens=4)
    assert completion.choices[0].text is not None


def test_slots_are_not_exposed(proxy):
    for method, path in (("GET", "/slots"), ("POST", "/slots/0?action=erase"), ("POST", "/slots/0?action=save")):
        status, _, body = http(method, proxy.url + path, {"filename": "x.bin"} if method == "POST" else None)
        assert status == 403
        assert body["error"]["code"] == "slots_forbidden"


def test_unknown_route_and_wrong_method(proxy):
    status, _, body = http("GET", proxy.url + "/v1/nothing-here")
    assert status == 404 and body["error"]["type"] == "invalid_request_error"
    status, _, body = http("GET", proxy.url + "/v1/chat/completions")
    assert status == 405 or status == 404
    assert "error" in body


def test_a_route_spelled_otherwise_is_served_as_the_route_it_matched(proxy):
    # Klein matches an encoded slash or a doubled one to the route; the proxy looked its API up by
    # the raw path and answered 500.
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for path in ("/v1/chat%2Fcompletions", "//v1/chat/completions"):
        status, _, body = http("POST", proxy.url + path, chat)
        assert status == 200 and body["object"] == "chat.completion", (path, body)
    status, _, body = http("POST", proxy.url + "/v1/completions%2F", {"prompt": "hi", "max_tokens": 2, "n": 2})
    assert status in (200, 404), body  # a route or none, never a 500


def test_invalid_json_is_a_400(proxy):
    status, _, body = http("POST", proxy.url + "/v1/chat/completions", b"{not json")
    assert status == 400
    assert body["error"]["code"] == "invalid_json"
    # and the daemon keeps serving
    assert proxy.client().chat.completions.create(model="any", messages=MESSAGES, max_tokens=2).choices


def test_upstream_errors_pass_through_with_their_body(proxy):
    import openai

    huge = [{"role": "user", "content": "word " * 9000}]  # beyond the 8192-token slot context
    with pytest.raises(openai.BadRequestError) as raised:
        proxy.client().chat.completions.create(model="any", messages=huge, max_tokens=4)
    assert raised.value.status_code == 400
    assert "context" in json.dumps(raised.value.body).lower()
    status = proxy.status()
    assert not any(slot["busy"] for slot in status["slots"])


def test_client_disconnect_mid_stream_stops_llama_cpp(proxy, llama):
    response, connection = _raw_stream(
        proxy.url, {"messages": MESSAGES, "max_tokens": 6000, "stream": True, "ignore_eos": True}
    )
    assert response.read1(65536).startswith(b"data: ")
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not any(slot["is_processing"] for slot in llama.slots()) and not any(
            slot["busy"] for slot in proxy.status()["slots"]
        ):
            break
        time.sleep(0.05)
    assert not any(slot["is_processing"] for slot in llama.slots())
    assert not any(slot["busy"] for slot in proxy.status()["slots"])
    # llama.cpp stopped early instead of generating all 6000 tokens
    assert llama.metrics()["llamacpp:tokens_predicted_total"] < 6000
    # the slot serves the next request at once
    assert proxy.client().chat.completions.create(model="any", messages=MESSAGES, max_tokens=2).choices


def test_llama_server_down_gives_503_json_and_recovery(tmp_path, llama_factory):
    port = free_port()
    proxy = ProxyProcess(
        tmp_path, f"http://127.0.0.1:{port}", queue_timeout=1, **SMALL_LIMITS
    ).start(wait_ready=False)
    try:
        status, headers, body = http("POST", proxy.url + "/v1/chat/completions", {"messages": MESSAGES})
        assert status == 503  # after waiting --queue-timeout for a backend
        assert body["error"]["code"] == "upstream_unavailable"
        assert headers["Retry-After"] == "5"
        assert http("GET", proxy.url + "/proxycache/health")[0] == 503
        # llama-server comes up later on that port: the proxy starts serving
        llama_factory(port=port)
        deadline = time.monotonic() + 20
        while http("GET", proxy.url + "/proxycache/health")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proxy.client().chat.completions.create(model="any", messages=MESSAGES, max_tokens=2).choices
    finally:
        proxy.stop()


def test_help_lists_every_option_with_env_and_default():
    from proxycache.config import SETTINGS

    result = subprocess.run([TWISTD, "proxycache", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    flat = " ".join(result.stdout.split())
    for setting in SETTINGS:
        assert f"--{setting.option}" in flat
        assert setting.env in flat


def test_invalid_option_stops_startup_with_one_clear_line():
    result = subprocess.run(
        [TWISTD, "-n", "proxycache", "--similarity-min-ratio=1.5"], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "--similarity-min-ratio='1.5': must be in (0, 1]" in result.stdout + result.stderr


def test_embedded_llama_cpp_with_llama_model(tmp_path, tiny_model):
    proxy = ProxyProcess(tmp_path, None, llama_model=str(tiny_model), slots=2, ctx_per_slot=4096, **SMALL_LIMITS)
    proxy.start(timeout=120)
    try:
        completion = proxy.client().chat.completions.create(
            model="any", messages=MESSAGES, max_tokens=4, extra_body={"ignore_eos": True}
        )
        assert completion.usage.completion_tokens == 4
        backend = proxy.status()["backends"][0]["url"]
    finally:
        # twistd ends with the signal it was stopped by, as init systems expect
        assert proxy.stop() in (0, -15)
    # the embedded llama.cpp stopped with the daemon
    with pytest.raises(OSError):
        http("GET", backend + "/health", timeout=2)

