"""
The scheduler's waiting room: requests waiting for a slot, in the order they
should be served, and what each tenant holds.

C{fair} orders waiters by start-time fair queueing across tenants
(L{proxycache.routing.FairShares}), FIFO within a tenant; C{fifo} (the old
behaviour, kept for comparison) serves them in arrival order.  Per-tenant
limits: at most C{max_in_flight} leases at once (more wait here), at most
C{max_queued} waiting (more are refused with L{TenantLimit}).
"""

from __future__ import annotations

import bisect
import collections
import itertools
from typing import Iterator, Mapping

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall

from proxycache.routing import DiskMatch, FairShares, Request, Tag

UNKNOWN = object()  # L{Waiter.disk} not looked up (again) yet


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its limit."""


class TenantLimit(QueueFull):
    """One tenant has as many requests waiting as it may."""

    def __init__(self, tenant: str, limit: int) -> None:
        super().__init__(f"{tenant} already has {limit} requests waiting for a slot")
        self.tenant = tenant


@attrs.define(eq=False)
class Waiter:
    request: Request
    deferred: Deferred
    enqueued: float
    affinity_until: float
    timer: IDelayedCall | None = None
    tag: Tag = Tag(0.0, 0.0)
    seq: int = 0
    # The disk index's answer for the request, looked up on arrival for its cost and reused by its
    # first plan (the same instant); UNKNOWN afterwards, so that a waiting request sees new saves.
    disk: DiskMatch | None | object = UNKNOWN
    # Time queued behind background saves: it would have had a slot at once had they not run.
    save_waited: float = 0.0
    behind_save_since: float | None = None

    def behind_save(self, now: float, behind: bool) -> None:
        """Whether, as planned C{now}, it waits only because slots are busy with background saves."""
        if behind and self.behind_save_since is None:
            self.behind_save_since = now
        elif not behind and self.behind_save_since is not None:
            self.save_waited += now - self.behind_save_since
            self.behind_save_since = None

    @property
    def order(self) -> tuple[float, int]:
        return (self.tag.start, self.seq)


class FairQueue:
    def __init__(
        self,
        *,
        fair: bool = True,
        weights: Mapping[str, float] | None = None,
        max_in_flight: int = 0,
        max_queued: int = 0,
    ) -> None:
        self.fair = fair
        self.shares = FairShares(dict(weights or {}))
        self.max_in_flight = max_in_flight  # 0: no limit
        self.max_queued = max_queued  # 0: no limit
        self._waiters: list[Waiter] = []  # sorted by Waiter.order
        self._seq = itertools.count()
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.queued: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._waiters)

    def __iter__(self) -> Iterator[Waiter]:
        """The waiters in the order they are to be served (a copy: granting removes them)."""
        return iter(list(self._waiters))

    def __contains__(self, waiter: Waiter) -> bool:
        return waiter in self._waiters

    def _share(self, tenant: str) -> str:
        return tenant if self.fair else ""

    def add(self, waiter: Waiter, cost: float) -> None:
        """
        Queue C{waiter}, its place set by its tenant's share and C{cost}.

        @raise TenantLimit: its tenant already has C{max_queued} waiting.
        """
        tenant = waiter.request.tenant
        if self.max_queued and self.queued[tenant] >= self.max_queued:
            raise TenantLimit(tenant, self.max_queued)
        waiter.tag = self.shares.tag(self._share(tenant), cost if self.fair else 1.0)
        waiter.seq = next(self._seq)
        bisect.insort(self._waiters, waiter, key=lambda w: w.order)
        self.queued[tenant] += 1

    def remove(self, waiter: Waiter, *, served: bool) -> None:
        """C{waiter} leaves the queue: granted a slot (C{served}), or cancelled or refused."""
        if waiter not in self._waiters:
            return
        self._waiters.remove(waiter)
        tenant = waiter.request.tenant
        self.queued[tenant] -= 1
        if not self.queued[tenant]:
            del self.queued[tenant]
        if served:
            self.shares.granted(waiter.tag)
            self.in_flight[tenant] += 1
        else:
            self.shares.refund(self._share(tenant), waiter.tag)

    def may_start(self, tenant: str) -> bool:
        """Whether C{tenant} is below its in-flight limit."""
        return not self.max_in_flight or self.in_flight[tenant] < self.max_in_flight

    def released(self, tenant: str) -> None:
        """A lease of C{tenant} ended."""
        self.in_flight[tenant] -= 1
        if self.in_flight[tenant] <= 0:
            del self.in_flight[tenant]
