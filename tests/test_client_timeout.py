"""
A client that gives up on a long whole answer (an SDK's client timeout) and
sends the same request again: llama.cpp finished the first one all the same,
so its slot holds the prompt, and the retry reuses it there instead of
computing it again on another slot.  Against a real llama.cpp server, with the
openai SDK.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import openai
import pytest

from proxycache.testing import wait_for
from tests.conftest import start_proxy
from tests.conversations import User

# Long enough that llama.cpp still generates when the client times out (1 s): a few seconds here;
# the test says so (it checks the client did time out) if a faster machine ever outruns it.
MAX_TOKENS = 2000
QUESTION = "explain the cache slot proxy in detail"
# The dispatcher's log line of a request sent to a slot.
RECORD = re.compile(r"\] (hit|miss|restore|small) slot=\S+#(\d+) status=")


def _chat(url: str, timeout: float, retries: int) -> tuple[Callable[..., Any], type[Exception]]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=timeout, max_retries=retries)
    user = User("impatient", context_words=400)
    messages = user.messages + [{"role": "user", "content": QUESTION}]
    body = dict(model="any", messages=messages, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})
    return lambda: client.chat.completions.with_raw_response.create(**body), openai.APITimeoutError


def _completions(url: str, timeout: float, retries: int) -> tuple[Callable[..., Any], type[Exception]]:
    # Not /v1/messages: llama.cpp drops ignore_eos there (b11434), so its answers end early.
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=timeout, max_retries=retries)
    prompt = User("impatient", context_words=400).messages[0]["content"] + "\n" + QUESTION
    body = dict(model="any", prompt=prompt, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})
    return lambda: client.completions.with_raw_response.create(**body), openai.APITimeoutError


def _decisions(proxy) -> list[tuple[str, int]]:
    """The proxy's record of each request sent to a slot: (decision, slot index)."""
    return [(m[1], int(m[2])) for m in RECORD.finditer(proxy.log_text())]


@pytest.mark.parametrize("api", [_chat, _completions], ids=["chat", "completions"])
def test_a_retry_after_a_client_timeout_reuses_the_prompt_llama_cpp_finished(api, llama, tmp_path):
    # A new llama-server's first long answer is many times slower than the next ones (seen here):
    # computing its prompt would outlast the client's timeout.  Warmed up behind the proxy's back.
    warm_up = User("warm-up", context_words=400).messages
    llama.post_json("/v1/chat/completions", {"messages": warm_up, "max_tokens": 1000, "ignore_eos": True})
    # The follow-up waits for its busy slot as long as the orphaned answer takes.
    # A slow health poll: a /slots poll racing a never-used slot's first request looks like a restart.
    proxy = start_proxy(tmp_path, llama, affinity_wait=600, health_interval=60)
    try:
        impatient, timed_out = api(proxy.url, timeout=1.0, retries=1)
        try:
            raw = impatient()  # the SDK's retry, served within its timeout
        except timed_out:  # given up on as well: the same request once more, with time to answer
            patient, _ = api(proxy.url, timeout=600, retries=0)
            raw = patient()
        raw.parse()
        assert "left before llama-server answered" in proxy.log_text(), "the test needs the client to time out"
        [(first, orphaned), *retried, last] = _decisions(proxy)
        assert first == "miss"
        assert (raw.headers["x-proxycache-decision"], raw.headers["x-proxycache-slot"]) == ("hit", str(orphaned))
        cached, computed = (int(raw.headers[f"x-proxycache-{name}-tokens"]) for name in ("cached", "prompt"))
        assert cached >= 0.95 * (cached + computed), (cached, computed)
        # However llama.cpp took the closed connection (it generates on, and the SDK's retry waits for
        # that slot in the proxy's queue; or it notices and stops, and the retry is sent there), every
        # retry was planned onto the prompt on that slot.  (The log has the plan: a miss on a slot
        # llama.cpp found the prompt on anyway would be reported a hit.)
        assert retried in ([], [("hit", orphaned)]) and last == ("hit", orphaned), (retried, last)
        wait_for(lambda: not any(slot["busy"] for slot in proxy.status()["slots"]), what="all slots free")
    finally:
        proxy.stop()
