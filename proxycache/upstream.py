"""
Talking to one llama-server: JSON calls, slot actions, and body streaming that
can be cancelled.

Cancelling C{treq.collect} does not close the connection, so bodies are piped
through L{_BodyPipe}, whose Deferred's canceller stops the transport: llama.cpp
sees the connection close and stops generating, freeing its slot.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import attrs
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.error import (
    ConnectError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.web._newclient import ResponseNeverReceived, RequestTransmissionFailed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

log = Logger()


class UpstreamError(Exception):
    """llama-server could not be reached or broke off a response."""


# What a request to llama-server fails with when the server is down, slow or gone.
UPSTREAM_FAILURES = (
    ConnectError,
    ConnectionRefusedError,
    DNSLookupError,  # also what a cancelled connection attempt to a host name ends with
    TimeoutError,
    ResponseNeverReceived,
    RequestTransmissionFailed,
    UpstreamError,
)


class StreamStalled(UpstreamError):
    """No body bytes arrived for longer than the idle timeout."""


class _BodyPipe(Protocol):
    def __init__(
        self,
        on_data: Callable[[bytes], None],
        clock: IReactorTime,
        idle_timeout: float,
        consumer: IConsumer | None = None,
    ) -> None:
        self.on_data = on_data
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.consumer = consumer
        self.done: Deferred[None] = Deferred(self._cancel)
        self._idle = None

    def connectionMade(self) -> None:
        self._idle = self.clock.callLater(self.idle_timeout, self._stalled)
        if self.consumer is not None:
            # Back-pressure: a client that reads slowly pauses llama.cpp's
            # connection instead of piling its output up in our memory.
            self.consumer.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.idle_timeout)
        self.on_data(data)

    def connectionLost(self, reason: Failure) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        if self.consumer is not None:
            consumer, self.consumer = self.consumer, None
            if getattr(consumer, "channel", True) is not None:  # a finished request has none
                consumer.unregisterProducer()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(Failure(UpstreamError(f"response broken off: {reason.value}")))

    def _stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def _cancel(self, _: Deferred) -> None:
        self._stop()

    def _stalled(self) -> None:
        self._stop()
        if not self.done.called:
            self.done.errback(
                Failure(StreamStalled(f"no data from llama-server for {self.idle_timeout:g} s"))
            )


def pipe_body(
    response: IResponse,
    on_data: Callable[[bytes], None],
    clock: IReactorTime,
    idle_timeout: float,
    consumer: IConsumer | None = None,
) -> "Deferred[None]":
    """
    Feed C{response}'s body to C{on_data}; cancelling closes the upstream
    connection.  With C{consumer}, the upstream is paused while it is.
    """
    pipe = _BodyPipe(on_data, clock, idle_timeout, consumer)
    response.deliverBody(pipe)
    return pipe.done


async def read_body(response: IResponse, clock: IReactorTime, idle_timeout: float) -> bytes:
    chunks: list[bytes] = []
    await pipe_body(response, chunks.append, clock, idle_timeout)
    return b"".join(chunks)


@attrs.define(eq=False)
class Backend:
    """One llama-server, named by its base URL."""

    url: str
    client: HTTPClient
    clock: IReactorTime
    api_key: str | None = None
    fresh_client: HTTPClient | None = None  # a new connection per request, for retries

    @classmethod
    def create(cls, reactor: Any, url: str, api_key: str | None, pool_size: int) -> "Backend":
        pool = HTTPConnectionPool(reactor, persistent=True)
        # Default is 2: one connection per concurrent request to one backend is needed.
        pool.maxPersistentPerHost = pool_size
        pool.retryAutomatically = False
        pool._factory.noisy = False  # no "Starting factory" line per connection

        client = HTTPClient(Agent(reactor, pool=pool))
        fresh = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        return cls(url, client, reactor, api_key, fresh)

    @property
    def name(self) -> str:
        return self.url

    def headers(self, extra: dict[bytes, list[bytes]] | None = None) -> dict[bytes, list[bytes]]:
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
        def send(client: HTTPClient) -> Deferred:
            return client.request(
                method, self.url + path, data=body, headers=self.headers(headers), unbuffered=True
            )

        def retry_if_stale(failure: Failure) -> Any:
            # llama.cpp's HTTP server closes idle keep-alive connections (and after a
            # number of requests); a request that meets such a closing pooled connection
            # got no answer, so it is sent once more on a new connection.  (A slot
            # action is idempotent; a generation that llama.cpp did start is aborted
            # by it when the connection drops.)
            if failure.check(ResponseNeverReceived, RequestTransmissionFailed) and all(
                reason.check(ConnectionDone, ConnectionLost) for reason in failure.value.reasons
            ):
                return send(self.fresh_client)
            return failure

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

        def settle(result):
            if timer.active():
                timer.cancel()
            if timed_out and isinstance(result, Failure):
                raise TimeoutError(f"no response headers from llama-server in {timeout:g} s")
            return result

        return d.addBoth(settle)

    async def call(
        self, method: str, path: str, payload: Any = None, timeout: float = 10.0
    ) -> tuple[int, Any]:
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

    async def slot_action(self, index: int, action: str, filename: str | None, timeout: float) -> dict:
        """C{POST /slots/{index}?action=...}; raises L{UpstreamError} unless llama.cpp says 200."""
        payload = {} if filename is None else {"filename": filename}
        status, reply = await self.call("POST", f"/slots/{index}?action={action}", payload, timeout)
        if status != 200:
            message = (reply or {}).get("error", {}).get("message") if isinstance(reply, dict) else None
            raise UpstreamError(f"slot {index} {action} failed: {status} {message or reply}")
        return reply or {}
