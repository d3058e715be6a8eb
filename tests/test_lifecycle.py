"""
Restarts of either process, on real servers: the daemon (C{twistd -n
proxycache}) and llama.cpp (the fixtures).  A request that finds no ready
backend waits for one instead of failing; the in-process rules are in
tests/test_ready_gate.py.
"""

from __future__ import annotations

import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import anthropic
import openai
import pytest

from proxycache.testing import ProxyProcess, http, wait_for

MESSAGES = [{"role": "user", "content": "Say something about the weather in Lisbon today, please."}]
# The poll as in production: every test here is answered long before the monitor's next look would come.
PRODUCTION_POLL = dict(health_interval=5)


def until(condition: Callable[[], Any], what: str = "condition") -> Any:
    return wait_for(condition, timeout=30.0, what=what)


def backend_up(proxy: ProxyProcess) -> bool:
    return bool(proxy.status()["backends"][0]["up"])


def chat(proxy: ProxyProcess) -> Any:
    return proxy.client().chat.completions.create(model="any", messages=MESSAGES, max_tokens=2, temperature=0)


def first_answer_after_listening(proxy: ProxyProcess, timeout: float = 60.0) -> tuple[int, Any]:
    """A chat request sent as soon as the proxy accepts connections: its status and body."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, _, body = http("POST", proxy.url + "/v1/chat/completions",
                                   {"messages": MESSAGES, "max_tokens": 2}, timeout=60)
            return status, body
        except (ConnectionRefusedError, urllib.error.URLError):
            time.sleep(0.01)
    raise AssertionError("the proxy never listened")


def test_a_restarted_proxy_holds_its_first_requests_until_its_first_look(llama, tmp_path):
    proxy = ProxyProcess(tmp_path, llama.url, **PRODUCTION_POLL).start()
    try:
        assert chat(proxy).choices
        assert proxy.stop() in (0, -15)
        proxy.spawn()  # the same options, port and state directory, started again
        status, body = first_answer_after_listening(proxy)
        assert status == 200, body  # not "503 no slots known yet"
        assert body["choices"]
    finally:
        proxy.stop()


def test_a_restarted_llama_server_serves_the_first_request_after_it_answers(llama, tmp_path):
    proxy = ProxyProcess(tmp_path, llama.url, **PRODUCTION_POLL).start()
    try:
        assert chat(proxy).choices
        llama.stop()
        until(lambda: not backend_up(proxy), what="the proxy seeing llama-server down")
        llama.start()  # returns as soon as its /health answers 200
        for _ in range(3):  # each at once, none waiting for the monitor's next poll
            assert chat(proxy).choices
    finally:
        proxy.stop()


def test_requests_while_the_only_backend_is_down_wait_for_it(llama, tmp_path):
    proxy = ProxyProcess(tmp_path, llama.url, **PRODUCTION_POLL).start()
    messages_client = anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0)
    try:
        llama.stop()
        until(lambda: not backend_up(proxy), what="the proxy seeing llama-server down")
        with ThreadPoolExecutor(3) as pool:
            models = pool.submit(lambda: proxy.client().models.list().data)  # a passthrough route
            chats = pool.submit(chat, proxy)
            messages = pool.submit(
                messages_client.messages.create, model="any", max_tokens=2, messages=MESSAGES
            )
            until(lambda: proxy.status()["waiting_for_backend"] == 3, what="all three requests waiting")
            assert proxy.status()["queue_depth"] == 2  # the generating ones, in the scheduler's queue
            assert proxy.metrics()["proxycache_waiting_for_backend"] == 3
            assert not models.done()  # the passthrough one waits for a healthy backend too
            llama.start()
            assert chats.result(timeout=120).choices
            assert messages.result(timeout=120).content is not None
            assert models.result(timeout=120)
        assert proxy.status()["queue_depth"] == 0
    finally:
        proxy.stop()


def test_a_request_waits_no_longer_than_the_queue_timeout(llama, tmp_path):
    proxy = ProxyProcess(tmp_path, llama.url, queue_timeout=1, **PRODUCTION_POLL).start()
    messages_client = anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0)
    try:
        llama.stop()
        until(lambda: not backend_up(proxy), what="the proxy seeing llama-server down")
        with pytest.raises(openai.InternalServerError) as refused:
            chat(proxy)
        assert refused.value.status_code == 503
        assert refused.value.response.headers["retry-after"] == "5"
        assert refused.value.body["code"] == "upstream_unavailable"  # the OpenAI SDK unwraps "error"
        with pytest.raises(anthropic.APIStatusError) as refused_messages:
            messages_client.messages.create(model="any", max_tokens=2, messages=MESSAGES)
        assert refused_messages.value.status_code == 503
        assert refused_messages.value.body["type"] == "error"
        assert proxy.status()["queue_depth"] == 0
        llama.start()
        until(lambda: backend_up(proxy), what="the proxy seeing llama-server back")
        assert chat(proxy).choices  # and it serves again
    finally:
        proxy.stop()
