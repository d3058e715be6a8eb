"""
Load: 200 requests from 50 concurrent clients over 4 slots, streaming and not.
Every response must belong to its own request: request i carries i marker
words, so its prompt token count identifies it.
"""

from __future__ import annotations

import concurrent.futures
import json
import urllib.request

from proxycache.testing import ProxyProcess, http

REQUESTS, CLIENTS = 200, 50


def prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": "request" + " zz" * i}]


def send(url: str, i: int) -> dict:
    stream = i % 2 == 0
    body = {"messages": prompt(i), "max_tokens": 8, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    request = urllib.request.Request(
        url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        raw = response.read()
        headers = response.headers
    if stream:
        events = [json.loads(line[6:]) for line in raw.decode().split("\n") if line.startswith("data: {")]
        assert raw.decode().count("data: [DONE]") == 1
        usage = next(e["usage"] for e in reversed(events) if e.get("usage"))
    else:
        usage = json.loads(raw)["usage"]
    return {"i": i, "prompt_tokens": usage["prompt_tokens"], "wait_ms": int(headers["x-proxycache-queue-wait-ms"])}


def test_200_requests_from_50_clients_on_4_slots(llama_factory, tmp_path):
    llama = llama_factory(slots=4, ctx_per_slot=2048)
    proxy = ProxyProcess(tmp_path, llama.url, max_queue=REQUESTS).start()
    try:
        base = http("POST", llama.url + "/v1/chat/completions", {"messages": prompt(0), "max_tokens": 1})[2]
        base_tokens = base["usage"]["prompt_tokens"]
        per_marker = (
            http("POST", llama.url + "/v1/chat/completions", {"messages": prompt(1), "max_tokens": 1})[2]["usage"][
                "prompt_tokens"
            ]
            - base_tokens
        )
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(lambda i: send(proxy.url, i), range(REQUESTS)))
        assert len(results) == REQUESTS  # no errors: send() raises on any
        for result in results:
            assert result["prompt_tokens"] == base_tokens + per_marker * result["i"], result
        assert max(r["wait_ms"] for r in results) < 60_000  # nobody starved
        status = proxy.status()
        assert status["queue_depth"] == 0
        assert not any(slot["busy"] for slot in status["slots"])
        assert status["totals"]["requests"] == REQUESTS
    finally:
        proxy.stop()
