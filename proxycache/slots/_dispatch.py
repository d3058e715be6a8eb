"""
One request's lease, from acquire to release: the only place that does so.

The dispatcher takes a slot from the scheduler, lets the cache tier prepare
it (save what it evicts, restore a saved cache), sends the request to the
slot's backend, hands the response to the client's L{Exchange}, then releases
the slot, records what happened and checks the plan against llama.cpp's
timings.  Every path (success, upstream error, client gone) releases once,
and only when nothing runs in the slot any more: a save or restore goes on
after its client left (the cache tier's L{SlotPreparer.settling}), and so
does llama.cpp's generation of a whole answer (L{Dispatcher._until_idle}).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, Sequence

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from proxycache.backend import UPSTREAM_FAILURES, Backend, IdleSlot, StillBusy, cancelled, unreachable
from proxycache.routing import Decision, Request, SlotId, SlotState, carried_out, fell_short, reused_unplanned
from proxycache.slots._gate import NoBackend, ReadyGate
from proxycache.slots._given_up import detached, discard, generating
from proxycache.slots._scheduler import Lease, Outcome, QueueFull, Scheduler

log = Logger()


class SlotPreparer(Protocol):
    """The cache tier, as the dispatcher sees it."""

    async def prepare(self, lease: Lease) -> Decision:
        """
        With the slot's lock held, before the request is sent: save what the
        lease evicts, restore a saved cache.  Returns the decision carried out
        (a failed restore is a miss).
        """

    def settling(self, lease: Lease) -> "Deferred[Any] | None":
        """Preparation still running after its request ended (cancelled): release after it."""

    def restored_tokens(self, lease: Lease) -> int:
        """Tokens loaded from disk into the slot for this request."""

    def path_seconds(self, lease: Lease) -> tuple[float, float]:
        """Seconds spent saving, and restoring, on this request's path before it was sent."""

    def released(self, lease: Lease, outcome: Outcome) -> None:
        """The slot was released with C{outcome}."""

    def decoding(self, lease: Lease) -> None:
        """llama.cpp has computed C{lease}'s prompt and streams its answer (a good time for background saves)."""


class NoCache:
    """No disk tier: every plan is carried out as it is."""

    async def prepare(self, lease: Lease) -> Decision:
        return lease.plan.decision

    def settling(self, lease: Lease) -> "Deferred[Any] | None":
        return None

    def restored_tokens(self, lease: Lease) -> int:
        return 0

    def path_seconds(self, lease: Lease) -> tuple[float, float]:
        return (0.0, 0.0)

    def released(self, lease: Lease, outcome: Outcome) -> None:
        return None

    def decoding(self, lease: Lease) -> None:
        return None


@attrs.define(eq=False)
class Progress:
    """How far one request got; the dispatcher reads it when the request ends."""

    # llama.cpp sent response headers: after the prompt for a whole answer, before it for a stream
    answered: bool = False
    status: int = 0
    decision: Decision | None = None
    # llama.cpp's timings as soon as they pass by: a client that hangs up right
    # after the last event must not cost us the truth about the slot.
    timings: dict[str, Any] = attrs.Factory(dict)
    failed: bool = False  # the body broke off: the slot's content is uncertain
    # Called by the exchange at a stream's first bytes: the prompt is computed, the answer is coming.
    decoding: Callable[[], Any] = lambda: None
    path: tuple[float, float] = (0.0, 0.0)  # seconds saving, restoring before the request was sent


class Exchange(Protocol):
    """One client's request, as the HTTP layer serves it."""

    def begin(
        self, lease: Lease, decision: Decision, restored_tokens: int, path: tuple[float, float] = (0.0, 0.0)
    ) -> None:
        """The slot is ready and the request is about to be sent (after C{path}: seconds saving, restoring)."""

    async def deliver(self, response: IResponse, progress: Progress) -> None:
        """Relay llama.cpp's response to the client, filling C{progress.timings}."""


@attrs.frozen
class RequestRecord:
    """One finished request, as logs, metrics and the status page see it."""

    at: float
    decision: Decision
    slot: str
    backend: str
    status: int  # 0: no response from llama-server
    similarity: float
    blocks: int
    cache_n: int
    prompt_n: int
    predicted_n: int
    prompt_ms: float
    waited: float
    seconds: float
    tenant: str = ""
    save_seconds: float = 0.0  # on the request's path, before it was sent
    restore_seconds: float = 0.0
    save_wait_seconds: float = 0.0  # of C{waited}: queued only because slots were busy with background saves

    @property
    def path_seconds(self) -> float:
        """What saves and restores cost it before it was sent: its own, and background saves it waited for."""
        return self.save_seconds + self.restore_seconds + self.save_wait_seconds


