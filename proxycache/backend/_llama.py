"""
One llama-server, and every llama.cpp specific of talking to it: how a
request is pinned to a slot, slot actions, C{/slots}, C{/props}.
"""

from __future__ import annotations

import json
from typing import Any, Callable, cast

import attrs
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from proxycache.backend._actions import (
    IdleSlot, Restored, Saved, StillBusy, decoding, idle_slot, refused, restored, saved, unanswered,
)
from proxycache.backend._endpoints import BackendEndpoints
from proxycache.backend._features import PROBE_FILENAME, Features, saves_enabled
from proxycache.backend._http import UPSTREAM_FAILURES, UpstreamError, is_stale_connection, read_body
from proxycache.backend._identity import PROBE_BODY, file_digest, model_identity, probe_answer

log = Logger()

# How long llama.cpp may keep reporting a slot busy after the proxy released
# it (is_processing lags a cancelled request): polls, doubling from the first.
IDLE_POLLS = 12
IDLE_FIRST_DELAY = 0.05
IDLE_MAX_DELAY = 1.0
PROBE_TIMEOUT = 60.0  # one token of a short prompt; a slot may first have to come free
SAVES_PROBE_TIMEOUT = 5.0  # a restore of a missing file on an idle slot answers at once


@attrs.frozen
class Description:
    """What a llama-server said about itself when it came up."""

    props: dict[str, Any]
    total_slots: int | None
    model: str  # L{model_identity}: what a saved cache must have been written by
    features: Features = Features()  # what it lacks of what proxycache relies on
    process: str | None = None  # L{process_marker}: the process that was described


