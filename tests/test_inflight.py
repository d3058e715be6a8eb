"""
L{proxycache.web._inflight.InFlight}: a drain waits for responses to finish.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from proxycache.web._inflight import InFlight


class _Channel:
    persistent = True


class _Request:
    """What L{InFlight} needs of a request: to hear when it finishes."""

    def __init__(self) -> None:
        self._finished: list[Deferred[None]] = []
        self.headers: dict[bytes, bytes] = {}
        self.channel = _Channel()

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name] = value

    def notifyFinish(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._finished.append(d)
        return d

    def finish(self) -> list[Deferred[None]]:
        for d in self._finished:
            d.callback(None)
        return self._finished


class InFlightTests(SynchronousTestCase):
    def test_drain_waits_for_the_last_response(self) -> None:
        in_flight = InFlight(Clock())
        request = _Request()
        in_flight.track(request)  # type: ignore[arg-type]
        drained = Deferred.fromCoroutine(in_flight.drain(30))
        self.assertNoResult(drained)
        request.finish()
        self.assertEqual(self.successResultOf(drained), 0)

    def test_a_response_finishing_after_the_grace_period_is_no_error(self) -> None:
        clock = Clock()
        in_flight = InFlight(clock)
        request = _Request()
        in_flight.track(request)  # type: ignore[arg-type]
        drained = Deferred.fromCoroutine(in_flight.drain(30))
        clock.advance(30)
        self.assertEqual(self.successResultOf(drained), 1)
        for finished in request.finish():  # the timed-out waiter must not be fired again (AlreadyCalledError)
            self.successResultOf(finished)
        self.assertEqual(len(in_flight), 0)

    def test_a_drain_closes_the_connections_of_requests_in_flight_after_their_response(self) -> None:
        in_flight = InFlight(Clock())
        request = _Request()
        in_flight.track(request)  # type: ignore[arg-type]
        Deferred.fromCoroutine(in_flight.drain(30))
        # kept alive, the client's next request would reach a stopping process, not the listening socket
        self.assertFalse(request.channel.persistent)
        self.assertEqual(request.headers[b"connection"], b"close")
