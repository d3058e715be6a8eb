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

How a request relates to what a slot (or a saved entry) holds (L{relation})
===========================================================================

  CONTINUATION  the request extends everything the slot holds: all the slot's
                blocks are a prefix of the request's (the slot's fingerprint is
                of the prompt it last served, so llama.cpp's re-tokenization of
                the last reply does not matter).  The same conversation.
  BRANCH        it shares a prefix, then diverges: another user behind the same
                system prompt, a retried or edited turn, a sub-agent.  Serving
                it on that slot destroys what follows the shared prefix.
  UNRELATED     no common block.

Choice order for a request (L{plan})
====================================

Candidates are slots sharing a prefix with the request.  A small request only
considers COLD ones, whose similarity (common blocks over the shorter side)
passes the threshold.  A large request is not filtered by similarity: what it
may do with a slot follows from the relation (a continuation reuses it in
place; a branch keeps another conversation's content) and from costs (forks,
restores): a team's 12k-token system prompt behind 2k private tokens is worth
reusing although it is "only" 85% of the shorter side.  Among the idle options below the one
reusing the most blocks wins; on a tie, the cheapest and least destructive (in this order):

  a. HIT on an idle slot the request continues, or on an idle COLD slot (a
     COLD prompt is not protected): the prefix is reused in place;
  a'. HIT on an idle HOT slot the request branches from, whose own part (after
     the shared prefix, beyond what a sibling's saved entry holds) is cheaper to
     compute again than to save and restore (C{keep_pays}: a sibling's short
     last question): in place, no save;
  b. RESTORE a saved disk entry sharing the prefix into an idle slot of the
     backend that wrote it (free, then LRU cold, then LRU hot: evicted, saved
     first, L{Plan.evicts}); if that backend has none idle, the entry waits;
  c. FORK a HOT idle slot the request branches from: save it (unless saved),
     restore its file into an idle FREE/COLD slot of the same backend, and let
     llama.cpp reuse the shared prefix there; only when the cost model says
     it beats recomputing the common part (C{fork_pays});
  d. take a HOT idle branch slot over (HIT with C{evicts}: saved first), only
     when no FREE/COLD slot is idle, so an eviction happens anyway.

A restore (b) is an option only when it beats the best in-place option (a,
a', d) in time (C{restore_beats}: reading the file against computing the blocks
it adds): never a prefix a slot already holds.

Before that, a large request whose best continuation is on a busy slot waits
for it (WAIT) while it has affinity time, when that slot holds more than any
idle option (a restore must beat it strictly).  A branch never waits for a slot
busy with another request, and never takes a HOT slot without saving it first;
but a slot busy only with a background save (C{SlotView.saving}) is waited for
by a continuation and a branch alike: it is free once the save ends, and the
save blocks its backend's whole loop meanwhile, so computing from scratch on
another slot there would only start later and take longer.