class Dispatcher:
    def __init__(
        self,
        clock: IReactorTime,
        scheduler: Scheduler,
        backends: Mapping[str, Backend],
        cache: SlotPreparer,
        *,
        first_byte_timeout: float,
        observers: Sequence[Callable[[RequestRecord], None]] = (),
        on_stale: Callable[[SlotId], Any] = lambda slot_id: None,
        on_unreachable: Callable[[str], Any] = lambda backend: None,
        on_own_cache: Callable[[str], Any] = lambda backend: None,
        gate: ReadyGate | None = None,
        isolate_tenants: bool = False,
    ) -> None:
        self.clock = clock
        self.scheduler = scheduler
        self.backends = backends
        self.cache = cache
        self.first_byte_timeout = first_byte_timeout
        self.observers = list(observers)
        self.on_stale = on_stale  # the slot map looks wrong: look at llama-server again
        self.on_unreachable = on_unreachable  # nobody listens at a backend: take it out of the map
        self.on_own_cache = on_own_cache  # llama-server moved a conversation itself (--cache-ram)
        self._noticed_ram_cache: set[str] = set()
        # Without a monitor to wait for, a request that finds no slot fails at once.
        self.gate = gate or ReadyGate(clock, scheduler, timeout=0.0)
        self.isolate_tenants = isolate_tenants  # erase a slot another tenant's request left content in

    async def dispatch(self, wanted: Request, path: str, body: dict[str, Any], exchange: Exchange) -> None:
        """
        Serve C{body} on C{path} through a leased slot.

        @raise QueueFull: every slot is busy and the queue is full.
        @raise NoBackend: no backend was ready, nor became ready within the gate's timeout.
        @raise TimeoutError: llama-server sent no headers in time.
        @raise UPSTREAM_FAILURES: llama-server could not be reached.
        """
        try:
            await self._dispatch_once(wanted, path, body, exchange)
        except _Unreachable as gone:
            self.on_unreachable(gone.backend)
            elsewhere = any(slot_id.backend != gone.backend for slot_id in self.scheduler.slots)
            if not elsewhere and self.gate.ready:  # still planned on (no monitor took it out): no use waiting
                gone.record()
                assert gone.__cause__ is not None
                raise gone.__cause__
            # Nothing reached llama.cpp, so nothing was sent to the client: once more, elsewhere, or
            # here once it answers again (the gate holds the request until a backend is ready).
            log.warn("llama-server {backend} is unreachable; sending the request elsewhere or waiting for it",
                     backend=gone.backend)
            try:
                await self._dispatch_once(wanted, path, body, exchange, retry=False)
            except (NoBackend, QueueFull):
                gone.record()  # never sent again: the failed attempt is the request's record
                raise

    async def _dispatch_once(
        self, wanted: Request, path: str, body: dict[str, Any], exchange: Exchange, retry: bool = True
    ) -> None:
        lease = await self.gate.bounded(self.scheduler.acquire(wanted))
        started = self.clock.seconds()
        progress = Progress(decoding=lambda: self.cache.decoding(lease))
        gone: _Unreachable | None = None
        upstream: Deferred[IResponse] | None = None
        shield: Deferred[IResponse] | None = None
        sent = ended = False
        try:
            progress.decision = _shown(lease, await self.cache.prepare(lease))
            progress.path = self.cache.path_seconds(lease)
            exchange.begin(lease, progress.decision, self.cache.restored_tokens(lease), progress.path)
            backend = self.backends[lease.slot.id.backend]
            sent = True
            try:
                if self.isolate_tenants and _foreign(lease, progress.decision):
                    # llama.cpp would reuse any common prefix it finds there: its timing tells.
                    await backend.erase_slot(lease.slot.id.index, self.first_byte_timeout)
                upstream = backend.generate(path, body, lease.slot.id.index, self.first_byte_timeout)
                # A client leaving does not close llama.cpp's connection at once: L{_until_idle}
                # looks at the slot first, while llama.cpp cannot have noticed and stopped.
                shield = detached(upstream)
                response = await shield
            except CancelledError:
                log.info("the client on slot {slot} left before llama-server answered", slot=str(lease.slot.id))
                raise
            except (*UPSTREAM_FAILURES, ConnectingCancelledError) as e:
                if cancelled(e):  # no failure of llama-server's: the client went away while it worked
                    log.info("the client on slot {slot} left before llama-server answered", slot=str(lease.slot.id))
                    raise CancelledError() from e
                if retry and unreachable(e):
                    gone = _Unreachable(lease.slot.id.backend)
                    raise gone from e
                raise
            progress.answered, progress.status = True, response.code
            await exchange.deliver(response, progress)
            ended = True
        finally:
            outcome = _outcome(progress)
            finished = self.clock.seconds()  # before the release hands the slot on
            settling = self.cache.settling(lease)  # cancelled during a save or restore: released when it ends
            if settling is None and sent and not ended and gone is None:
                # Given up on (client gone, timeout, broken off): llama.cpp may still compute there.
                # its wait for llama.cpp's answer was cancelled (a coroutine closed unfinished was not)
                given_up = upstream is not None and shield is not None and shield.called and not upstream.called
                still_open = upstream if given_up else None
                Deferred.fromCoroutine(self._until_idle(lease, still_open)).addBoth(
                    lambda idle: self._release(lease, _after_orphan(outcome, progress, idle, lease))
                )
            elif settling is None:
                self._release(lease, outcome)
            else:
                settling.addBoth(lambda _: self._release(lease, outcome))
            if gone is None:
                self._record(lease, outcome, progress, started, finished)
            else:  # recorded only if it is not sent elsewhere: one request, one record
                gone.record = lambda: self._record(lease, outcome, progress, started, finished)

    async def _until_idle(self, lease: Lease, upstream: "Deferred[IResponse] | None" = None) -> IdleSlot | None:
        """
        Return once llama.cpp reports C{lease}'s slot idle.  It goes on generating a
        whole answer whose connection closed (b11434, b11549: it notices only when
        writing a stream), up to its max_tokens: until then the slot stays leased,
        shown busy, and no request is sent there to wait unseen inside llama.cpp.
        Bounded by C{first_byte_timeout}: as long as llama.cpp is given to answer.

        Returns the idle slot when llama.cpp was seen generating the answer
        first: it then holds the request's whole prompt (and the answer so far:
        it may also notice the closed connection and stop early).  None when
        that is unknown: released at the bound, llama-server gone, never seen
        generating (idle at once: finished already, or not yet begun; or
        stopped during the prompt, which it may leave half computed).

        C{upstream}: the request to llama.cpp, still waiting for its answer.
        The slot is looked at once before it is cancelled: llama.cpp may notice
        the closed connection (b11434 checks once a second) and stop before a
        later look could see it generate.
        """
        backend = self.backends[lease.slot.id.backend]
        slot = str(lease.slot.id)
        began = self.clock.seconds()
        polls = 0
        decoded = False  # seen generating: the prompt is computed
        if upstream is not None:
            try:
                decoded = await generating(backend, lease.slot.id.index)
            finally:
                upstream.addCallbacks(discard, lambda _: None, (self.clock, self.first_byte_timeout))
                upstream.cancel()
        while True:
            try:
                idle = await backend.wait_until_idle(lease.slot.id.index)
            except TimeoutError as busy:
                decoded = decoded or isinstance(busy, StillBusy) and busy.decoded
                polls += 1
                waited = self.clock.seconds() - began
                if waited < self.first_byte_timeout:
                    if polls == 1:
                        log.info("slot {slot}: llama.cpp goes on computing a request given up on; "
                                 "the slot stays busy until it stops", slot=slot)
                    continue
                log.warn("slot {slot}: llama.cpp still busy {waited:.0f}s after its request was given up on; "
                         "released anyway", slot=slot, waited=waited)
                return None
            except UPSTREAM_FAILURES:
                return None  # gone or restarted: the monitor sees to it; nothing of ours computes there
            if polls:
                log.info("slot {slot}: llama.cpp stopped after {waited:.0f}s; the slot is free again",
                         slot=slot, waited=self.clock.seconds() - began)
            return idle if idle is not None and (decoded or idle.decoded) else None

    def _release(self, lease: Lease, outcome: Outcome) -> None:
        self.scheduler.release(lease, outcome)
        self.cache.released(lease, outcome)

    def _record(self, lease: Lease, outcome: Outcome, progress: Progress, started: float, finished: float) -> None:
        decision = progress.decision or _shown(lease, lease.plan.decision)
        if outcome.measured:  # what llama.cpp did, not only what was planned
            decision = carried_out(decision, lease.plan, lease.request, outcome.cache_n, outcome.prompt_n)
        record = RequestRecord(
            at=finished, decision=decision, slot=str(lease.slot.id.index), backend=lease.slot.id.backend,
            status=progress.status,
            similarity=lease.plan.similarity, blocks=len(lease.request.fingerprint.blocks),
            cache_n=outcome.cache_n, prompt_n=outcome.prompt_n, predicted_n=outcome.predicted_n,
            prompt_ms=outcome.prompt_ms, waited=lease.waited, seconds=finished - started,
            tenant=lease.request.tenant,
            save_seconds=progress.path[0], restore_seconds=progress.path[1], save_wait_seconds=lease.save_waited,
        )
        log.info(
            "{decision} slot={slot} status={status} similarity={similarity:.2f} blocks={blocks} "
            "cache_n={cache_n} prompt_n={prompt_n} predicted_n={predicted_n} prompt_ms={prompt_ms:.0f} "
            "wait={wait:.3f}s save_wait={save_wait:.3f}s save={save:.3f}s restore={restore:.3f}s took={took:.3f}s",
            decision=decision.value, slot=str(lease.slot.id), status=progress.status or "-",
            similarity=record.similarity, blocks=record.blocks, cache_n=record.cache_n,
            prompt_n=record.prompt_n, predicted_n=record.predicted_n, prompt_ms=record.prompt_ms,
            wait=record.waited, save_wait=record.save_wait_seconds, save=record.save_seconds,
            restore=record.restore_seconds, took=record.seconds,
        )
        for observer in self.observers:
            observer(record)
        if not outcome.measured:
            return
        backend = lease.slot.id.backend
        unplanned = reused_unplanned(lease.plan, outcome.cache_n, outcome.prompt_n)
        if unplanned:
            self.on_own_cache(backend)  # each time: a restarted backend's warnings start afresh
        if unplanned and backend not in self._noticed_ram_cache:
            self._noticed_ram_cache.add(backend)
            log.info(
                "llama-server {backend} reused {cache_n} tokens the proxy did not place there: its own "
                "prompt cache (--cache-ram) is active and moves conversations between slots; proxycache "
                "follows what timings report (said once)",
                backend=backend, cache_n=outcome.cache_n,
            )
        if fell_short(lease.plan, lease.request, outcome.cache_n, outcome.prompt_n):
            log.warn(
                "slot {slot} reused {cache_n} tokens, far below the plan ({blocks} blocks): checking llama-server",
                slot=str(lease.slot.id), cache_n=outcome.cache_n, blocks=lease.plan.common_blocks,
            )
            self.on_stale(lease.slot.id)


