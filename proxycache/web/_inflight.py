"""
Requests in flight, for a graceful stop: a drain waits until every response
is finished (or its client gone), not merely until handlers return.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request


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
        Refuse new generations and wait up to C{grace} seconds for those in
        flight (queued ones included) to be answered.  Returns how many were
        still running.
        """
        self.draining = True
        if self._requests:
            idle: Deferred[None] = Deferred()
            self._idle_waiters.append(idle)
            idle.addTimeout(grace, self.clock).addErrback(lambda f: f.trap(TimeoutError))
            await idle
        return len(self._requests)
