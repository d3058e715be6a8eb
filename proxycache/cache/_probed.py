"""
Which weights a backend runs, as far as a slot action may trust: the model
identity the monitor probed, in the process that was probed (llama-server's
per-process marker), while no sign of a restart came since.

A saved file is labelled with the identity of the weights that computed it,
and restored only into the same weights; both are judged when the slot
action is made, and the process that made it is asked after, because a
llama-server restarted with other weights between two looks of the monitor
answers slot actions like the old one did.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime

from proxycache.backend import UPSTREAM_FAILURES, Backend, UpstreamError
from proxycache.cache._tier_state import Catalog

# After a restart, a restore waits this long for the new process's weights to be
# probed (the monitor looks again within half a second) before it gives up and recomputes.
PROBE_WAIT = 10.0


class NotProbed(UpstreamError):
    """The process that made (or would make) a slot action is not the one whose weights were probed."""


class ProbedProcesses:
    def __init__(self, catalog: Catalog, clock: IReactorTime, on_lost: Callable[[], Any]) -> None:
        self.catalog = catalog
        self.clock = clock
        self.on_lost = on_lost  # a restart seen at a slot action: the monitor looks again
        self._waiting: dict[str, list[Deferred[None]]] = {}

    def up(self, backend: str, model: str, process: str | None) -> int:
        """C{backend} was probed running C{model} in C{process}; see L{Catalog.backend_up}."""
        unusable = self.catalog.backend_up(backend, model, process)
        for waiter in self._waiting.pop(backend, []):
            waiter.callback(None)
        return unusable

    def lost(self, backend: str) -> None:
        """A sign that C{backend} restarted: nothing saved or restored there until it is probed again."""
        self.catalog.identity_lost(backend)

    async def described(self, backend: str) -> None:
        """Once C{backend}'s weights are known in the process answering there (or after L{PROBE_WAIT})."""
        if backend in self.catalog.confirmed:
            return
        waiter: Deferred[None] = Deferred()
        self._waiting.setdefault(backend, []).append(waiter)
        try:
            await waiter.addTimeout(PROBE_WAIT, self.clock)
        except TimeoutError:
            pass
        finally:
            waiting = self._waiting.get(backend, [])
            if waiter in waiting:
                waiting.remove(waiter)

    async def current(self, backend: Backend, model: str) -> bool:
        """
        Is C{backend} still the process whose weights were probed as C{model}?
        Asked of it (C{/props}); raises L{UPSTREAM_FAILURES} when it does not answer.
        """
        if self.catalog.current_model(backend.name) != model:
            return False
        expected = self.catalog.confirmed.get(backend.name)
        answering = await backend.process()
        if answering == expected and self.catalog.current_model(backend.name) == model:
            return True
        if self.catalog.confirmed.get(backend.name, answering) == expected:  # not probed again meanwhile
            self.catalog.identity_lost(backend.name)
            self.on_lost()
        return False

    async def made_by(self, backend: Backend, model: str) -> bool:
        """After a slot action: was it made by the probed process?  Not knowing is a no."""
        try:
            return await self.current(backend, model)
        except UPSTREAM_FAILURES:
            return False