class _Unreachable(Exception):
    def __init__(self, backend: str) -> None:
        super().__init__(backend)
        self.backend = backend
        self.record: Callable[[], None] = lambda: None  # the failed attempt, if nothing else serves it


def _foreign(lease: Lease, decision: Decision) -> bool:
    """The slot may hold another tenant's prompt, which the request is not restored over."""
    previous = lease.previous
    return previous.state is not SlotState.FREE and previous.tenant != lease.request.tenant and (
        decision is not Decision.RESTORE
    )


def _shown(lease: Lease, decision: Decision) -> Decision:
    """A small request computed from scratch is reported as 'small', not 'miss'."""
    return Decision.SMALL if lease.request.small and decision is Decision.MISS else decision


def _after_orphan(outcome: Outcome, progress: Progress, idle: object, lease: Lease) -> Outcome:
    """
    What the slot of a request given up on holds once llama.cpp stopped there
    (C{idle}: L{Dispatcher._until_idle}'s answer): that request's prompt and
    answer when llama.cpp was seen generating it and shows them, so a client's
    retry reuses them; else what C{outcome} says (COLD, unknown content).
    """
    if not isinstance(idle, IdleSlot) or not idle.used or not idle.tokens:
        return outcome
    if outcome.measured or progress.status not in (0, 200):
        return outcome  # llama.cpp's own counts, or an error answer: nothing was computed
    log.info("slot {slot}: llama.cpp finished the request given up on and holds its {tokens} tokens; "
             "a retry reuses them", slot=str(lease.slot.id), tokens=idle.tokens)
    return attrs.evolve(outcome, succeeded=True, held=idle.tokens)


def _outcome(progress: Progress) -> Outcome:
    """What the slot holds now, from how far the request got."""
    if not progress.answered or progress.failed:
        return Outcome(succeeded=False)
    timings = progress.timings

    def count(name: str) -> int:
        value = timings.get(name, 0)
        return int(value) if isinstance(value, (int, float)) else 0

    prompt_ms = timings.get("prompt_ms", 0.0)
    return Outcome(
        progress.status == 200, count("cache_n"), count("prompt_n"), count("predicted_n"),
        float(prompt_ms) if isinstance(prompt_ms, (int, float)) else 0.0,
        measured="cache_n" in timings,
    )
