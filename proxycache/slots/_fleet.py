"""
The backends behind the proxy, changed at run time: add one, drain one (no
new requests, those in flight finish, its hot slots saved where another
backend can restore them), remove one.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Mapping, MutableMapping

from twisted.logger import Logger

from proxycache.backend import Backend
from proxycache.slots._monitor import Monitor
from proxycache.slots._scheduler import Scheduler

log = Logger()


class Fleet:
    def __init__(
        self,
        backends: MutableMapping[str, Backend],
        scheduler: Scheduler,
        monitor: Monitor,
        *,
        connect: Callable[[str, str | None], Backend],
        save_hot_slots: Callable[[str], Awaitable[None]],
        on_added: Callable[[str, str | None], None] = lambda name, save_dir: None,
    ) -> None:
        self.backends = backends  # shared with the dispatcher, the tier and the HTTP layer
        self.scheduler = scheduler
        self.monitor = monitor
        self.connect = connect  # (URL, the key it takes, if any) -> Backend
        self.save_hot_slots = save_hot_slots  # waits for in-flight requests, then saves
        self.on_added = on_added  # (name, its save directory as this host sees it, if given)

    @property
    def urls(self) -> list[str]:
        return [b.url for b in self.backends.values()]

    def add(self, url: str, save_dir: str | None = None, api_key: str | None = None) -> Backend:
        """
        Watch a new backend; it takes requests once it answers.  C{api_key}: the
        key it takes (its C{--api-key}); none is sent when none is given.
        """
        url = url.rstrip("/")
        for backend in self.backends.values():
            if backend.url == url:
                self.scheduler.reopen(backend.name)  # re-adding a drained one opens it again
                return backend
        backend = self.connect(url, api_key)
        self.backends[backend.name] = backend
        self.on_added(backend.name, save_dir)
        self.monitor.watch(backend)
        log.info("backend {url} added", url=url)
        return backend

    async def drain(self, name: str) -> None:
        """No new requests on C{name}; those in flight finish; its hot slots are saved."""
        self.scheduler.close_backend(name)
        log.info("draining backend {name}", name=name)
        await self.save_hot_slots(name)
        log.info("backend {name} drained", name=name)

    async def remove(self, name: str) -> None:
        """Drain C{name}, then forget it."""
        if name not in self.backends:
            raise KeyError(name)
        await self.drain(name)
        self.monitor.unwatch(name)
        self.scheduler.set_backend_slots(name, 0)
        self.scheduler.reopen(name)
        del self.backends[name]
        log.info("backend {name} removed", name=name)

    async def reconcile(self, urls: list[str], keys: Mapping[str, str | None] | None = None) -> None:
        """
        Make the fleet these C{urls} (a reloaded configuration): add the new ones,
        each with its key in C{keys}, remove the others.
        """
        wanted = [u.rstrip("/") for u in urls]
        for url in wanted:
            self.add(url, api_key=(keys or {}).get(url))
        for backend in list(self.backends.values()):
            if backend.url not in wanted:
                await self.remove(backend.name)
