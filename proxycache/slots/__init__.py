"""
Slots: who holds which llama.cpp slot (the scheduler), the one place a
request's lease lives (the dispatcher), and the watch on each backend.
"""

from proxycache.slots._dispatch import (
    Dispatcher,
    Exchange,
    NoCache,
    Progress,
    RequestRecord,
    SlotPreparer,
)
from proxycache.slots._fleet import Fleet
from proxycache.slots._gate import NoBackend, ReadyGate
from proxycache.slots._given_up import detached
from proxycache.slots._monitor import BackendHealth, Monitor
from proxycache.slots._fairqueue import QueueFull, TenantLimit
from proxycache.slots._scheduler import Hold, Scheduler
from proxycache.slots._slot import NOTHING, Lease, Outcome, Slot, SlotContent

__all__ = [
    "NOTHING", "BackendHealth", "Dispatcher", "Exchange", "Fleet", "Hold", "Lease", "Monitor", "NoBackend", "NoCache",
    "Outcome", "Progress", "QueueFull", "ReadyGate", "RequestRecord", "Scheduler", "Slot", "SlotContent", "SlotPreparer",
    "TenantLimit", "detached",
]