@implementer(IBodyProducer)
class WrittenAtOnce:
    """
    A request body already in memory, written with the request's headers:
    treq's default (C{FileBodyProducer}) writes it on a later cooperator
    tick, one more turn of the reactor on every request's way.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> "Deferred[None]":
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@attrs.define(eq=False)
class LlamaServer:
    """One llama-server, named by its base URL."""

    url: str
    client: HTTPClient
    clock: IReactorTime
    api_key: str | None = None
    fresh_client: HTTPClient | None = None  # a new connection per request, for retries
    to_thread: Callable[..., Deferred[Any]] = deferToThread
    _probe: list[list[float]] | None = attrs.field(default=None, init=False)  # the weights' last probe answer
    _probe_slot: int | None = attrs.field(default=None, init=False)  # the slot the last probe used (erased)
    _saves: bool | None = attrs.field(default=None, init=False)  # the last slot-saves probe's finding
    _probed_process: str | None = attrs.field(default=None, init=False)  # the process the weights answered in

    @classmethod
    def create(cls, reactor: Any, url: str, api_key: str | None, pool_size: int) -> "LlamaServer":
        pool = HTTPConnectionPool(reactor, persistent=True)
        # Default is 2: one connection per concurrent request to one backend is needed.
        pool.maxPersistentPerHost = pool_size
        pool.retryAutomatically = False
        endpoints = BackendEndpoints(reactor)
        client = HTTPClient(
            Agent.usingEndpointFactory(reactor, endpoints, pool=pool), data_to_body_producer=WrittenAtOnce
        )
        fresh = HTTPClient(
            Agent.usingEndpointFactory(reactor, endpoints, pool=HTTPConnectionPool(reactor, persistent=False)),
            data_to_body_producer=WrittenAtOnce,
        )
        return cls(url, client, reactor, api_key, fresh)

    @property
    def name(self) -> str:
        return self.url

    def _headers(self, extra: dict[bytes, list[bytes]] | None = None) -> dict[bytes, list[bytes]]:
        headers = dict(extra or {})
        if self.api_key:
            headers[b"authorization"] = [b"Bearer " + self.api_key.encode()]
        return headers

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[bytes, list[bytes]] | None = None,
        timeout: float | None = None,
    ) -> "Deferred[IResponse]":
        """A request whose body is left unread (stream it with L{pipe_body})."""

        def send(client: HTTPClient | None) -> "Deferred[IResponse]":
            assert client is not None
            # llama-server never redirects: no redirect layer on the way
            sent = client.request(
                method,
                self.url + path,
                data=body,
                headers=Headers(self._headers(headers)),
                unbuffered=True,
                allow_redirects=False,
            )
            return cast("Deferred[IResponse]", sent)

        def retry_if_stale(failure: Failure) -> Any:
            # llama.cpp's HTTP server closes idle keep-alive connections (and after
            # every streamed response); a generation that llama.cpp did start is
            # aborted by it when the connection drops, so one retry is safe.
            return send(self.fresh_client) if is_stale_connection(failure) else failure

        d = send(self.client).addErrback(retry_if_stale)
        if not timeout:
            return d
        # Unlike treq's timeout= (and addTimeout, which the Agent's own cancel
        # error slips past), this tells a timeout from a client's cancel.
        timed_out = []

        def expire() -> None:
            timed_out.append(True)
            d.cancel()

        timer = self.clock.callLater(timeout, expire)

        def settle(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if timed_out and isinstance(result, Failure):
                raise TimeoutError(f"no response headers from llama-server in {timeout:g} s")
            return result

        return d.addBoth(settle)

    def generate(self, path: str, body: dict[str, Any], slot: int, timeout: float) -> "Deferred[IResponse]":
        """Send a generating request to slot C{slot}, keeping its prompt cached there."""
        payload = dict(body, id_slot=slot, cache_prompt=True)
        return self.request(
            "POST", path, body=json.dumps(payload).encode(),
            headers={b"content-type": [b"application/json"]}, timeout=timeout,
        )

    async def call(self, method: str, path: str, payload: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
        """A JSON call: returns (status, decoded body or None)."""
        body = None if payload is None else json.dumps(payload).encode()
        headers = {b"content-type": [b"application/json"]} if body is not None else None
        try:
            response = await self.request(method, path, body=body, headers=headers, timeout=timeout)
            raw = await read_body(response, self.clock, timeout)
        except UPSTREAM_FAILURES as e:
            raise UpstreamError(f"{method} {path}: {e}") from e
        try:
            return response.code, json.loads(raw) if raw else None
        except ValueError:
            return response.code, None

    async def save_slot(self, index: int, filename: str, timeout: float) -> Saved:
        return saved(await self._slot_action(index, "save", filename, timeout))

    async def restore_slot(self, index: int, filename: str, timeout: float) -> Restored:
        return restored(await self._slot_action(index, "restore", filename, timeout))

    async def erase_slot(self, index: int, timeout: float) -> None:
        await self._slot_action(index, "erase", None, timeout)

    async def _slot_action(self, index: int, action: str, filename: str | None, timeout: float) -> Any:
        """C{POST /slots/{index}?action=...}: llama.cpp's reply; L{SlotActionFailed} unless it says 200."""
        try:
            payload = {} if filename is None else {"filename": filename}
            status, reply = await self.call("POST", f"/slots/{index}?action={action}", payload, timeout)
        except UPSTREAM_FAILURES as e:
            raise unanswered(action, index, e) from e
        if status != 200:
            raise refused(action, index, status, reply)
        return reply

    async def slots(self) -> list[dict[str, Any]] | None:
        """C{GET /slots}; None when llama-server does not show them (C{--no-slots})."""
        status, slots = await self.call("GET", "/slots")
        return slots if status == 200 and isinstance(slots, list) else None

    async def describe(self, probe: bool = True) -> Description | None:
        """
        C{/props}, the model's identity and what the server lacks (L{Features}:
        C{/slots}, slot saves); None when C{/props} does not answer.
        C{probe}: ask the weights (L{PROBE_BODY}) again.  The probe computes
        a short prompt in some idle slot, overwriting what it held: only when
        the server just came up (or may have), before the proxy uses its slots.
        """
        status, props = await self.call("GET", "/props")
        if status != 200 or not isinstance(props, dict):
            return None
        process = process_marker(props)
        _, models = await self.call("GET", "/v1/models")
        # Another process than the one whose weights answered last: they may be other weights.
        fresh = probe or self._probe is None or process != self._probed_process
        if fresh:
            self._probe = await self._ask_the_weights()
            self._probed_process = process
        path = props.get("model_path")
        digest = await self.to_thread(file_digest, path) if isinstance(path, str) and path else None
        total = props.get("total_slots")
        identity = model_identity(props, models, self._probe, digest)
        slots = await self.slots()
        if fresh:  # the proxy holds nothing in its slots yet: a failed restore may clear one
            self._saves = await self._saves_enabled(slots)
        features = Features(slots_endpoint=slots is not None, slot_saves=self._saves)
        if process is not None and await self.process() != process:
            # Restarted while it was described: the answers may come from two processes.
            log.info("llama-server {url} restarted while it was described: looking again", url=self.url)
            self._probed_process = None
            return None
        return Description(props, total if isinstance(total, int) else None, identity, features, process)

    async def process(self) -> str | None:
        """
        The marker of the process answering now (L{process_marker}); None when it
        shows none.  Raises L{UpstreamError} when C{/props} does not answer.
        """
        status, props = await self.call("GET", "/props")
        if status != 200 or not isinstance(props, dict):
            raise UpstreamError(f"GET /props: {status}")
        return process_marker(props)

    async def _saves_enabled(self, slots: list[dict[str, Any]] | None) -> bool | None:
        """
        Are slot saves on (C{--slot-save-path})?  C{/props} does not say: restore
        a file that cannot exist into the slot the identity probe just erased (or
        slot 0), when llama.cpp reports it idle; None when it cannot tell.
        """
        index = self._probe_slot if self._probe_slot is not None else 0
        if slots is None and self._probe_slot is None:
            return None  # cannot see whether slot 0 is idle
        if slots is not None:
            slot = next((s for s in slots if s.get("id") == index), None)
            if slot is None or slot.get("is_processing"):
                return None  # busy: an action there would be deferred
        try:
            status, reply = await self.call(
                "POST", f"/slots/{index}?action=restore", {"filename": PROBE_FILENAME}, SAVES_PROBE_TIMEOUT,
            )
        except UPSTREAM_FAILURES:
            return None
        if status == 200:  # there was such a file after all: leave the slot empty
            try:
                await self.call("POST", f"/slots/{index}?action=erase", {}, SAVES_PROBE_TIMEOUT)
            except UPSTREAM_FAILURES:
                pass
        return saves_enabled(status)

    async def _ask_the_weights(self) -> list[list[float]] | None:
        """The probe's answer; None (identity from shape and file only) when it gets none."""
        try:
            status, reply = await self.call("POST", "/completion", PROBE_BODY, PROBE_TIMEOUT)
        except UPSTREAM_FAILURES as e:
            status, reply = 0, str(e)
        answer = probe_answer(reply) if status == 200 else None
        self._probe_slot = None
        if status == 200 and isinstance(reply, dict) and isinstance(reply.get("id_slot"), int):
            # Leave the slot as empty as it was: no later prompt should reuse the probe's tokens.
            self._probe_slot = reply["id_slot"]
            try:
                await self.call("POST", f"/slots/{reply['id_slot']}?action=erase", {})
            except UPSTREAM_FAILURES:
                pass
        if answer is None:
            log.warn("llama-server {url}: no answer to the model identity probe ({status}): {reply!r:.200}",
                     url=self.url, status=status, reply=reply)
        return answer

    async def wait_until_idle(self, index: int) -> IdleSlot | None:
        """
        llama.cpp's own view of slot C{index} once it is idle (llama.cpp defers
        an action on a busy slot and resumes only one deferred task per slot
        release), telling whether it was seen generating first (L{StillBusy}
        while it stays busy); None when llama-server does not show its slots.
        """
        delay = IDLE_FIRST_DELAY
        decoded = False
        for _ in range(IDLE_POLLS):
            slots = await self.slots()
            if slots is None:
                return None
            slot = next((s for s in slots if s.get("id") == index), None)
            if slot is None:
                return None
            if not slot.get("is_processing"):
                return attrs.evolve(idle_slot(slot), decoded=decoded)
            decoded = decoded or decoding(slot)
            await deferLater(self.clock, delay, lambda: None)
            delay = min(delay * 2, IDLE_MAX_DELAY)
        raise StillBusy(f"slot {index} stayed busy in llama.cpp", decoded)


def process_marker(props: dict[str, Any]) -> str | None:
    """
    What tells one llama-server process from the next: C{/props} C{media_marker},
    a random string each process draws at start (unless C{LLAMA_MEDIA_MARKER}
    pins it); None when it shows none (then only task ids tell a restart).
    """
    marker = props.get("media_marker")
    return marker if isinstance(marker, str) and marker else None


def restarted(slots: list[dict[str, Any]], believed_in_use: set[int], max_task_seen: int) -> bool:
    """
    Did llama-server restart since we last looked?  A slot we believe holds a
    prompt but that llama.cpp reports as never used (no C{id_task}), or task ids
    that went backwards (or all gone: a slot keeps its last one through erase
    and restore), all mean a new process.
    """
    tasks = [s["id_task"] for s in slots if isinstance(s.get("id_task"), int)]
    if max_task_seen >= 0 and (not tasks or max(tasks) < max_task_seen):
        return True
    return any("id_task" not in s for s in slots if s.get("id") in believed_in_use)
