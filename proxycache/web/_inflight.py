"""
Requests in flight, for a graceful stop: a drain waits until every response
is finished (or its client gone), not merely until handlers return.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest
from twisted.web.server import Request


def close_after(request: IRequest) -> None:
    """
    Close the connection once this response is sent, so that the client's next request goes to the
    listening socket (the next process's, with socket activation) rather than to a stopping one.
    """
    request.setHeader(b"connection", b"close")  # ignored if the headers went already: the close says it
    channel = getattr(request, "channel", None)
    if channel is not None:
        channel.persistent = False


class InFlight:
    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.draining = False
        self._requests: set[Request] = set()
        self._idle_waiters: list[Deferred[None]] = []

    def __len__(self) -> int:
        return len(self._requests)

    def track(self, request: Request) -> None:
        self._requests.add(request)
        request.notifyFinish().addBoth(lambda _: self._finished(request))

    def _finished(self, request: Request) -> None:
        self._requests.discard(request)
        if not self._requests:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.called:  # one that timed out has fired already
                    waiter.callback(None)

    async def drain(self, grace: float) -> int:
        """
        Close connections after their next response (the port is closed already) and wait up to
        C{grace} seconds for the requests in flight (queued ones included) to be answered.  Returns how many were
        still running.
        """
        self.draining = True
        for request in self._requests:
            close_after(request)
        if self._requests:
            idle: Deferred[None] = Deferred()
            self._idle_waiters.append(idle)
            idle.addTimeout(grace, self.clock).addErrback(lambda f: f.trap(TimeoutError))
            await idle
        return len(self._requests)
