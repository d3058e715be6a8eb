"""
Watching each llama-server: learn its slot count, notice restarts, warn about
settings that would move caches behind the proxy's back.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from proxycache.disk import model_identity
from proxycache.planner import SlotState
from proxycache.scheduler import Scheduler
from proxycache.upstream import UPSTREAM_FAILURES, Backend

log = Logger()


@attrs.define(eq=False)
class BackendHealth:
    backend: Backend
    configured_slots: int | None
    up: bool = False
    props: dict[str, Any] = attrs.field(factory=dict)
    model: str | None = None  # what a saved cache must have been written by (disk.model_identity)
    max_task_seen: int = -1
    restarts: int = 0
    slot_context: int | None = None  # n_ctx of one slot


def restarted(slots: list[dict[str, Any]], believed_in_use: set[int], max_task_seen: int) -> bool:
    """
    Did llama-server restart since we last looked?  A slot we believe holds a
    prompt but that llama.cpp reports as never used (no C{id_task}), or task ids
    that went backwards, both mean a new process.
    """
    tasks = [s["id_task"] for s in slots if isinstance(s.get("id_task"), int)]
    if tasks and max(tasks) < max_task_seen:
        return True
    return any("id_task" not in s for s in slots if s.get("id") in believed_in_use)


def settings_warnings(props: dict[str, Any], configured_slots: int | None) -> list[str]:
    warnings = []
    total = props.get("total_slots")
    if configured_slots is not None and total is not None and total != configured_slots:
        warnings.append(
            f"--slots is {configured_slots} but llama-server has {total} slots; using {total}"
        )
    if props.get("endpoint_slots") is False:
        warnings.append("llama-server runs with --no-slots: restarts and busy slots cannot be checked")
    return warnings


class Monitor(TimerService):
    """Polls every backend's C{/props} and C{/slots} every C{interval} seconds."""

    def __init__(
        self,
        scheduler: Scheduler,
        backends: list[Backend],
        interval: float,
        configured_slots: int | None,
        on_up: Callable[[Backend, str], Any] = lambda backend, model: None,
    ) -> None:
        super().__init__(interval, self.check)
        self.scheduler = scheduler
        self.health = {b.name: BackendHealth(b, configured_slots) for b in backends}
        self.on_up = on_up

    def check(self) -> Deferred:
        return Deferred.fromCoroutine(self._check_all())

    async def _check_all(self) -> None:
        for health in self.health.values():
            try:
                await self._check(health)
            except UPSTREAM_FAILURES as e:
                if health.up:
                    log.warn("llama-server {url} is down: {error}", url=health.backend.url, error=e)
                health.up = False
        loop = getattr(self, "_loop", None)
        if loop is not None:
            # Look again soon while a backend is down, so start-up and recovery are quick.
            all_up = all(h.up for h in self.health.values())
            loop.interval = self.step if all_up else min(self.step, 0.5)

    async def _check(self, health: BackendHealth) -> None:
        backend = health.backend
        if not health.up:
            status, props = await backend.call("GET", "/props")
            if status != 200 or not isinstance(props, dict):
                log.warn("llama-server {url}: /props answered {status}", url=backend.url, status=status)
                return
            health.props = props
            for warning in settings_warnings(props, health.configured_slots):
                log.warn("{url}: {warning}", url=backend.url, warning=warning)
            total = props.get("total_slots") or health.configured_slots or 1
            log.info(
                "llama-server {url} is up: {total} slots, model {model}, build {build}",
                url=backend.url, total=total, model=props.get("model_path"), build=props.get("build_info"),
            )
            _, models = await backend.call("GET", "/v1/models")
            health.model = model_identity(props, models)
            health.up = True
            self.on_up(backend, health.model)
            self.scheduler.set_backend_slots(backend.name, int(total))
        status, slots = await backend.call("GET", "/slots")
        if status != 200 or not isinstance(slots, list):
            return  # --no-slots: restarts are then only seen through failed requests
        in_use = {
            s.id.index for s in self.scheduler.slots.values()
            if s.id.backend == backend.name and s.state is not SlotState.FREE and not s.busy
        }
        if restarted(slots, in_use, health.max_task_seen):
            health.restarts += 1
            log.warn("llama-server {url} restarted: its slots are empty now", url=backend.url)
            self.scheduler.reset_backend(backend.name)
            health.max_task_seen = -1
            health.up = False  # read /props again: it may run another model now
            return
        contexts = [s["n_ctx"] for s in slots if isinstance(s.get("n_ctx"), int)]
        if contexts:
            health.slot_context = min(contexts)
        tasks = [s["id_task"] for s in slots if isinstance(s.get("id_task"), int)]
        if tasks:
            health.max_task_seen = max(health.max_task_seen, max(tasks))

    def slot_context(self) -> int | None:
        """The smallest slot context among live backends: no request can generate more."""
        known = [h.slot_context for h in self.health.values() if h.up and h.slot_context]
        return min(known) if known else None

    @property
    def ready(self) -> bool:
        return any(h.up for h in self.health.values())
