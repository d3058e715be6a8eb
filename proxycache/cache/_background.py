"""
When an idle hot slot is saved in the background, off every request's way:
write-behind (a slot idle for a while, a long save only once its backend is
quiet) and the spare a contended backend keeps (the slot the next request
will take, saved while llama.cpp generates).  The saving itself is the
tier's (C{start_save}); this module decides when.
"""

from __future__ import annotations

from typing import Callable

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from proxycache.config import Config
from proxycache.routing import Decision, Relation, SlotId, SlotState, Speeds, relation
from proxycache.slots import Lease, Scheduler, SlotContent

# A backend evicted a conversation this recently: its slots are contended, and the
# next request will likely take the least recently used idle slot.
CONTENDED_SECONDS = 60.0
# A write-behind save blocks its backend's whole loop while it writes (seconds for a large
# model's slot file): it starts only once the slot and its backend have been idle this many
# times the save's predicted duration (and at least --write-behind), so that a request is
# unlikely to arrive during it.
WRITE_BEHIND_IDLE_FACTOR = 4.0


@attrs.define(eq=False)
class BackgroundSaves:
    """Schedules the background saves of L{proxycache.cache.DiskTier}; C{start_save} makes one."""

    config: Config
    clock: IReactorTime
    scheduler: Scheduler
    speeds: Speeds
    start_save: Callable[[SlotId], None]
    _timers: dict[SlotId, IDelayedCall] = attrs.field(factory=dict, init=False)
    _evicted_at: dict[str, float] = attrs.field(factory=dict, init=False)  # by backend: a request took another's slot

    def stop(self) -> None:
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()

    def evicted(self, backend: str) -> None:
        """A request on C{backend} took over another conversation's slot: its slots are contended."""
        self._evicted_at[backend] = self.clock.seconds()

    # -- write-behind -------------------------------------------------------

    def delay(self, content: SlotContent) -> float:
        """Idle seconds before a write-behind saves C{content}: --write-behind, or more for a long save."""
        size = self.speeds.size_of(content.tokens)
        if size is None:
            # Nothing saved yet: a token's KV may be 4 KB or 256 KB (a 30B-class model: a gigabyte
            # for 4k tokens, seconds of a stalled llama.cpp).  Judged as a long save until measured.
            return WRITE_BEHIND_IDLE_FACTOR * self.config.write_behind
        predicted = self.speeds.save_seconds(size)
        return max(self.config.write_behind, WRITE_BEHIND_IDLE_FACTOR * predicted)

    def schedule(self, slot_id: SlotId, delay: float | None = None) -> None:
        self.cancel(slot_id)
        if delay is None:
            slot = self.scheduler.slot(slot_id)
            delay = self.config.write_behind if slot is None else self.delay(slot.content)
        self._timers[slot_id] = self.clock.callLater(delay, self._due, slot_id)

    def cancel(self, slot_id: SlotId) -> None:
        timer = self._timers.pop(slot_id, None)
        if timer is not None and timer.active():
            timer.cancel()

    def forget(self, slot_id: SlotId) -> None:
        """A save of C{slot_id} begins: its timer (if it fired) is done with."""
        self._timers.pop(slot_id, None)

    def _due(self, slot_id: SlotId) -> None:
        """
        Save the slot; a long save only once it and its backend have been quiet
        for its delay: now it would stall a request another slot of the backend
        serves (its tokens wait for the write), or one arriving right after a
        request ended there.
        """
        self._timers.pop(slot_id, None)
        slot = self.scheduler.slot(slot_id)
        if slot is None or slot.state is not SlotState.HOT or slot.content.saved_key is not None:
            return
        delay = self.delay(slot.content)
        if delay <= self.config.write_behind:
            # A short save (a quarter of --write-behind or less) stalls the others for less than a
            # token or two: made now, so that a busy backend's conversations survive a restart too.
            self.start_save(slot_id)
            return
        backend = [view for view in self.scheduler.views() if view.id.backend == slot_id.backend]
        if any(view.busy and not view.saving for view in backend if view.id != slot_id):
            self.schedule(slot_id, delay)  # looked at again once that request may have ended
            return
        quiet_since = max((view.last_used for view in backend), default=slot.last_used)
        wait = quiet_since + delay - self.clock.seconds()
        if wait > 1e-6:
            self.schedule(slot_id, wait)
            return
        self.start_save(slot_id)

    # -- a spare --------------------------------------------------------------

    def decoding(self, lease: Lease) -> None:
        """
        Keep a spare: on a contended backend, once a request's prompt is computed,
        save the idle slot the next request would take, unless one can be taken
        without a save.  Like a page cleaner: the save happens while llama.cpp
        generates, not on the next request's way (a save blocks llama.cpp's loop
        either way).  Write-behind would save it too, but only after its delay.

        The same when the request branched off a shared prefix (a sibling, a
        team member behind one system prompt): the next request is likely to
        branch too, and to take over an idle slot holding that prefix, so those
        are saved now, each only if its own part is worth a save.
        """
        backend = lease.slot.id.backend
        idle = [s for s in self.scheduler.slots.values() if s.id.backend == backend and not s.busy]
        if _branched(lease):
            for slot in idle:
                if slot.state is SlotState.HOT and lease.request.fingerprint.common_blocks(slot.content.fingerprint):
                    self.cancel(slot.id)
                    self.start_save(slot.id)
        if self.clock.seconds() - self._evicted_at.get(backend, float("-inf")) > CONTENDED_SECONDS:
            return
        if any(s.state is not SlotState.HOT or s.content.saved_key is not None for s in idle):
            return  # a slot to take without saving
        if idle:
            victim = min(idle, key=lambda s: s.last_used)
            self.cancel(victim.id)
            self.start_save(victim.id)


def _branched(lease: Lease) -> bool:
    """Did C{lease}'s request branch off a prefix it shares with other content (a slot's, a saved entry's)?"""
    plan = lease.plan
    if plan.fork is not None:
        return True
    if plan.restore is not None:
        return 0 < plan.restore.common_blocks < plan.restore.blocks
    return plan.decision is Decision.HIT and relation(
        lease.request.fingerprint, lease.previous.fingerprint
    ) is Relation.BRANCH
