"""
L{proxycache.slots.Monitor} on a L{Clock} with a scripted backend: when it
asks the weights again (the identity probe overwrites an idle slot).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.web.client import ResponseFailed

from proxycache.backend import Description, UpstreamError
from proxycache.slots import Monitor, Scheduler


class Scripted:
    name = url = "http://b"

    def __init__(self) -> None:
        self.probes: list[bool] = []
        self.slot_replies: list[Any] = []

    async def describe(self, probe: bool = True) -> Description:
        self.probes.append(probe)
        return Description({"total_slots": 1}, 1, "model")

    async def slots(self) -> list[dict[str, Any]]:
        reply = self.slot_replies.pop(0) if self.slot_replies else [{"id": 0, "n_ctx": 100, "id_task": 1}]
        if isinstance(reply, Exception):
            raise reply
        return reply


def check(monitor: Monitor) -> None:
    d = monitor.check()
    assert isinstance(d, Deferred) and d.called


def test_the_weights_are_asked_again_only_when_the_server_may_have_restarted():
    clock = Clock()
    backend = Scripted()
    monitor = Monitor(clock, Scheduler(clock, min_ratio=0.5, affinity_wait=1, max_queue=1), [backend], 1.0, None)
    backend.slot_replies = [
        UpstreamError("GET /slots: cut short"),  # a blip on a live server
        UpstreamError("GET /slots: refused"),  # the process is gone
    ]
    backend.slot_replies[0].__cause__ = ResponseFailed([])
    backend.slot_replies[1].__cause__ = ConnectionRefusedError()
    check(monitor)  # comes up: probed; then the blip: down
    check(monitor)  # up again, the same process: not probed; then refused: down
    check(monitor)  # up again, maybe another process: probed
    check(monitor)  # up: nothing to describe
    assert backend.probes == [True, False, True]
