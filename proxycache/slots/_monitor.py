"""
Watching each llama-server: learn its slot count, notice restarts, warn about
settings that would move caches behind the proxy's back.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from proxycache.backend import (
    RAM_CACHE, UPSTREAM_FAILURES, Backend, Description, UpstreamError, backend_warnings, build_notice, restarted,
    unreachable, usable_slots,
)
from proxycache.slots._scheduler import Scheduler

log = Logger()


@attrs.define(eq=False)
class BackendHealth:
    backend: Backend
    configured_slots: int | None
    up: bool = False
    props: dict[str, Any] = attrs.field(factory=dict)
    model: str | None = None  # what a saved cache must have been written by (backend.model_identity)
    process: str | None = None  # the marker of the process that was probed (None: it shows none)
    duplicate_of: str | None = None  # the URL of another backend that is the same llama-server process
    max_task_seen: int = -1
    restarts: int = 0
    slot_context: int | None = None  # n_ctx of one slot
    failures: int = 0  # checks failed in a row
    taken_out: bool = False  # its slots left the map: whatever it held is forgotten
    # The identity probe overwrites an idle slot: ask the weights again only when the
    # server (re)started or may have (refused connections, still loading), not after a blip.
    probe_due: bool = True
    # What it lacks of what proxycache relies on (short sentences): found when it came up,
    # and at run time (its own RAM prompt cache); informational, it still serves.
    warnings: list[str] = attrs.field(factory=list)

    def warn(self, warning: str) -> None:
        if warning not in self.warnings:
            self.warnings.append(warning)
            log.warn("{url}: {warning}", url=self.backend.url, warning=warning)


# While a backend is down, look again this often, so start-up and recovery are quick.
DOWN_INTERVAL = 0.5
# A busy llama-server can be slow to answer /slots during a long prefill: only this many
# failed checks in a row (or nobody listening at all) take its slots out of the map.
DOWN_AFTER_FAILURES = 3
# A look a request asks for (it found no backend ready, or one down) comes at once, but at most this
# often, so that a flood of requests does not become a flood of checks.
LOOK_GAP = 0.2


class Monitor(Service):
    """
    Polls every backend's C{/props} and C{/slots} every C{interval} seconds.
    One failed check, whatever it raised, marks that backend down and the
    loop goes on: a monitor that stops would never see a restart again.
    """

    def __init__(
        self,
        clock: IReactorTime,
        scheduler: Scheduler,
        backends: list[Backend],
        interval: float,
        configured_slots: int | None,
        on_up: Callable[[Backend, Description], Any] = lambda backend, described: None,
        on_lost: Callable[[str], Any] = lambda name: None,
        on_change: Callable[[], Any] = lambda: None,
    ) -> None:
        self.clock = clock
        self.scheduler = scheduler
        self.interval = interval
        self.configured_slots = configured_slots
        self.health = {b.name: BackendHealth(b, configured_slots) for b in backends}
        self.on_up = on_up  # described (again): its weights were probed in the process that answers
        self.on_lost = on_lost  # a sign of a restart: what it runs is unknown until described again
        self.on_change = on_change  # after every look and take-out: what is ready may have changed
        self._loop: LoopingCall | None = None
        self._checks = 0  # looks under way
        self._last_look = float("-inf")  # when a look asked for by a request last started
        self._look_again = False
        self._look_timer: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._poll)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._look_timer is not None and self._look_timer.active():
            self._look_timer.cancel()
        return None

    def watch(self, backend: Backend) -> None:
        self.health[backend.name] = BackendHealth(backend, self.configured_slots)
        if self.running:
            self.check()

    def unwatch(self, name: str) -> None:
        self.health.pop(name, None)

    def check(self) -> Deferred[None]:
        return self._look(only_down=False)

    def _poll(self) -> Deferred[None] | None:
        # Not over a look under way (one a request asked for, say): two at once would each probe
        # a server that just came up, on its slots, at the same time.
        return None if self._checks else self.check()

    def look_now(self) -> None:
        """
        A request found no backend ready (or one down): look at the backends that are not up now
        rather than at the next poll; once after a look under way, and at most every L{LOOK_GAP} s.
        """
        if not self.running:
            return
        if self._checks:
            self._look_again = True  # the look under way may have asked before the backend came back
            return
        wait = self._last_look + LOOK_GAP - self.clock.seconds()
        if wait > 0:
            if self._look_timer is None or not self._look_timer.active():
                self._look_timer = self.clock.callLater(wait, self.look_now)
            return
        self._last_look = self.clock.seconds()
        self._look(only_down=True)

    def _look(self, only_down: bool) -> Deferred[None]:
        self._checks += 1
        return Deferred.fromCoroutine(self._check_all(only_down)).addBoth(self._looked)

    def _looked(self, result: Any) -> Any:
        self._checks -= 1
        self.on_change()
        if self._look_again and not self._checks:
            self._look_again = False
            if self.some_down():
                self.look_now()
        return result

    def usable(self, name: str) -> bool:
        """Backend C{name}'s slots may be planned on: it was not taken out (or is not watched)."""
        health = self.health.get(name)
        return health is None or not health.taken_out

    def some_down(self) -> bool:
        return not all(h.up or h.duplicate_of for h in self.health.values())  # a second spelling is no backend

    async def _check_all(self, only_down: bool = False) -> None:
        for health in list(self.health.values()):
            if only_down and health.up:
                continue
            try:
                await self._check(health)
            except UPSTREAM_FAILURES as e:
                if health.up:
                    log.warn("llama-server {url} is down: {error}", url=health.backend.url, error=e)
                self._failed(health, gone=unreachable(e))
            except Exception:
                log.failure("checking llama-server {url} failed", url=health.backend.url)
                self._failed(health, gone=False)
            else:
                health.failures = 0
        if self._loop is not None:
            all_up = not self.some_down()
            wanted = self.interval if all_up else min(self.interval, DOWN_INTERVAL)
            sooner = wanted < (self._loop.interval or wanted)
            self._loop.interval = wanted
            if sooner and self._loop.running:
                # Found gone by a look between polls (a failed save asks for one): the look already
                # scheduled would come a whole interval later.  (A no-op when the loop itself looked.)
                self._loop.reset()

    async def _check(self, health: BackendHealth) -> None:
        backend = health.backend
        if not health.up:
            # Before anything else: the identity probe would overwrite a slot of the other's.
            try:
                process = await backend.process()
            except UpstreamError as e:
                if unreachable(e):
                    raise
                process = None  # still loading, say: described (or not) below
            if self._duplicate(health, process):
                return
            if not health.probe_due:
                # A check cut short by a quick restart looks like a blip: is it the
                # process whose weights were probed?  Ask them again unless surely so.
                slots, new_process = await self._slots(health)
                if new_process:
                    self._restarted(health)
                health.probe_due = slots is None or health.max_task_seen < 0 or new_process
            described = await backend.describe(probe=health.probe_due)
            if described is None:
                log.warn("llama-server {url}: /props did not answer", url=backend.url)
                health.probe_due = True
                return
            health.probe_due = False
            props = health.props = described.props
            health.warnings = []
            for warning in backend_warnings(props, described.features, health.configured_slots):
                health.warn(warning)
            notice = build_notice(props)
            if notice:
                log.info("{url}: {notice}", url=backend.url, notice=notice)
            total, too_many = usable_slots(described.total_slots, health.configured_slots)
            if too_many:
                health.warn(too_many)
            log.info(
                "llama-server {url} is up: {total} slots, model {model}, build {build}",
                url=backend.url, total=total, model=props.get("model_path"), build=props.get("build_info"),
            )
            if self.health.get(backend.name) is not health:
                return  # removed while we asked
            if self._duplicate(health, described.process):
                return  # the other spelling came up while this one was described
            if health.taken_out:
                # Nobody listened there a moment ago: a new process (or one that lost its slots to us).
                health.taken_out = False
                health.restarts += 1
                health.max_task_seen = -1
            health.model = described.model
            health.process = described.process
            health.up = True
            self.on_up(backend, described)
            self.scheduler.set_backend_slots(backend.name, int(total))
        slots, new_process = await self._slots(health)
        if not new_process and health.process is not None:
            # Task ids only tell a restart until the new process has run as many tasks.
            new_process = await backend.process() != health.process
        if slots is None and not new_process:
            return  # --no-slots (and no process marker): restarts are then only seen through failed requests
        if new_process or slots is None:
            self._restarted(health)
            health.up = False  # read /props again: it may run another model now
            return
        contexts = [s["n_ctx"] for s in slots if isinstance(s.get("n_ctx"), int)]
        if contexts:
            health.slot_context = min(contexts)
        tasks = [s["id_task"] for s in slots if isinstance(s.get("id_task"), int)]
        if tasks:
            health.max_task_seen = max(health.max_task_seen, max(tasks))

    async def _slots(self, health: BackendHealth) -> tuple[list[dict[str, Any]] | None, bool]:
        """C{/slots}, and whether another process than the one seen last answered it."""
        # Only slots llama.cpp is known to have processed (it reported tokens): a slot whose
        # request failed before llama.cpp ran it has no task there, and that is no restart.
        # Taken before asking, and kept only if unchanged meanwhile and idle now: a reply describes
        # the moment it was made, not a request that ended while it travelled.
        before = {
            s.id: s.content for s in self.scheduler.slots.values()
            if s.id.backend == health.backend.name and s.content.tokens > 0
        }
        slots = await health.backend.slots()
        if slots is None:
            return None, False
        now = self.scheduler.slots
        in_use = {
            slot_id.index for slot_id, content in before.items()
            if (slot := now.get(slot_id)) is None or (slot.content is content and not slot.busy)
        }
        return slots, restarted(slots, in_use, health.max_task_seen)

    def _duplicate(self, health: BackendHealth, process: str | None) -> bool:
        """
        Is C{health}'s backend the very process another backend already is (one
        llama-server under two spellings, C{localhost} and C{127.0.0.1})?  Then it
        stays out of the slot map, so its slots are not counted twice.
        """
        same = next(
            (h for h in self.health.values() if h is not health and h.up and process and h.process == process), None
        )
        if same is None:
            health.duplicate_of = None
            return False
        if health.duplicate_of != same.backend.url:
            health.duplicate_of = same.backend.url
            health.warnings = []
            health.warn(f"the same llama-server process as {same.backend.url}: not used twice")
        return True

    def _restarted(self, health: BackendHealth) -> None:
        health.restarts += 1
        log.warn("llama-server {url} restarted: its slots are empty now", url=health.backend.url)
        self.on_lost(health.backend.name)
        self.scheduler.reset_backend(health.backend.name)
        health.max_task_seen = -1
        health.probe_due = True

    def _failed(self, health: BackendHealth, gone: bool) -> None:
        health.up = False
        health.failures += 1
        if health.process is None:
            # Nothing to tell the next process by at the slot action: what it runs is unknown.
            self.on_lost(health.backend.name)
        if gone or health.failures >= DOWN_AFTER_FAILURES:
            self.take_out(health.backend.name)

    def take_out(self, name: str) -> None:
        """
        Stop planning on backend C{name}: its idle slots leave the map at once, busy
        ones when released; queued requests go elsewhere.  It rejoins when it answers.
        """
        health = self.health[name]
        health.up = False
        health.taken_out = True
        health.probe_due = True  # whatever answers there next may run other weights
        self.on_lost(name)
        if any(slot_id.backend == name for slot_id in self.scheduler.slots):
            log.warn("llama-server {url} is unreachable: its slots are out of the map until it answers",
                     url=health.backend.url)
            self.scheduler.set_backend_slots(name, 0)
        self.on_change()

    def noticed_ram_cache(self, name: str) -> None:
        """llama-server C{name} reused tokens the proxy did not place: its own RAM prompt cache is on."""
        health = self.health.get(name)
        if health is not None:
            health.warn(RAM_CACHE)

    def slot_context(self) -> int | None:
        """The smallest slot context among live backends: no request can generate more."""
        known = [h.slot_context for h in self.health.values() if h.up and h.slot_context]
        return min(known) if known else None

    def healthy(self) -> Backend | None:
        """A backend that answered its last check, the least loaded first; None if none did."""
        up = [h.backend for h in self.health.values() if h.up]
        busy = {b.name: sum(1 for s in self.scheduler.slots.values() if s.id.backend == b.name and s.busy) for b in up}
        return min(up, key=lambda b: busy[b.name], default=None)

    @property
    def ready(self) -> bool:
        return any(h.up for h in self.health.values())
