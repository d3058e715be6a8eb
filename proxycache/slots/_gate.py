"""
Waiting for a ready backend instead of failing at once.

A request that finds no backend ready (none known yet after a proxy start, or
every one just seen down) is held, for at most C{timeout} seconds of "nothing
ready", and asks the monitor to look now instead of at its next poll.  The
gate holds no queue of its own for generating requests: they wait in the
scheduler's queue (so C{--max-queue} counts them), and the gate only puts a
deadline on that wait while no backend is ready.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from proxycache.slots._scheduler import Scheduler

T = TypeVar("T")


class NoBackend(Exception):
    """No backend became ready while the request could wait."""

    def __init__(self, reason: str, retry_after: int = 5) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@attrs.define(eq=False)
class _Held:
    waiting: Deferred[Any]
    ready: Callable[[], bool]
    timer: IDelayedCall | None = None
    expired: NoBackend | None = None


@attrs.define(eq=False)
class _Until:
    condition: Callable[[], bool]
    deferred: Deferred[None]


class ReadyGate:
    """
    C{look}: ask the monitor for a look now (it rate-limits); C{usable(name)}:
    whether backend C{name}'s slots may be planned on (not taken out);
    C{some_down()}: whether a backend was seen down (then a request asks for a
    look too, so it rejoins as soon as it answers).
    """

    def __init__(
        self,
        clock: IReactorTime,
        scheduler: Scheduler,
        timeout: float,
        *,
        look: Callable[[], Any] = lambda: None,
        usable: Callable[[str], bool] = lambda name: True,
        some_down: Callable[[], bool] = lambda: False,
    ) -> None:
        self.clock = clock
        self.scheduler = scheduler
        self.timeout = timeout
        self.look = look
        self.usable = usable
        self.some_down = some_down
        self.deadline: float | None = None  # stopping: every wait for a backend ends by then
        self._held: set[_Held] = set()
        self._until: list[_Until] = []

    @property
    def ready(self) -> bool:
        """A slot is known on a backend that takes requests."""
        closed = self.scheduler.closed
        return any(
            slot_id.backend not in closed and self.usable(slot_id.backend) for slot_id in self.scheduler.slots
        )

    @property
    def held(self) -> int:
        """Requests waiting while nothing they need is ready."""
        return sum(1 for held in self._held if held.timer is not None)

    def bounded(self, waiting: Deferred[T], ready: Callable[[], bool] | None = None) -> Deferred[T]:
        """
        C{waiting} (a lease being acquired), failed with L{NoBackend} after
        C{timeout} seconds during which C{ready()} (default: L{ready}) stays false.
        Cancelling it cancels C{waiting}.
        """
        held = _Held(waiting, ready or (lambda: self.ready))
        self._held.add(held)
        waiting.addBoth(self._done, held)
        if self.some_down() or (not waiting.called and not held.ready()):
            self.look()
        self._arm_or_disarm(held)
        return waiting

    def until(self, condition: Callable[[], bool]) -> Deferred[None]:
        """Fires when C{condition()} holds at a L{changed}, at once if it holds now; bounded by L{bounded}."""
        if condition():
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        until = _Until(condition, Deferred(lambda d: self._forget(until)))
        self._until.append(until)
        return self.bounded(until.deferred, condition)

    def changed(self) -> None:
        """The monitor looked (or took a backend out): wake, hold or release the waiting requests."""
        for until in list(self._until):
            if until.condition():
                self._forget(until)
                until.deferred.callback(None)
        for held in list(self._held):
            self._arm_or_disarm(held)

    def stop(self, within: float = 0.0) -> None:
        """
        Shutting down: whoever waits for a backend (or comes to) still may, the monitor still
        looks, but is answered within C{within} seconds (the drain's grace), not cut off by the exit.
        """
        self.deadline = self.clock.seconds() + within
        for held in list(self._held):
            if held.timer is not None and held.timer.active() and held.timer.getTime() > self.deadline:
                held.timer.cancel()
                held.timer = None
        self.changed()

    # -- internals ------------------------------------------------------------

    def _arm_or_disarm(self, held: _Held) -> None:
        if held.waiting.called:
            return
        if held.ready():
            if held.timer is not None:
                if held.timer.active():
                    held.timer.cancel()
                held.timer = None
            return
        if held.timer is not None:
            return
        now = self.clock.seconds()
        if self.deadline is not None and self.deadline - now < self.timeout:
            delay, error = self.deadline - now, NoBackend("proxycache is shutting down", retry_after=10)
        elif self.timeout > 0:
            delay, error = self.timeout, NoBackend(f"no llama-server became ready within {self.timeout:g} s")
        else:  # nothing to wait for (no monitor)
            delay, error = 0.0, NoBackend("no llama-server is ready")
        if delay <= 0:
            self._expire(held, error)
        else:
            held.timer = self.clock.callLater(delay, self._expire, held, error)

    def _expire(self, held: _Held, error: NoBackend) -> None:
        held.expired = error
        held.waiting.cancel()  # leaves the scheduler's queue cleanly; _done turns it into the error

    def _done(self, result: Any, held: _Held) -> Any:
        self._held.discard(held)
        if held.timer is not None and held.timer.active():
            held.timer.cancel()
        if held.expired is not None and isinstance(result, Failure) and result.check(CancelledError):
            return Failure(held.expired)
        return result

    def _forget(self, until: _Until) -> None:
        if until in self._until:
            self._until.remove(until)
