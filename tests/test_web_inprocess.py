"""
The HTTP layer in-process, through C{treq.testing.StubTreq}: a real
L{Dispatcher} and L{Scheduler} over a fake backend, no network.
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

CHAT = {"messages": [{"role": "user", "content": "hello " * 50}], "max_tokens": 2}


class ProxyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = FakeBackend()
        self.scheduler = Scheduler(self.clock, min_ratio=0.5, affinity_wait=5.0, max_queue=0)
        self.scheduler.set_backend_slots(self.backend.name, 1)

    def treq(self, **settings: Any) -> StubTreq:
        config = attrs.evolve(Config.load({}, {}), **settings)
        dispatcher = Dispatcher(self.clock, self.scheduler, {self.backend.name: self.backend}, NoCache(),
                                first_byte_timeout=30)
        proxy = Proxy(
            config, self.clock, dispatcher, {self.backend.name: self.backend},
            status=lambda: {"ok": True}, metrics=lambda: b"# metrics\n", health=lambda: (True, {}),
        )
        return StubTreq(proxy.resource())

    def post(self, treq: StubTreq, path: str, body: Any, headers: dict[bytes, list[bytes]] | None = None) -> Any:
        return treq.post("http://proxy" + path, json.dumps(body).encode(),
                         headers=headers or {b"content-type": [b"application/json"]})

    def answer(self, treq: StubTreq, d: Any) -> tuple[int, Any]:
        response = self.successResultOf(d)
        raw = self.successResultOf(response.content())
        return response.code, json.loads(raw) if raw else None

    def test_chat_is_relayed_with_the_proxys_headers(self) -> None:
        treq = self.treq()
        d = self.post(treq, "/v1/chat/completions", CHAT)
        treq.flush()
        self.backend.pending[0].callback(chat_response({"cache_n": 3, "prompt_n": 9}))
        treq.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"x-proxycache-decision"), [b"small"])
        self.assertEqual(response.headers.getRawHeaders(b"x-proxycache-cached-tokens"), [b"3"])
        self.assertEqual(self.backend.sent[0][2], 0)  # pinned to the slot it leased

    def test_full_queue_answers_429(self) -> None:
        treq = self.treq()
        first = self.post(treq, "/v1/chat/completions", CHAT)
        treq.flush()
        status, error = self.answer(treq, self.post(treq, "/v1/chat/completions", CHAT))
        self.assertEqual((status, error["error"]["code"]), (429, "queue_full"))
        self.backend.pending[0].callback(chat_response())
        treq.flush()
        self.assertEqual(self.successResultOf(first).code, 200)

    def test_unreachable_backend_answers_503_and_frees_the_slot(self) -> None:
        from twisted.internet.error import ConnectionRefusedError

        self.backend.fail_with = ConnectionRefusedError()
        treq = self.treq()
        status, error = self.answer(treq, self.post(treq, "/v1/chat/completions", CHAT))
        self.assertEqual((status, error["error"]["code"]), (503, "upstream_unavailable"))
        self.assertFalse(any(s.busy for s in self.scheduler.slots.values()))

    def test_bad_input_never_takes_a_slot(self) -> None:
        treq = self.treq()
        status, error = self.answer(treq, self.post(treq, "/v1/chat/completions", {"messages": []}))
        self.assertEqual(status, 400)
        self.assertEqual(self.backend.sent, [])

    def test_keys_guard_every_route_but_health_and_the_page(self) -> None:
        treq = self.treq(api_keys=("k",))
        status, error = self.answer(treq, self.post(treq, "/v1/chat/completions", CHAT))
        self.assertEqual((status, error["error"]["code"]), (401, "invalid_api_key"))
        self.assertEqual(self.successResultOf(treq.get("http://proxy/status")).code, 401)
        self.assertEqual(self.successResultOf(treq.get("http://proxy/proxycache/health")).code, 200)
        self.assertEqual(self.successResultOf(treq.get("http://proxy/")).code, 200)
        ok = treq.get("http://proxy/status", headers={b"authorization": [b"Bearer k"]})
        self.assertEqual(self.successResultOf(ok).code, 200)

    def test_slots_are_not_exposed_and_unknown_routes_are_404(self) -> None:
        treq = self.treq()
        self.assertEqual(self.answer(treq, treq.get("http://proxy/slots"))[0], 403)
        self.assertEqual(self.answer(treq, treq.get("http://proxy/nope"))[0], 404)
        self.assertEqual(self.answer(treq, treq.get("http://proxy/v1/chat/completions"))[0], 405)
