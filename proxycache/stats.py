"""
What the proxy has done, for C{/metrics} (Prometheus), C{/status} and the page.

L{Stats} observes every finished request (L{proxycache.slots.RequestRecord})
and every save/restore; L{Stats.collector} exposes it together with live
slot, queue and disk state through C{prometheus_client}.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterable

import attrs
from twisted.internet.interfaces import IReactorTime
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from proxycache.cache import Catalog
from proxycache.routing import MIN_MEASURED_PREFILL_TOKENS, Decision, SlotState
from proxycache.slots import BackendHealth, Monitor, RequestRecord, Scheduler
from proxycache.tenant_stats import TenantBook

HISTORY_STEP = 10.0  # seconds per point of the page's chart
HISTORY_POINTS = 180


@attrs.define
class BackendTotals:
    requests: int = 0
    prefill_tokens: int = 0  # of requests large enough to measure prefill speed by
    prefill_ms: float = 0.0

    @property
    def speed(self) -> float | None:
        """Measured prefill tokens per second, once there is something to measure."""
        return round(self.prefill_tokens / (self.prefill_ms / 1000), 1) if self.prefill_ms else None


class Stats:
    def __init__(
        self,
        clock: IReactorTime,
        scheduler: Scheduler,
        catalog: Catalog,
        monitor: Monitor,
        *,
        max_cache_bytes: int = 0,
        max_cache_entries: int = 0,
        waiting_for_backend: Callable[[], int] = lambda: 0,
    ) -> None:
        self.clock = clock
        self.waiting_for_backend = waiting_for_backend  # requests held while no backend is ready
        self.scheduler = scheduler
        self.catalog = catalog
        self.monitor = monitor
        self.max_cache_bytes = max_cache_bytes
        self.max_cache_entries = max_cache_entries
        self.started = clock.seconds()
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.prefill_tokens = 0
        self.cached_tokens = 0
        self.seconds_saved = 0.0
        self.upstream_errors = 0
        self.by_backend: dict[str, BackendTotals] = {}
        self.recent: collections.deque = collections.deque(maxlen=50)
        self.history: collections.deque = collections.deque(maxlen=HISTORY_POINTS)
        self.tenants = TenantBook()
        self.registry = CollectorRegistry(auto_describe=True)
        self.queue_wait = Histogram(
            "proxycache_queue_wait_seconds",
            "Time requests waited for a slot",
            buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "proxycache_request_seconds",
            "Time from slot granted to last byte relayed",
            buckets=(0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
            registry=self.registry,
        )
        self.slot_action_seconds = Histogram(
            "proxycache_slot_action_seconds",
            "Duration of llama.cpp slot saves and restores",
            ["action"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=self.registry,
        )
        self.path_seconds = Histogram(
            "proxycache_path_seconds",
            "Time saves and restores cost a request before it was sent (its path): its own after it got its slot, "
            "and background saves it waited for",
            buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=self.registry,
        )
        self.path_totals = {"save": 0.0, "restore": 0.0, "save_wait": 0.0}
        self.slot_action_bytes = Histogram(
            "proxycache_slot_action_bytes",
            "Size of saved and restored slot caches",
            ["action"],
            buckets=tuple(2**i * 1_000_000 for i in range(0, 15)),
            registry=self.registry,
        )
        self.registry.register(_Collector(self))

    # -- observers ----------------------------------------------------------

    def request_done(self, record: RequestRecord) -> None:
        self.requests[(record.decision.value, str(record.status))] += 1
        self.prefill_tokens += record.prompt_n
        self.cached_tokens += record.cache_n
        # at the measured prefill speed (a per-request ratio is useless when prompt_n is 1)
        self.seconds_saved += record.cache_n / self.catalog.speeds.prefill_tokens_per_second
        if record.status == 0 or record.status >= 500:
            self.upstream_errors += 1
        self.queue_wait.observe(record.waited)
        self.request_seconds.observe(record.seconds)
        self.path_seconds.observe(record.path_seconds)
        self.path_totals["save"] += record.save_seconds
        self.path_totals["restore"] += record.restore_seconds
        self.path_totals["save_wait"] += record.save_wait_seconds
        self.recent.appendleft(record)
        self.tenants.request_done(record)
        self._add_history(record)
        served = self.by_backend.setdefault(record.backend, BackendTotals())
        served.requests += 1
        if record.prompt_n >= MIN_MEASURED_PREFILL_TOKENS and record.prompt_ms > 0:
            served.prefill_tokens += record.prompt_n
            served.prefill_ms += record.prompt_ms

    def slot_action(self, action: str, seconds: float, size: int) -> None:
        self.slot_action_seconds.labels(action).observe(seconds)
        self.slot_action_bytes.labels(action).observe(size)

    def _add_history(self, record: RequestRecord) -> None:
        bucket = int(record.at // HISTORY_STEP) * HISTORY_STEP
        if not self.history or self.history[-1]["t"] != bucket:
            self.history.append({"t": bucket, "requests": 0, "hits": 0, "cached_tokens": 0, "prefill_tokens": 0})
        point = self.history[-1]
        point["requests"] += 1
        point["hits"] += record.decision in (Decision.HIT, Decision.RESTORE)
        point["cached_tokens"] += record.cache_n
        point["prefill_tokens"] += record.prompt_n

    # -- views --------------------------------------------------------------

    def metrics_text(self) -> bytes:
        return generate_latest(self.registry)

    def _backend_status(self, health: BackendHealth) -> dict[str, Any]:
        name = health.backend.name
        slots = [s for s in self.scheduler.slots.values() if s.id.backend == name]
        served = self.by_backend.get(name, BackendTotals())
        return {
            "url": health.backend.url,
            "up": health.up,
            "model": health.props.get("model_path"),
            "build": health.props.get("build_info"),
            "restarts": health.restarts,
            "slots": len(slots),
            "busy": sum(1 for s in slots if s.busy),
            "saving": sum(1 for s in slots if s.saving),
            "draining": name in self.scheduler.closed,
            "requests": served.requests,
            "prefill_tokens_per_second": served.speed,
            "warnings": list(health.warnings),
            "duplicate_of": health.duplicate_of,
        }

    def hit_rate(self) -> float:
        total = sum(self.requests.values())
        hits = sum(n for (decision, _), n in self.requests.items() if decision in ("hit", "restore"))
        return hits / total if total else 0.0

    def status(self) -> dict[str, Any]:
        from proxycache import __version__

        now = self.clock.seconds()
        slots = [
            {
                "backend": slot.id.backend,
                "slot": slot.id.index,
                "state": slot.state.value,
                "conversation": slot.content.fingerprint.key[:8],
                "blocks": len(slot.content.fingerprint.blocks),
                "tokens": slot.content.tokens,
                "saved": slot.content.saved_key is not None,
                "busy": slot.busy,
                "saving": slot.saving,  # busy only with a background save (or a fork's save of it)
                "class": self.scheduler.slot_class(slot.id),
                "tenant": slot.content.tenant or None,
                "idle_seconds": round(now - slot.last_used, 1) if slot.last_used else None,
            }
            for slot in sorted(self.scheduler.slots.values(), key=lambda s: s.id)
        ]
        disk: dict[str, Any] = {
            "entries": len(self.catalog.index),
            "bytes": self.catalog.index.total_bytes,
            "max_bytes": self.catalog.max_bytes or self.max_cache_bytes or None,
            "max_entries": self.max_cache_entries or None,
        }
        disk.update(attrs.asdict(self.catalog.counters))
        backends = [self._backend_status(h) for h in self.monitor.health.values()]
        return {
            "version": __version__,
            "uptime_seconds": round(now - self.started, 1),
            "backends": backends,
            "slots": slots,
            "queue_depth": self.scheduler.queue_depth,
            "waiting_for_backend": self.waiting_for_backend(),
            "tenants": self.tenants.status(*self.scheduler.tenant_load()),
            "disk": disk,
            "totals": {
                "requests": sum(self.requests.values()),
                "by_decision": _by_decision(self.requests),
                "hit_rate": round(self.hit_rate(), 4),
                "cached_tokens": self.cached_tokens,
                "prefill_tokens": self.prefill_tokens,
                "prefill_seconds_saved": round(self.seconds_saved, 2),
                # on requests' paths, before they were sent
                "path_save_seconds": round(self.path_totals["save"], 3),
                "path_restore_seconds": round(self.path_totals["restore"], 3),
                "path_save_wait_seconds": round(self.path_totals["save_wait"], 3),
            },
            "recent": [
                {
                    "ago": round(now - r.at, 1),
                    "started": r.at - r.seconds,
                    "finished": r.at,
                    "decision": r.decision.value,
                    "slot": r.slot,
                    "tenant": self.tenants.label(r.tenant),
                    "status": r.status,
                    "cache_n": r.cache_n,
                    "prompt_n": r.prompt_n,
                    "wait": round(r.waited, 3),
                    "path_ms": round(r.path_seconds * 1000),
                    "save_wait_ms": round(r.save_wait_seconds * 1000),
                    "seconds": round(r.seconds, 3),
                }
                for r in self.recent
            ],
            "history": list(self.history),
        }


def _by_decision(requests: collections.Counter) -> dict[str, int]:
    totals: collections.Counter[str] = collections.Counter()
    for (decision, _), n in requests.items():
        totals[decision] += n
    return dict(totals)


class _Collector(Collector):
    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Any]:
        stats = self.stats
        requests = CounterMetricFamily(
            "proxycache_requests", "Generation requests by decision and HTTP status", labels=["decision", "status"]
        )
        for (decision, status), n in sorted(stats.requests.items()):
            requests.add_metric([decision, status], n)
        yield requests
        yield CounterMetricFamily(
            "proxycache_prefill_tokens",
            "Prompt tokens llama.cpp computed (timings.prompt_n)",
            value=stats.prefill_tokens,
        )
        yield CounterMetricFamily(
            "proxycache_cached_tokens", "Prompt tokens llama.cpp reused (timings.cache_n)", value=stats.cached_tokens
        )
        yield CounterMetricFamily(
            "proxycache_prefill_seconds_saved", "Estimated prefill seconds saved by reuse", value=stats.seconds_saved
        )
        yield CounterMetricFamily(
            "proxycache_upstream_errors", "Requests llama-server failed or did not answer", value=stats.upstream_errors
        )
        queue = GaugeMetricFamily(
            "proxycache_queue_depth", "Requests waiting for a slot", value=stats.scheduler.queue_depth
        )
        yield queue
        yield GaugeMetricFamily(
            "proxycache_waiting_for_backend", "Requests waiting because no llama-server is ready",
            value=stats.waiting_for_backend(),
        )
        yield from stats.tenants.metrics(*stats.scheduler.tenant_load())
        slots = GaugeMetricFamily("proxycache_slots", "Slots by state", labels=["state"])
        for state in SlotState:
            slots.add_metric([state.value], sum(1 for s in stats.scheduler.slots.values() if s.state is state))
        yield slots
        up = GaugeMetricFamily("proxycache_backend_up", "1 if the backend answered its last check", labels=["backend"])
        served = CounterMetricFamily(
            "proxycache_backend_requests", "Requests served by each backend", labels=["backend"]
        )
        speed = GaugeMetricFamily(
            "proxycache_backend_prefill_tokens_per_second", "Measured prefill speed of each backend", labels=["backend"]
        )
        for name, health in stats.monitor.health.items():
            totals = stats.by_backend.get(name, BackendTotals())
            up.add_metric([health.backend.url], 1.0 if health.up else 0.0)
            served.add_metric([health.backend.url], totals.requests)
            if totals.speed is not None:
                speed.add_metric([health.backend.url], totals.speed)
        yield up
        yield served
        yield speed
        yield GaugeMetricFamily(
            "proxycache_slots_busy",
            "Slots serving a request or a save",
            value=sum(1 for s in stats.scheduler.slots.values() if s.busy),
        )
        yield GaugeMetricFamily(
            "proxycache_slots_saving",
            "Slots busy only with a background save (or a fork's save of them), counted in proxycache_slots_busy",
            value=sum(1 for s in stats.scheduler.slots.values() if s.saving),
        )
        catalog = stats.catalog
        c = catalog.counters
        yield GaugeMetricFamily("proxycache_disk_entries", "Saved slot caches in the index", value=len(catalog.index))
        yield GaugeMetricFamily("proxycache_disk_bytes", "Bytes of saved slot caches", value=catalog.index.total_bytes)
        for name, help_text, value in (
            ("proxycache_slot_saves", "Slot caches saved", c.saves),
            ("proxycache_slot_save_failures", "Slot saves that failed", c.save_failures),
            ("proxycache_slot_saved_bytes", "Bytes written by slot saves", c.saved_bytes),
            ("proxycache_slot_restores", "Slot caches restored", c.restores),
            ("proxycache_slot_restore_failures", "Slot restores that failed", c.restore_failures),
            ("proxycache_restored_tokens", "Tokens loaded by restores", c.restored_tokens),
            (
                "proxycache_ineffective_restores",
                "Restores after which llama.cpp recomputed anyway",
                c.ineffective_restores,
            ),
            ("proxycache_disk_evictions", "Saved caches dropped to keep the disk budget", c.evicted_entries),
            (
                "proxycache_disk_dropped_unusable",
                "Saved caches dropped because llama.cpp will never restore them (file gone, damaged, refused)",
                c.dropped_unusable,
            ),
            ("proxycache_model_changes", "Backends that came up with other weights or another build", c.model_changes),
        ):
            yield CounterMetricFamily(name, help_text, value=value)
