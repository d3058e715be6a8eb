"""
Pure routing logic: fingerprints, the plan, the cost model, and the check of a
plan against what llama.cpp reports.  No I/O and no Twisted import.
"""

from proxycache.routing._costs import BRANCH_RETURN_ODDS, MIN_MEASURED_PREFILL_TOKENS, Speeds
from proxycache.routing._fair import FairShares, Tag, prefill_cost
from proxycache.routing._fingerprint import Fingerprint, conversation_text, fingerprint, fingerprint_text
from proxycache.routing._plan import (
    EMPTY,
    Decision,
    DiskMatch,
    ForkPays,
    KeepPays,
    Plan,
    Relation,
    Request,
    RestoreBeats,
    SlotId,
    SlotState,
    SlotView,
    backend_load,
    best_match,
    is_small,
    plan,
    relation,
    state_after,
    target_slot,
)
from proxycache.routing._reconcile import carried_out, expected_reuse, fell_short, reused_unplanned

__all__ = [
    "BRANCH_RETURN_ODDS", "MIN_MEASURED_PREFILL_TOKENS",
    "EMPTY", "Decision", "DiskMatch", "Fingerprint", "ForkPays", "KeepPays", "Plan", "Relation", "Request", "RestoreBeats", "SlotId",
    "SlotState", "SlotView", "Speeds", "backend_load", "best_match", "conversation_text", "expected_reuse",
    "carried_out", "fell_short", "fingerprint", "fingerprint_text", "is_small", "plan", "relation", "reused_unplanned",
    "state_after", "target_slot", "FairShares", "Tag", "prefill_cost",
]
