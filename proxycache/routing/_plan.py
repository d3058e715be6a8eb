"""
Which slot serves a request: pure decision logic, no I/O and no reactor.

Slot states and their transitions
=================================

  FREE  the slot holds nothing we know of (start-up, llama-server restarted,
        a failed restore wiped it).
  COLD  it holds a prompt not worth protecting: a small request's, or one
        whose content is uncertain after an error.
  HOT   it holds a large prompt (not small, see L{Request.small}) that a
        follow-up of the same conversation can reuse.

  FREE/COLD/HOT --large request served--> HOT   (holds that request's prompt)
  FREE/COLD/HOT --small request served--> COLD
  any           --request failed before llama.cpp answered--> COLD, unknown content
  any           --llama-server restart detected--> FREE
  FREE/COLD/HOT --disk entry restored, then request served--> HOT

Choice order for a request (L{plan}):

  1. the HOT/COLD slot whose cached prefix shares the most leading blocks with
     the request, among those whose similarity passes the threshold (a small
     request only considers COLD ones).  If that slot is busy, a large request
     that still has affinity time waits for it rather than recompute elsewhere;
  2. a saved disk entry that shares more blocks than any idle slot: restore it
     into an idle slot of the backend that wrote it (chosen as in 3); if that
     backend has none idle, the entry is left for later;
  3. an idle FREE slot, else the least recently used idle COLD slot, else the
     least recently used idle HOT slot, whose cache is evicted (saved first by
     the disk tier: L{Plan.evicts});
  4. nothing idle: wait in the queue (L{plan} returns None).
"""

from __future__ import annotations

import enum
from typing import Iterable, Sequence

import attrs

from proxycache.routing._fingerprint import Fingerprint

EMPTY = Fingerprint(blocks=(), chars=0, words=0)


class SlotState(enum.Enum):
    FREE = "free"
    COLD = "cold"
    HOT = "hot"


class Decision(enum.Enum):
    HIT = "hit"  # reuses a slot's cached prefix
    RESTORE = "restore"  # loads a saved cache from disk first
    MISS = "miss"  # computes the prompt from scratch
    SMALL = "small"  # a small request, kept off hot slots
    WAIT = "wait"  # its hot slot is busy: wait for it


@attrs.frozen(order=True)
class SlotId:
    """One llama.cpp slot: (backend, slot index), so several backends can share one map."""

    backend: str
    index: int

    def __str__(self) -> str:
        return f"{self.backend}#{self.index}"


@attrs.frozen
class SlotView:
    """What the planner knows of a slot at one moment."""

    id: SlotId
    state: SlotState = SlotState.FREE
    fingerprint: Fingerprint = EMPTY
    last_used: float = 0.0
    busy: bool = False


@attrs.frozen
class Request:
    fingerprint: Fingerprint
    small: bool
    pinned: bool = False  # its saved cache is never evicted from disk
    kind: str = "chat"  # slot class: "fim" requests (editor completions) keep to their own slots


@attrs.frozen
class DiskMatch:
    """The best saved cache for a request, already judged worth restoring."""

    key: str
    backend: str
    common_blocks: int
    similarity: float


@attrs.frozen
class Plan:
    decision: Decision
    slot: SlotId
    common_blocks: int = 0  # blocks expected to be reused (from the slot or the restore)
    similarity: float = 0.0
    evicts: bool = False  # the slot's HOT content is replaced: save it first
    restore: DiskMatch | None = None


def is_small(fp: Fingerprint, min_chars: int, min_words: int, min_blocks: int) -> bool:
    """A request below any of the thresholds is small: never worth a hot slot."""
    return fp.chars < min_chars or fp.words < min_words or len(fp.blocks) < min_blocks


def best_match(
    request: Request, slots: Iterable[SlotView], min_ratio: float
) -> tuple[SlotView, int, float] | None:
    """
    The slot sharing the most leading blocks with the request, among those
    passing C{min_ratio}; idle slots win ties.  Small requests only look at
    COLD slots.  Returns (slot, common blocks, similarity) or None.
    """
    allowed = (SlotState.COLD,) if request.small else (SlotState.COLD, SlotState.HOT)
    best = None
    for slot in slots:
        if slot.state not in allowed:
            continue
        common = request.fingerprint.common_blocks(slot.fingerprint)
        if common == 0:
            continue
        ratio = common / min(len(request.fingerprint.blocks), len(slot.fingerprint.blocks))
        if ratio < min_ratio:
            continue
        rank = (common, not slot.busy, slot.last_used)
        if best is None or rank > best[0]:
            best = (rank, slot, common, ratio)
    return None if best is None else best[1:]


def _least_recently_used(slots: Sequence[SlotView], state: SlotState) -> SlotView | None:
    matching = [s for s in slots if s.state is state]
    return min(matching, key=lambda s: (s.last_used, s.id), default=None)


def target_slot(idle: Sequence[SlotView]) -> SlotView | None:
    """Where a request without a usable cached prefix goes: free, then LRU cold, then LRU hot."""
    return (
        _least_recently_used(idle, SlotState.FREE)
        or _least_recently_used(idle, SlotState.COLD)
        or _least_recently_used(idle, SlotState.HOT)
    )


def plan(
    request: Request,
    slots: Sequence[SlotView],
    *,
    min_ratio: float,
    affinity: bool = True,
    disk: DiskMatch | None = None,
) -> Plan | None:
    """
    Decide where C{request} runs.  Returns a L{Plan}, a WAIT plan naming the
    busy slot that holds its prefix (only while C{affinity}), or None when
    nothing is idle.
    """
    idle = [s for s in slots if not s.busy]
    match = best_match(request, slots, min_ratio)

    # A restore needs an idle slot on the backend that wrote the cache.
    restore_target = None
    if disk is not None and not request.small:
        restore_target = target_slot([s for s in idle if s.id.backend == disk.backend])

    def disk_beats(found: tuple[SlotView, int, float] | None) -> bool:
        return restore_target is not None and (found is None or disk.common_blocks > found[1])

    if match is not None and match[0].busy:
        # Waiting pays for a large prefix only: a small one is cheaper to recompute.
        if affinity and not request.small and not disk_beats(match):
            slot, common, ratio = match
            return Plan(Decision.WAIT, slot.id, common, ratio)
        match = best_match(request, idle, min_ratio)  # the best prefix actually available
    if disk_beats(match):
        return Plan(
            Decision.RESTORE,
            restore_target.id,
            disk.common_blocks,
            disk.similarity,
            evicts=restore_target.state is SlotState.HOT,
            restore=disk,
        )
    if match is not None:  # also when the restore cannot happen: a partial prefix beats none
        slot, common, ratio = match
        return Plan(Decision.HIT, slot.id, common, ratio)

    target = target_slot(idle)
    if target is None:
        return None
    decision = Decision.SMALL if request.small else Decision.MISS
    return Plan(decision, target.id, evicts=target.state is SlotState.HOT)


def state_after(small: bool, succeeded: bool) -> SlotState:
    """The state a slot is left in once a request on it ends."""
    if not succeeded:
        return SlotState.COLD
    return SlotState.COLD if small else SlotState.HOT
