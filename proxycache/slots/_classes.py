"""
What the request classes (L{proxycache.routing._classes}) need to know of the
slots, kept up to date as leases come and go: which slots hold FIM and whether
FIM is in use.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from proxycache.routing import Request, SlotId, SlotState, SlotView
from proxycache.routing._classes import eligible, fim_cap


class SlotClasses:
    def __init__(
        self,
        clock: IReactorTime,
        *,
        fim_slots: int | None,
        fim_idle: float,
        side_call_wait: float,
        wake: Callable[[], None],
    ) -> None:
        self.clock = clock
        self.fim_slots = fim_slots  # most slots per backend holding FIM; None: 1 from 3 slots up
        self.fim_idle = fim_idle  # seconds without FIM after which its slots serve chat again
        self.side_call_wait = side_call_wait  # a small request waits this long rather than evict a busy owner
        self.wake = wake  # the scheduler's pump: a slot became eligible by time alone
        self.fim_held: set[SlotId] = set()
        self._fim_in_flight = 0
        self._fim_last = float("-inf")
        self._fim_timer: IDelayedCall | None = None

    def fim_active(self) -> bool:
        return self._fim_in_flight > 0 or self.clock.seconds() - self._fim_last < self.fim_idle

    def kind(self, slot_id: SlotId) -> str:
        return "fim" if slot_id in self.fim_held else "chat"

    def protected(
        self, views: Sequence[SlotView], owner: Callable[[SlotId], str], in_flight: Mapping[str, int]
    ) -> tuple[set[SlotId], float | None]:
        """
        Idle HOT slots a side call must not take (their C{owner} has a request in
        flight, or they were used within C{side_call_wait}), and when the earliest
        of the latter stops being protected by time.  A slot holding FIM is never
        protected: it is where side calls run, even while an editor types.
        """
        now = self.clock.seconds()
        protected, until = set(), None
        for view in views:
            if view.busy or view.state is not SlotState.HOT or view.id in self.fim_held:
                continue
            if in_flight.get(owner(view.id), 0) > 0:
                protected.add(view.id)
            elif now - view.last_used < self.side_call_wait:
                protected.add(view.id)
                ends = view.last_used + self.side_call_wait
                until = ends if until is None else min(until, ends)
        return protected, until

    def eligible(
        self, request: Request, views: Sequence[SlotView], counts: Mapping[str, int], protected: set[SlotId]
    ) -> list[SlotView]:
        caps = {backend: fim_cap(self.fim_slots, count) for backend, count in counts.items()}
        return eligible(
            request, views, caps=caps, fim_held=self.fim_held, fim_active=self.fim_active(), protected=protected
        )

    # -- as leases come and go ---------------------------------------------

    def seen(self, request: Request) -> None:
        if request.kind == "fim":
            self._fim_last = self.clock.seconds()

    def granted(self, slot_id: SlotId, request: Request) -> None:
        if request.kind == "fim":
            self.fim_held.add(slot_id)
            self._fim_in_flight += 1
        elif not request.small:  # a chat conversation took the slot back
            self.fim_held.discard(slot_id)

    def released(self, request: Request) -> None:
        if request.kind != "fim":
            return
        self._fim_in_flight -= 1
        self._fim_last = self.clock.seconds()
        # When FIM has been idle long enough, chat waiters may take its slots: look again then.
        if self._fim_timer is not None and self._fim_timer.active():
            self._fim_timer.reset(self.fim_idle)
        else:
            self._fim_timer = self.clock.callLater(self.fim_idle, self.wake)

    def forget(self, slot_id: SlotId) -> None:
        self.fim_held.discard(slot_id)
