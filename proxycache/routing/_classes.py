"""
Request classes: which slots a request may be planned on, before the planner
chooses among them.  Pure, no reactor.

  fim    editor completions: latency-critical and short.  At most C{cap} slots
         of a backend hold FIM at a time; a FIM request goes to a slot already
         holding FIM, or, below the cap, to any slot (the planner then takes
         the coldest: free, least recently used cold, least recently used hot,
         saved first).  Which slots hold FIM follows demand, not an index.
  small  side calls (titles, summaries, quota checks): never a HOT slot in the
         C{protected} set (a conversation whose owner has a request in flight
         or just finished); a FIM slot or a cold one is fine.
  chat   everything else: every slot but those holding FIM while FIM is active.

A backend whose cap is 0 shares all its slots between classes.
"""

from __future__ import annotations

import collections
from typing import AbstractSet, Mapping, Sequence

from proxycache.routing._plan import Request, SlotId, SlotView


def fim_cap(kept: int | None, slots: int) -> int:
    """How many of a backend's C{slots} may hold FIM (0: no separation): C{kept}, by default 1 from 3 slots up."""
    cap = kept if kept is not None else (1 if slots >= 3 else 0)
    return cap if 0 < cap < slots else 0


def eligible(
    request: Request,
    views: Sequence[SlotView],
    *,
    caps: Mapping[str, int],
    fim_held: AbstractSet[SlotId],
    fim_active: bool,
    protected: AbstractSet[SlotId] = frozenset(),
) -> list[SlotView]:
    """The slots C{request} may be planned on."""
    held = collections.Counter(slot_id.backend for slot_id in fim_held)
    allowed = []
    for view in views:
        cap = caps.get(view.id.backend, 0)
        holds_fim = view.id in fim_held
        if request.kind == "fim":
            if cap and not holds_fim and held[view.id.backend] >= cap:
                continue
        elif request.small:
            if view.id in protected:
                continue
        elif cap and holds_fim and fim_active:
            continue
        allowed.append(view)
    return allowed
