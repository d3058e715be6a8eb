"""
Per-tenant figures for C{/status}, the page and C{/metrics}: requests, hits,
tokens computed and reused, queue wait, and (live, from the scheduler) slots
held and requests waiting.

Tenants are labels (C{key1}, C{user:alice}, C{ip:10.0.0.7}); their number is
capped (L{MAX_TENANTS}) so that a client inventing user names cannot grow
memory or Prometheus' label set without bound: later ones count as C{other}.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import attrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from proxycache.routing import Decision
from proxycache.slots import RequestRecord

MAX_TENANTS = 32
OTHER = "other"


@attrs.define
class TenantTotals:
    requests: int = 0
    hits: int = 0  # hit or restore
    prefill_tokens: int = 0  # computed (timings.prompt_n)
    cached_tokens: int = 0  # reused (timings.cache_n)
    wait_seconds: float = 0.0
    max_wait: float = 0.0


class TenantBook:
    def __init__(self, limit: int = MAX_TENANTS) -> None:
        self.limit = limit
        self.totals: dict[str, TenantTotals] = {}

    def label(self, tenant: str) -> str:
        """C{tenant}, or C{other} once the cap is reached by others."""
        if tenant in self.totals or len(self.totals) < self.limit:
            return tenant
        return OTHER

    def request_done(self, record: RequestRecord) -> None:
        totals = self.totals.setdefault(self.label(record.tenant), TenantTotals())
        totals.requests += 1
        totals.hits += record.decision in (Decision.HIT, Decision.RESTORE)
        totals.prefill_tokens += record.prompt_n
        totals.cached_tokens += record.cache_n
        totals.wait_seconds += record.waited
        totals.max_wait = max(totals.max_wait, record.waited)

    def _live(self, counts: Mapping[str, int]) -> dict[str, int]:
        live: dict[str, int] = {}
        for tenant, n in counts.items():
            label = self.label(tenant)
            live[label] = live.get(label, 0) + n
        return live

    def status(self, in_flight: Mapping[str, int], queued: Mapping[str, int]) -> list[dict[str, Any]]:
        held, waiting = self._live(in_flight), self._live(queued)
        names = sorted(set(self.totals) | set(held) | set(waiting))
        rows = []
        for name in names:
            t = self.totals.get(name, TenantTotals())
            rows.append({
                "tenant": name,
                "in_flight": held.get(name, 0),
                "queued": waiting.get(name, 0),
                "requests": t.requests,
                "hits": t.hits,
                "hit_rate": round(t.hits / t.requests, 4) if t.requests else 0.0,
                "prefill_tokens": t.prefill_tokens,
                "cached_tokens": t.cached_tokens,
                "wait_avg": round(t.wait_seconds / t.requests, 3) if t.requests else 0.0,
                "wait_max": round(t.max_wait, 3),
            })
        return rows

    def metrics(self, in_flight: Mapping[str, int], queued: Mapping[str, int]) -> Iterable[Any]:
        families = {
            "requests": CounterMetricFamily(
                "proxycache_tenant_requests", "Requests served per tenant", labels=["tenant"]
            ),
            "hits": CounterMetricFamily("proxycache_tenant_hits", "Hits and restores per tenant", labels=["tenant"]),
            "prefill_tokens": CounterMetricFamily(
                "proxycache_tenant_prefill_tokens", "Prompt tokens computed per tenant", labels=["tenant"]
            ),
            "cached_tokens": CounterMetricFamily(
                "proxycache_tenant_cached_tokens", "Prompt tokens reused per tenant", labels=["tenant"]
            ),
            "wait_seconds": CounterMetricFamily(
                "proxycache_tenant_queue_wait_seconds", "Seconds queued for a slot per tenant", labels=["tenant"]
            ),
        }
        for name, t in sorted(self.totals.items()):
            for field, family in families.items():
                family.add_metric([name], getattr(t, field))
        yield from families.values()
        for metric, help_text, counts in (
            ("proxycache_tenant_in_flight", "Slots each tenant holds now", in_flight),
            ("proxycache_tenant_queued", "Requests each tenant has waiting", queued),
        ):
            gauge = GaugeMetricFamily(metric, help_text, labels=["tenant"])
            for name, n in sorted(self._live(counts).items()):
                gauge.add_metric([name], n)
            yield gauge
