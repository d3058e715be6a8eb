"""
Issue 24: the time a request spent on saves and restores before it was sent
(its path) is shown per request (response headers, the log, C{/status}'s
recent requests, the page) and as a C{/metrics} histogram.  In-process: the
real-server side is tests/test_siblings.py.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from proxycache.cache import Catalog
from proxycache.routing import Decision, Fingerprint, Plan, Request, SlotId
from proxycache.slots import Dispatcher, Lease, Monitor, NoCache, RequestRecord, Scheduler, Slot, SlotContent
from proxycache.stats import Stats
from proxycache.testing.http import prometheus
from proxycache.web._exchange import ClientExchange
from tests.fakes import FakeBackend, FakeResponse, RecordingExchange


class _PathCache(NoCache):
    """A cache tier that spent 0.25 s saving and 1.5 s restoring before the request."""

    def path_seconds(self, lease: Any) -> tuple[float, float]:
        return (0.25, 1.5)


def _request() -> Request:
    return Request(Fingerprint(tuple(range(20)), 2000, 320), small=False)


class PathCostTests(SynchronousTestCase):
    def test_the_dispatcher_hands_the_path_to_the_client_and_the_record(self) -> None:
        clock, backend = Clock(), FakeBackend()
        scheduler = Scheduler(clock, min_ratio=0.5, affinity_wait=5.0, max_queue=4)
        scheduler.set_backend_slots(backend.name, 1)
        records: list[RequestRecord] = []
        dispatcher = Dispatcher(clock, scheduler, {backend.name: backend}, _PathCache(),
                                first_byte_timeout=30, observers=[records.append])
        exchange = RecordingExchange()
        d = Deferred.fromCoroutine(dispatcher.dispatch(_request(), "/v1/chat/completions", {}, exchange))
        backend.pending[0].callback(FakeResponse())
        self.successResultOf(d)
        self.assertEqual(exchange.paths, [(0.25, 1.5)])
        self.assertEqual((records[0].save_seconds, records[0].restore_seconds), (0.25, 1.5))

    def test_headers_say_what_saving_and_restoring_cost(self) -> None:
        request = DummyRequest([b""])
        exchange = ClientExchange(request, Clock(), 30, False, {})
        lease = Lease(Slot(SlotId("b", 0)), Plan(Decision.RESTORE, SlotId("b", 0)), _request(), 0.0, SlotContent())
        exchange.begin(lease, Decision.RESTORE, 1000, (0.25, 1.5))
        headers = {name: request.responseHeaders.getRawHeaders(name)[0]
                   for name in (b"x-proxycache-path-ms", b"x-proxycache-save-ms", b"x-proxycache-restore-ms")}
        self.assertEqual(headers, {b"x-proxycache-path-ms": b"1750", b"x-proxycache-save-ms": b"250",
                                   b"x-proxycache-restore-ms": b"1500"})

    def test_metrics_and_status_show_the_path(self) -> None:
        clock = Clock()
        scheduler = Scheduler(clock, min_ratio=0.5, affinity_wait=5.0, max_queue=4)
        stats = Stats(clock, scheduler, Catalog(min_ratio=0.0), Monitor(clock, scheduler, [], 10.0, None))
        for save, restore in ((0.0, 0.0), (0.25, 1.5)):
            stats.request_done(RequestRecord(
                at=1.0, decision=Decision.RESTORE, slot="0", backend="b", status=200, similarity=1.0, blocks=20,
                cache_n=1000, prompt_n=10, predicted_n=2, prompt_ms=5.0, waited=0.0, seconds=2.0,
                save_seconds=save, restore_seconds=restore,
            ))
        metrics = prometheus(stats.metrics_text().decode())
        self.assertEqual(metrics["proxycache_path_seconds_count"], 2)
        self.assertEqual(metrics["proxycache_path_seconds_sum"], 1.75)
        self.assertEqual(metrics['proxycache_path_seconds_bucket{le="0.005"}'], 1)
        status = stats.status()
        self.assertEqual([r["path_ms"] for r in status["recent"]], [1750, 0])
        self.assertEqual((status["totals"]["path_save_seconds"], status["totals"]["path_restore_seconds"]),
                         (0.25, 1.5))
