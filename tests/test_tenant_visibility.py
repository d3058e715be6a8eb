"""
Tenants in C{/status} and C{/metrics}, through the real daemon and a real
llama.cpp server: labels say which key or user, never the key itself.
"""

from __future__ import annotations

import openai

from tests.conftest import SMALL_LIMITS
from tests.conversations import User
from proxycache.testing import ProxyProcess, call

KEYS = ("sk-first-secret", "sk-second-secret")


def test_status_and_metrics_show_each_key_as_a_tenant_and_never_the_key(llama, tmp_path):
    proxy = ProxyProcess(tmp_path, llama.url, api_keys=",".join(KEYS), health_interval=60, **SMALL_LIMITS).start()
    try:
        first = openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEYS[0], max_retries=0)
        second = openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEYS[1], max_retries=0)
        alice = User("alice", context_words=100)
        alice.turn(first)
        assert alice.turn(first)["decision"] == "hit"
        User("bob", context_words=100).turn(second)
        status, body = call("GET", proxy.url + "/status", api_key=KEYS[0])
        tenants = {row["tenant"]: row for row in body["tenants"]}
        assert set(tenants) == {"key1", "key2"}
        assert (tenants["key1"]["requests"], tenants["key1"]["hits"]) == (2, 1)
        assert tenants["key2"]["requests"] == 1 and tenants["key2"]["prefill_tokens"] > 0
        assert {slot["tenant"] for slot in body["slots"] if slot["state"] == "hot"} == {"key1", "key2"}
        _, metrics = call("GET", proxy.url + "/metrics", api_key=KEYS[0])
        assert 'proxycache_tenant_requests_total{tenant="key1"} 2.0' in metrics
        assert 'proxycache_tenant_in_flight' in metrics
        for key in KEYS:
            assert key not in str(body) and key not in metrics
    finally:
        proxy.stop()


def test_tenant_labels_are_capped_later_ones_count_as_other():
    from proxycache.routing import Decision
    from proxycache.slots import RequestRecord
    from proxycache.tenant_stats import MAX_TENANTS, TenantBook

    book = TenantBook()
    for n in range(MAX_TENANTS + 8):
        book.request_done(RequestRecord(
            at=0.0, decision=Decision.MISS, slot="0", backend="b", status=200, similarity=0.0, blocks=1,
            cache_n=0, prompt_n=10, predicted_n=1, prompt_ms=1.0, waited=0.5, seconds=1.0, tenant=f"user:u{n}",
        ))
    rows = {row["tenant"]: row for row in book.status({"user:u99": 1}, {})}
    assert len(rows) == MAX_TENANTS + 1 and rows["other"]["requests"] == 8 and rows["other"]["in_flight"] == 1
    names = [m.samples[0].labels.get("tenant") for m in book.metrics({}, {}) if m.samples]
    assert "other" in names
