"""
The llama.cpp backend: every llama-server specific behind L{Backend}.
"""

from proxycache.backend._actions import FailureKind, IdleSlot, Restored, Saved, SlotActionFailed, StillBusy, decoding
from proxycache.backend._features import (
    MAX_SLOTS, OLDEST_SUPPORTED_BUILD, RAM_CACHE, Features, backend_warnings, build_notice, build_number,
    usable_slots,
)
from proxycache.backend._http import (
    UPSTREAM_FAILURES, StreamStalled, UpstreamError, cancelled, pipe_body, read_body, unreachable,
)
from proxycache.backend._identity import model_identity
from proxycache.backend._llama import Description, LlamaServer, process_marker, restarted
from proxycache.backend._protocol import Backend

__all__ = [
    "MAX_SLOTS", "OLDEST_SUPPORTED_BUILD", "RAM_CACHE", "Features", "backend_warnings", "build_notice",
    "build_number", "usable_slots",
    "UPSTREAM_FAILURES", "Backend", "Description", "FailureKind", "IdleSlot", "Restored", "Saved", "SlotActionFailed", "StillBusy", "LlamaServer", "decoding", "StreamStalled", "UpstreamError",
    "cancelled", "model_identity", "pipe_body", "process_marker", "read_body", "restarted", "unreachable",
]
