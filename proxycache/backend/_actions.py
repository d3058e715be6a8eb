"""
What a slot action comes to, typed: a save or a restore with its counts, or a
failure told apart by its kind; and a slot as llama-server shows it once idle.
llama.cpp's reply fields and error texts are read here and nowhere else.

Seen on b11434 and b11549: C{--slot-save-path} missing answers 501 (to every
action); a restore of a missing, damaged or foreign file, or one without room,
answers 400 "Unable to restore slot: ..." (the server does not say which),
and some truncated files abort the server (the disk tier looks at a file
before and after: L{proxycache.cache._unusable}); a file written by other
weights of the same geometry restores with 200.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs
from twisted.internet.defer import TimeoutError

from proxycache.backend._http import UpstreamError, unreachable


class FailureKind(enum.Enum):
    UNSUPPORTED = "unsupported"  # 501: llama-server runs without --slot-save-path
    MISSING_FILE = "missing_file"  # the server says the file is not there
    REJECTED = "rejected"  # 400: it could not load or write the file (missing, damaged, foreign, no room)
    UNREACHABLE = "unreachable"  # nobody listens there
    TIMEOUT = "timeout"  # no answer in time
    FAILED = "failed"  # anything else: another status, a reply cut short


class SlotActionFailed(UpstreamError):
    """A slot action that did not happen, with llama-server's status (None: no reply) and why."""

    def __init__(self, action: str, index: int, status: int | None, reason: str, kind: FailureKind) -> None:
        said = f"{status} {reason}" if status is not None else reason
        super().__init__(f"slot {index} {action} failed: {said}")
        self.action = action
        self.index = index
        self.status = status
        self.reason = reason
        self.kind = kind


@attrs.frozen
class Saved:
    tokens: int | None  # tokens written; None when the server did not say
    bytes: int  # size of the file written
    ms: float  # the server's own time for it


@attrs.frozen
class Restored:
    tokens: int  # tokens now in the slot
    bytes: int | None  # size of the file read; None when the server did not say
    ms: float


@attrs.frozen
class IdleSlot:
    """A slot as llama-server shows it (C{GET /slots}) when it reports it idle."""

    used: bool  # it ran a task since the server started: False means a restart behind our back
    # Tokens it holds (its last prompt and answer, less the last token; 0 after an erase), when the server says
    tokens: int | None
    # Seen generating before it went idle: it holds that task's whole prompt (and some of its answer).
    decoded: bool = False


class StillBusy(TimeoutError):
    """The slot stayed busy in llama.cpp; C{decoded}: it was seen generating (its prompt computed)."""

    def __init__(self, message: str, decoded: bool) -> None:
        super().__init__(message)
        self.decoded = decoded


def saved(reply: Any) -> Saved:
    reply = reply if isinstance(reply, dict) else {}
    return Saved(_int(reply.get("n_saved")), _int(reply.get("n_written")) or 0, _ms(reply, "save_ms"))


def restored(reply: Any) -> Restored:
    reply = reply if isinstance(reply, dict) else {}
    return Restored(_int(reply.get("n_restored")) or 0, _int(reply.get("n_read")), _ms(reply, "restore_ms"))


def idle_slot(slot: dict[str, Any]) -> IdleSlot:
    return IdleSlot(used="id_task" in slot, tokens=_int(slot.get("n_prompt_tokens")))


def decoding(slot: dict[str, Any]) -> bool:
    """
    Does a busy slot generate its answer, its prompt all computed?  b11434 and
    b11549 show C{next_token} as a list of one dict, older builds as a dict;
    its C{n_decoded} counts the answer's tokens so far (0 during the prompt).
    """
    after = slot.get("next_token")
    after = after[0] if isinstance(after, list) and after else after
    decoded = after.get("n_decoded") if isinstance(after, dict) else None
    return bool(slot.get("is_processing")) and (_int(decoded) or 0) > 0


def refused(action: str, index: int, status: int, reply: Any) -> SlotActionFailed:
    """The failure a non-200 answer to a slot action means."""
    message = reply.get("error", {}).get("message") if isinstance(reply, dict) else None
    reason = str(message or reply)
    lowered = reason.lower()
    if status == 501:
        kind = FailureKind.UNSUPPORTED
    elif status == 404 or "failed to open" in lowered or "not found" in lowered:
        kind = FailureKind.MISSING_FILE
    elif status == 400:
        kind = FailureKind.REJECTED
    else:
        kind = FailureKind.FAILED
    return SlotActionFailed(action, index, status, reason, kind)


def unanswered(action: str, index: int, error: BaseException) -> SlotActionFailed:
    """The failure a slot action that got no answer (C{error}) means."""
    if unreachable(error):
        kind = FailureKind.UNREACHABLE
    elif _caused_by(error, TimeoutError):
        kind = FailureKind.TIMEOUT
    else:
        kind = FailureKind.FAILED
    return SlotActionFailed(action, index, None, str(error), kind)


def _caused_by(error: BaseException | None, kind: type[BaseException]) -> bool:
    while error is not None:
        if isinstance(error, kind):
            return True
        error = error.__cause__
    return False


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _ms(reply: dict[str, Any], name: str) -> float:
    timings = reply.get("timings")
    value = timings.get(name) if isinstance(timings, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
