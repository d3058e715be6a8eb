"""The fleet of backends changed at run time, in process."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from proxycache.routing import Fingerprint, Request
from proxycache.slots import Fleet, Monitor, Scheduler
from tests.fakes import FakeBackend


async def _saved(name: str) -> None:
    return None


def test_a_drained_backend_added_again_serves_the_requests_that_waited_for_it():
    clock = Clock()
    scheduler = Scheduler(clock, min_ratio=0.5, affinity_wait=1.0, max_queue=4)
    backend = FakeBackend()
    monitor = Monitor(clock, scheduler, [backend], 1.0, None)
    fleet = Fleet({backend.name: backend}, scheduler, monitor, connect=FakeBackend, save_hot_slots=_saved)
    scheduler.set_backend_slots(backend.name, 1)
    assert Deferred.fromCoroutine(fleet.drain(backend.name)).called
    waiting = scheduler.acquire(Request(Fingerprint((1, 2, 3), 300, 48), small=False))
    assert not waiting.called and scheduler.closed == {backend.name}
    assert fleet.add(backend.url) is backend
    assert waiting.called and scheduler.closed == set()
