"""
Fair shares of the slots between tenants: pure arithmetic, no reactor.

Waiting requests are ordered by start-time fair queueing (SFQ), a virtual-clock
form of deficit round robin that gives every waiter one place in a total order,
which the scheduler needs: it walks the waiters in order and grants each one
the planner can place, passing over a follow-up that waits for its own busy
slot.  Each tenant's requests are tagged in arrival order:

    start  = max(virtual now, the tenant's last finish)
    finish = start + cost / weight

and served by start tag (arrival breaks ties).  Virtual now is the start tag
of the latest granted request.  A tenant that queued sixteen requests has
start tags far ahead; another tenant arriving now gets the current virtual
time, so its request is next.  The cost is the prefill the request will
likely need (L{prefill_cost}): a huge prompt uses up its tenant's share
faster than a follow-up that reuses a cached prefix.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import attrs

from proxycache.routing._plan import DiskMatch, Request, SlotState, SlotView


def prefill_cost(request: Request, slots: Sequence[SlotView], disk: DiskMatch | None = None) -> int:
    """
    Blocks the request will likely compute: its own beyond the longest prefix a
    slot holds (busy or idle, it is the best case) or a saved cache worth
    restoring (C{disk}) holds, plus one for the answer.  A returning
    conversation whose slot went to someone else costs a restore, not its
    whole context again.
    """
    held = max(
        (request.fingerprint.common_blocks(s.fingerprint) for s in slots if s.state is not SlotState.FREE),
        default=0,
    )
    if disk is not None:
        held = max(held, disk.common_blocks)
    return len(request.fingerprint.blocks) - held + 1


@attrs.frozen
class Tag:
    start: float
    finish: float


@attrs.define
class FairShares:
    """Virtual time and each tenant's last finish tag."""

    weights: Mapping[str, float] = attrs.Factory(dict)  # tenant -> weight (default 1)
    now: float = 0.0
    finish: dict[str, float] = attrs.Factory(dict)

    def tag(self, tenant: str, cost: float) -> Tag:
        """The tags of a request of C{tenant} arriving now."""
        start = max(self.now, self.finish.get(tenant, 0.0))
        end = start + max(cost, 1.0) / self.weights.get(tenant, 1.0)
        self.finish[tenant] = end
        return Tag(start, end)

    def granted(self, tag: Tag) -> None:
        """A request with C{tag} got a slot: virtual time moves on to it."""
        if tag.start > self.now:
            self.now = tag.start
            # A tenant whose last finish is behind virtual now is like a new one: forget it.
            for tenant in [t for t, f in self.finish.items() if f <= self.now]:
                del self.finish[tenant]

    def refund(self, tenant: str, tag: Tag) -> None:
        """A request left the queue unserved: if it was its tenant's last, its share is given back."""
        if self.finish.get(tenant) == tag.finish:
            self.finish[tenant] = tag.start
