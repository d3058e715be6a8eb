"""
A slot's state as everyone but the scheduler sees it: frozen values.  What a
slot holds (L{SlotContent}), a snapshot of a slot (L{Slot}), the lease a
request is granted (L{Lease}) and what became of it (L{Outcome}).
"""

from __future__ import annotations

import attrs

from proxycache.routing import EMPTY, Fingerprint, Plan, Request, SlotId, SlotState, SlotView


@attrs.frozen
class SlotContent:
    """What a slot holds, as far as the proxy knows."""

    state: SlotState = SlotState.FREE
    fingerprint: Fingerprint = EMPTY
    tokens: int = 0  # tokens llama.cpp holds (prompt + generated), from timings
    saved_key: str | None = None  # the disk entry holding exactly this, if saved since it changed
    pinned: bool = False  # a client asked to keep this conversation on disk
    lineage: str | None = None  # the disk entry this conversation's content descends from
    tenant: str = ""  # whose request left this content


NOTHING = SlotContent()


@attrs.frozen
class Slot:
    """A slot as the scheduler saw it at one moment: read it, ask again for a later one."""

    id: SlotId
    content: SlotContent = NOTHING
    last_used: float = 0.0
    busy: bool = False
    saving: bool = False  # busy only with a background save (or a fork's save of it), not a request

    @property
    def state(self) -> SlotState:
        return self.content.state

    def view(self) -> SlotView:
        """What the planner sees of it."""
        content = self.content
        return SlotView(
            self.id, content.state, content.fingerprint, self.last_used, self.busy,
            content.tokens, content.saved_key is not None, self.saving,
        )


@attrs.frozen
class Lease:
    slot: Slot  # as granted (busy); L{Scheduler.slot} tells what it holds later
    plan: Plan
    request: Request
    waited: float  # seconds spent queued
    previous: SlotContent  # what the slot held before: the disk tier saves it if evicted
    source: Slot | None = None  # a fork's source slot, held until L{Scheduler.release_source}
    lineage: str | None = None  # the disk entry the request's content will descend from
    save_waited: float = 0.0  # of C{waited}: seconds it waited only because slots were busy saving


@attrs.frozen
class Outcome:
    """What became of a leased request, for the slot map."""

    succeeded: bool  # llama.cpp processed the prompt (a client cancel after that still counts)
    cache_n: int = 0
    prompt_n: int = 0
    predicted_n: int = 0
    prompt_ms: float = 0.0
    measured: bool = False  # llama.cpp's timings were seen: the counts above are real
    # Tokens llama.cpp showed the slot holding once it finished a request given up on (no timings came)
    held: int = 0
