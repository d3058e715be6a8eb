"""
HTTP plumbing towards llama-server: failures told apart, and response bodies
streamed so that they can be cancelled.

Cancelling C{treq.collect} does not close the connection, so bodies are piped
through L{_BodyPipe}, whose Deferred's canceller stops the transport: llama.cpp
sees the connection close and stops generating, freeing its slot.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionClosed,
    ConnectionDone,
    ConnectionLost,
    DNSLookupError,
)
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse
from zope.interface import implementer

log = Logger()


class UpstreamError(Exception):
    """llama-server could not be reached or broke off a response."""


# Every way a request to llama-server fails when the server is down, slow, gone
# or cuts a reply short: one tuple, caught wherever llama-server is called.
UPSTREAM_FAILURES = (
    ConnectError,  # refused, no route, ...
    DNSLookupError,
    ConnectionClosed,
    TimeoutError,
    ResponseFailed,  # includes ResponseNeverReceived: the reply was cut inside its headers
    RequestTransmissionFailed,
    UpstreamError,
)


def unreachable(error: BaseException | None) -> bool:
    """
    Nobody listens there (as opposed to a slow or broken reply): the server is gone.
    Not a DNS failure: a cancelled connection attempt to a host name ends as one too.
    """
    while error is not None:
        if isinstance(error, ConnectError):
            return True
        error = error.__cause__
    return False


def cancelled(error: BaseException | None) -> bool:
    """The request was cancelled here (its client went away), which is no failure of llama-server's."""
    while error is not None:
        if isinstance(error, (CancelledError, ConnectingCancelledError)):
            return True
        if any(reason.check(CancelledError) for reason in getattr(error, "reasons", ())):
            return True  # treq's request cancelled while it waited for the headers
        error = error.__cause__
    return False


def is_stale_connection(failure: Failure) -> bool:
    """
    The request met a pooled connection llama.cpp was closing, and got no
    answer: safe to send once more on a new connection.
    """
    return bool(failure.check(ResponseNeverReceived, RequestTransmissionFailed)) and all(
        reason.check(ConnectionDone, ConnectionLost) for reason in failure.value.reasons
    )


class StreamStalled(UpstreamError):
    """No body bytes arrived for longer than the idle timeout."""


@implementer(IPushProducer)
class _BodyPipe(Protocol):
    """
    llama.cpp's response body, fed to C{on_data}; with a C{consumer} (the
    client's request), also its producer: paused while the client's connection is full.
    """

    def __init__(
        self,
        on_data: Callable[[bytes], None],
        clock: IReactorTime,
        idle_timeout: float,
        consumer: IConsumer | None = None,
        client_stall_timeout: float | None = None,
    ) -> None:
        self.on_data = on_data
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.consumer = consumer
        self.client_stall_timeout = client_stall_timeout
        self.done: Deferred[None] = Deferred(self._cancel)
        self._idle: IDelayedCall | None = None
        self._client_stall: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._idle = self.clock.callLater(self.idle_timeout, self._stalled)
        if self.consumer is not None and getattr(self.consumer, "channel", True) is None:
            # The client left before the body began: stop llama.cpp instead of relaying to nobody.
            self.consumer = None
            self._stop()
            self.done.errback(Failure(UpstreamError("the client went away")))
            return
        if self.consumer is not None:
            # Back-pressure: a client that reads slowly pauses llama.cpp's
            # connection instead of piling its output up in our memory.
            self.consumer.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.idle_timeout)
        self.on_data(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._client_flowing()
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

    def _producer(self) -> IPushProducer:
        # The response's body transport: it pauses, resumes and stops the connection.
        return IPushProducer(self.transport)

    def _stop(self) -> None:
        if self.transport is not None:
            self._producer().stopProducing()

    def _cancel(self, _: Deferred) -> None:
        self._stop()

    # -- the client's producer --------------------------------------------

    def pauseProducing(self) -> None:
        self._producer().pauseProducing()
        if self.client_stall_timeout is not None and self._client_stall is None:
            self._client_stall = self.clock.callLater(self.client_stall_timeout, self._client_stalled)

    def resumeProducing(self) -> None:
        self._client_flowing()
        self._producer().resumeProducing()

    def stopProducing(self) -> None:
        self._client_flowing()
        self._producer().stopProducing()

    def _client_flowing(self) -> None:
        if self._client_stall is not None and self._client_stall.active():
            self._client_stall.cancel()
        self._client_stall = None

    def _client_stalled(self) -> None:
        # Took nothing for that long: gone in all but name (a laptop closed mid-answer).  Aborting
        # its connection ends the request as a hang-up does, and frees the slot now, not after
        # the upstream idle timeout.
        self._client_stall = None
        log.info("a client took nothing for {seconds:g} s: its connection is closed", seconds=self.client_stall_timeout)
        abort = getattr(getattr(self.consumer, "transport", None), "abortConnection", None)
        if abort is not None:
            abort()

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
    client_stall_timeout: float | None = None,
) -> "Deferred[None]":
    """
    Feed C{response}'s body to C{on_data}; cancelling closes the upstream
    connection.  With C{consumer}, the upstream is paused while it is, and a
    consumer paused for C{client_stall_timeout} seconds has its connection aborted.
    """
    pipe = _BodyPipe(on_data, clock, idle_timeout, consumer, client_stall_timeout)
    response.deliverBody(pipe)
    return pipe.done


async def read_body(response: IResponse, clock: IReactorTime, idle_timeout: float) -> bytes:
    chunks: list[bytes] = []
    await pipe_body(response, chunks.append, clock, idle_timeout)
    return b"".join(chunks)