Without any option: an idle FREE slot, else the least recently used idle COLD
slot, else the least recently used idle HOT slot, evicted (saved first); with
nothing idle the request waits in the queue (L{plan} returns None).
"""

from __future__ import annotations

import enum
from typing import Callable, Iterable, Mapping, Sequence

import attrs

from proxycache.routing._fingerprint import Fingerprint

EMPTY = Fingerprint(blocks=(), chars=0, words=0)


class SlotState(enum.Enum):
    FREE = "free"
    COLD = "cold"
    HOT = "hot"


class Decision(enum.Enum):
    HIT = "hit"  # reuses a slot's cached prefix
    RESTORE = "restore"  # loads a saved cache first (a disk entry, or a fork of another slot)
    MISS = "miss"  # computes the prompt from scratch
    SMALL = "small"  # a small request, kept off hot slots
    WAIT = "wait"  # its hot slot is busy: wait for it


class Relation(enum.Enum):
    CONTINUATION = "continuation"  # extends everything the slot or entry holds
    BRANCH = "branch"  # shares a prefix, then diverges
    UNRELATED = "unrelated"  # nothing in common


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
    tokens: int = 0  # tokens llama.cpp holds there, when measured
    saved: bool = False  # a disk entry holds exactly this content
    # Busy only with a background save: free once it ends, and its backend computes nothing meanwhile.
    saving: bool = False


@attrs.frozen
class Request:
    fingerprint: Fingerprint
    small: bool
    pinned: bool = False  # its saved cache is never evicted from disk
    kind: str = "chat"  # slot class: "fim" requests (editor completions) keep to their own slots
    tenant: str = ""  # who sent it (a short label, never a key): the fair queue's unit


@attrs.frozen
class DiskMatch:
    """The best saved cache for a request, already judged worth restoring."""

    key: str
    backend: str  # the backend that wrote it
    common_blocks: int
    similarity: float
    readers: frozenset[str] = frozenset()  # other backends that can restore it (same model, shared storage)
    # The entry's size, for the cost model (0: unknown).
    tokens: int = 0
    bytes: int = 0
    blocks: int = 0


@attrs.frozen
class Plan:
    decision: Decision
    slot: SlotId
    common_blocks: int = 0  # blocks expected to be reused (from the slot or the restore)
    similarity: float = 0.0
    evicts: bool = False  # the slot's HOT content is replaced: save it first
    restore: DiskMatch | None = None
    fork: SlotId | None = None  # RESTORE from this idle HOT slot: save it (unless saved), restore its file


# Does forking this HOT idle slot (save unless saved, restore elsewhere) beat
# recomputing the given number of its leading blocks?
ForkPays = Callable[[SlotView, int], bool]

# Is what this HOT slot holds beyond its first blocks (the given number) worth
# keeping: a save (unless saved) and a restore later, against computing it again?
KeepPays = Callable[[SlotView, int], bool]
# Does restoring this saved entry beat keeping the given number of its blocks in
# place and computing the rest?
RestoreBeats = Callable[[DiskMatch, int], bool]

# Among options reusing as many blocks, the cheapest and least destructive wins (higher first):
# in place, then in place over a branch whose own part is cheaper to compute again than to keep,
# then a restore, a fork, and a takeover (in place, but saving the slot first).
_PREFER_HIT, _PREFER_IN_PLACE, _PREFER_DISK, _PREFER_FORK, _PREFER_TAKEOVER = 4, 3, 2, 1, 0


def relation(request: Fingerprint, held: Fingerprint) -> Relation:
    """How a request relates to what a slot or saved entry holds."""
    common = request.common_blocks(held)
    if common == 0:
        return Relation.UNRELATED
    return Relation.CONTINUATION if common == len(held.blocks) else Relation.BRANCH


def is_small(fp: Fingerprint, min_chars: int, min_words: int, min_blocks: int) -> bool:
    """A request below any of the thresholds is small: never worth a hot slot."""
    return fp.chars < min_chars or fp.words < min_words or len(fp.blocks) < min_blocks


@attrs.frozen
class _Match:
    slot: SlotView
    common: int
    ratio: float
    relation: Relation


def _matches(request: Request, slots: Iterable[SlotView], min_ratio: float) -> list[_Match]:
    """Slots sharing a prefix (small requests: COLD ones passing C{min_ratio} only)."""
    allowed = (SlotState.COLD,) if request.small else (SlotState.COLD, SlotState.HOT)
    found = []
    for slot in slots:
        if slot.state not in allowed:
            continue
        common = request.fingerprint.common_blocks(slot.fingerprint)
        if common == 0:
            continue
        ratio = common / min(len(request.fingerprint.blocks), len(slot.fingerprint.blocks))
        if request.small and ratio < min_ratio:
            continue
        kind = Relation.CONTINUATION if common == len(slot.fingerprint.blocks) else Relation.BRANCH
        found.append(_Match(slot, common, ratio, kind))
    return found


def best_match(
    request: Request, slots: Iterable[SlotView], min_ratio: float
) -> tuple[SlotView, int, float] | None:
    """
    The slot sharing the most leading blocks with the request, whatever their
    relation; idle slots win ties, then the most recent.  Small requests only
    look at COLD slots passing C{min_ratio}.  Returns (slot, common blocks,
    similarity) or None.
    """
    found = _matches(request, slots, min_ratio)
    best = max(found, key=lambda m: (m.common, not m.slot.busy, m.slot.last_used), default=None)
    return None if best is None else (best.slot, best.common, best.ratio)


def _least_loaded(slots: Sequence[SlotView], state: SlotState, load: Mapping[str, int]) -> SlotView | None:
    """Of C{state}'s slots, one on the backend with the fewest busy slots, least recently used first."""
    matching = [s for s in slots if s.state is state]
    return min(matching, key=lambda s: (load.get(s.id.backend, 0), s.last_used, s.id), default=None)


def _least_recently_used(slots: Sequence[SlotView], state: SlotState, load: Mapping[str, int]) -> SlotView | None:
    """Of C{state}'s slots, the least recently used: its cache is worth the least; load breaks ties."""
    matching = [s for s in slots if s.state is state]
    return min(matching, key=lambda s: (s.last_used, load.get(s.id.backend, 0), s.id), default=None)


def target_slot(idle: Sequence[SlotView], load: Mapping[str, int] | None = None) -> SlotView | None:
    """
    Where a request without a usable cached prefix goes: a free slot, then a cold one (on the
    backend with the fewest busy slots, so that no backend computes two prompts while another
    idles), then the least recently used hot one (whose cache is worth the least).
    """
    load = load or {}
    return (
        _least_loaded(idle, SlotState.FREE, load)
        or _least_loaded(idle, SlotState.COLD, load)
        or _least_recently_used(idle, SlotState.HOT, load)
    )


def backend_load(slots: Sequence[SlotView]) -> dict[str, int]:
    """Busy slots per backend."""
    load: dict[str, int] = {}
    for slot in slots:
        if slot.busy:
            load[slot.id.backend] = load.get(slot.id.backend, 0) + 1
    return load


