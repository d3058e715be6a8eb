"""
Per-tenant limits through the HTTP layer, in-process (L{StubTreq} over a fake
backend): a tenant over its queued limit hears 429 in its own API's shape,
others keep queueing.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from proxycache.config import Config
from proxycache.slots import Dispatcher, NoCache, Scheduler
from proxycache.web import Proxy
from tests.fakes import FakeBackend, chat_response


def chat(user: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hello " * 50}], "max_tokens": 2, "user": user}


def message(user: str) -> dict[str, Any]:
    return {"model": "any", "max_tokens": 2, "messages": [{"role": "user", "content": "hello " * 50}],
            "metadata": {"user_id": user}}


class TenantLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = FakeBackend()
        self.scheduler = Scheduler(self.clock, min_ratio=0.5, affinity_wait=5.0, max_queue=10, tenant_max_queued=1)
        self.scheduler.set_backend_slots(self.backend.name, 1)
        dispatcher = Dispatcher(self.clock, self.scheduler, {self.backend.name: self.backend}, NoCache(),
                                first_byte_timeout=30)
        proxy = Proxy(
            Config.load({}, {}), self.clock, dispatcher, {self.backend.name: self.backend},
            status=lambda: {}, metrics=lambda: b"", health=lambda: (True, {}),
        )
        self.treq = StubTreq(proxy.resource())

    def tearDown(self) -> None:
        # Serve whatever is in flight or queued: no request is left half done.
        served = 0
        while served < len(self.backend.pending):
            self.backend.pending[served].callback(chat_response())
            served += 1
            self.treq.flush()

    def post(self, path: str, body: Any) -> Any:
        d = self.treq.post("http://proxy" + path, json.dumps(body).encode(),
                           headers={b"content-type": [b"application/json"]})
        self.treq.flush()
        return d

    def refused(self, d: Any) -> tuple[int, Any, list[bytes] | None]:
        response = self.successResultOf(d)
        body = json.loads(self.successResultOf(response.content()))
        return response.code, body, response.headers.getRawHeaders(b"retry-after")

    def test_a_tenant_over_its_queued_limit_gets_429_others_still_queue(self) -> None:
        self.post("/v1/chat/completions", chat("alice"))  # holds the slot
        self.post("/v1/chat/completions", chat("alice"))  # waits: alice's one queued request
        code, body, retry = self.refused(self.post("/v1/chat/completions", chat("alice")))
        self.assertEqual(
            (code, body["error"]["code"], body["error"]["type"]), (429, "tenant_queue_full", "rate_limit_error")
        )
        self.assertIn("user:alice", body["error"]["message"])
        self.assertEqual(retry, [b"5"])
        self.post("/v1/chat/completions", chat("bob"))  # bob queues
        self.assertEqual(self.scheduler.queue_depth, 2)

    def test_messages_clients_hear_it_in_anthropics_shape(self) -> None:
        self.post("/v1/messages", message("carol"))
        self.post("/v1/messages", message("carol"))
        code, body, _ = self.refused(self.post("/v1/messages", message("carol")))
        self.assertEqual(code, 429)
        self.assertEqual((body["type"], body["error"]["type"]), ("error", "rate_limit_error"))
        self.assertIn("user:carol", body["error"]["message"])  # the tenant came from the Messages body
