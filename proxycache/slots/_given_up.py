"""
Work its requester gave up on, left to end (L{detached}); and a request to
llama.cpp its client gave up on: what the dispatcher needs to learn what
llama.cpp computed there before it closes that connection (a look at the
slot comes first: llama.cpp may notice the close and stop), and to read away
an answer that comes after all.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IResponse

from proxycache.backend import UPSTREAM_FAILURES, Backend, decoding, read_body

T = TypeVar("T")


def detached(work: "Deferred[T]", late: Callable[[Any], Any] = lambda result: result) -> "Deferred[T]":
    """
    Fires with C{work}'s result; cancelling it leaves C{work} be (its owner
    cancels it later, or lets it end).  A result that comes after the cancel
    goes through C{late} to C{work}'s later callbacks (as it is, by default).
    """
    shield: Deferred[T] = Deferred()

    def forward(result: Any) -> Any:
        if not shield.called:
            shield.callback(result)  # a Failure errbacks
            return None
        return late(result)

    work.addBoth(forward)
    return shield


def discard(response: IResponse, clock: IReactorTime, idle_timeout: float) -> None:
    """An answer nobody waits for any more: read and dropped, so its connection is not left half read."""
    Deferred.fromCoroutine(read_body(response, clock, idle_timeout)).addErrback(lambda _: None)


async def generating(backend: Backend, index: int) -> bool:
    """Does llama.cpp show slot C{index} generating its answer, its prompt computed?"""
    try:
        slots = await backend.slots()
    except UPSTREAM_FAILURES:
        return False
    return any(slot.get("id") == index and decoding(slot) for slot in slots or ())