def _slot_option(
    match: _Match, idle: Sequence[SlotView], fork_pays: ForkPays | None, keep_pays: KeepPays | None = None
) -> tuple[int, Plan] | None:
    """How an idle matching slot can serve the request: (preference, plan), or None."""
    slot, common, ratio = match.slot, match.common, match.ratio
    if match.relation is Relation.CONTINUATION or slot.state is SlotState.COLD:
        return _PREFER_HIT, Plan(Decision.HIT, slot.id, common, ratio)
    # A branch of a HOT slot: its content after the shared prefix belongs to another conversation.
    if keep_pays is not None and not keep_pays(slot, common):
        # ... but that part (a sibling's last question) is cheaper to compute again than to save
        # and restore, or it is saved already: reuse the shared prefix in place, as llama.cpp would.
        return _PREFER_IN_PLACE, Plan(Decision.HIT, slot.id, common, ratio)
    spare = [s for s in idle if s.state is not SlotState.HOT]
    fork_target = target_slot([s for s in spare if s.id.backend == slot.id.backend])
    if fork_target is not None and fork_pays is not None and fork_pays(slot, common):
        return _PREFER_FORK, Plan(Decision.RESTORE, fork_target.id, common, ratio, fork=slot.id)
    if not spare:  # an eviction happens anyway: evict the slot whose prefix is reused, saved first
        return _PREFER_TAKEOVER, Plan(Decision.HIT, slot.id, common, ratio, evicts=True)
    return None


def plan(
    request: Request,
    slots: Sequence[SlotView],
    *,
    min_ratio: float,
    affinity: bool = True,
    disk: DiskMatch | None = None,
    fork_pays: ForkPays | None = None,
    keep_pays: KeepPays | None = None,
    restore_beats: RestoreBeats | None = None,
) -> Plan | None:
    """
    Decide where C{request} runs.  Returns a L{Plan}, a WAIT plan naming the
    busy slot whose conversation it continues (only while C{affinity}), or None
    when nothing is idle.  C{fork_pays} judges forks of HOT slots (None: never);
    C{keep_pays} whether a HOT branch's own part is worth a save (None: always);
    C{restore_beats} whether a restore beats the reuse a slot offers in place
    (None: only when it reuses more blocks).
    """
    idle = [s for s in slots if not s.busy]
    load = backend_load(slots)
    matches = _matches(request, slots, min_ratio)

    options: list[tuple[tuple[int, int, float], Plan]] = []
    for match in matches:
        if match.slot.busy:
            continue
        option = _slot_option(match, idle, None if request.small else fork_pays, keep_pays)
        if option is not None:
            preference, chosen = option
            # among equals: a hit on the most recent slot, a fork or takeover of the least recent
            recency = match.slot.last_used if preference == _PREFER_HIT else -match.slot.last_used
            options.append(((match.common, preference, recency), chosen))
    best_slot_common = max((rank[0] for rank, _ in options), default=0)
    in_place = max((rank[0] for rank, p in options if p.fork is None), default=0)

    # A restore needs an idle slot on a backend that can read the file: the one that wrote it,
    # or one sharing its save storage and model (the writer may be busy, or gone).  Never one of
    # a prefix a slot holds already: it must beat what a slot reuses in place, in time.
    if disk is not None and not request.small and (
        restore_beats(disk, in_place) if restore_beats is not None else disk.common_blocks > in_place
    ):
        restore_target = target_slot([s for s in idle if s.id.backend in disk.readers | {disk.backend}], load)
        if restore_target is not None:
            restore = Plan(
                Decision.RESTORE, restore_target.id, disk.common_blocks, disk.similarity,
                evicts=restore_target.state is SlotState.HOT, restore=disk,
            )
            options.append(((disk.common_blocks, _PREFER_DISK, 0.0), restore))
    best_disk_common = max((rank[0] for rank, p in options if p.restore is not None), default=0)

    # Only a continuation waits for a slot busy with a request (a branch would wait for
    # another conversation), a branch also for one busy with a background save; and only
    # for a large prefix: a small one is cheaper to recompute.
    busy = [m for m in matches if m.slot.busy and (m.relation is Relation.CONTINUATION or m.slot.saving)]
    waited = max(busy, key=lambda m: (m.common, m.slot.last_used), default=None)
    if (
        waited is not None
        and affinity
        and not request.small
        and waited.common > best_slot_common
        and waited.common >= best_disk_common
    ):
        return Plan(Decision.WAIT, waited.slot.id, waited.common, waited.ratio)

    if options:
        return max(options, key=lambda option: option[0])[1]
    target = target_slot(idle, load)
    if target is None:
        return None
    decision = Decision.SMALL if request.small else Decision.MISS
    return Plan(decision, target.id, evicts=target.state is SlotState.HOT)


def state_after(small: bool, succeeded: bool) -> SlotState:
    """The state a slot is left in once a request on it ends."""
    if not succeeded:
        return SlotState.COLD
    return SlotState.COLD if small else SlotState.HOT
