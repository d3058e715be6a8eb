"""
How each client API reports errors and llama.cpp's prompt-cache counts.

OpenAI APIs (chat, completions, Responses) answer C{{"error": {...}}};
Anthropic's answers C{{"type": "error", "error": {"type", "message"}}} with its
own error types.  llama.cpp reports what it reused as C{timings} (chat,
completions, infill, the end of a Responses stream) or only in the API's
usage (Messages: C{cache_read_input_tokens}; a whole Responses answer:
C{input_tokens_details.cached_tokens}).  The extractors below turn either into
the C{timings} keys the dispatcher reads (C{cache_n}, C{prompt_n},
C{predicted_n}).
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs

from proxycache.web._errors import ApiError

# Anthropic's error type for an HTTP status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    405: "invalid_request_error", 413: "request_too_large", 415: "invalid_request_error", 429: "rate_limit_error",
    500: "api_error", 502: "api_error", 503: "overloaded_error", 504: "api_error",
}


@attrs.frozen
class ErrorShape:
    """How one family of APIs writes an error, whole and in the middle of a stream."""

    name: str

    def body(self, error: ApiError) -> bytes:
        if self.name == "anthropic":
            kind = _ANTHROPIC_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
            return json.dumps({"type": "error", "error": {"type": kind, "message": error.message}}).encode()
        return error.body()

    def stream_error(self, message: str, done: bool) -> bytes:
        """The events that end a broken stream (C{done}: the API's own end marker was seen)."""
        error: dict[str, Any]
        if self.name == "anthropic":
            error = {"type": "error", "error": {"type": "api_error", "message": message}}
            return b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n"
        if self.name == "responses":
            error = {"type": "error", "code": "upstream_error", "message": message, "param": None}
            return b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n"
        error = {"error": {"message": message, "type": "server_error", "code": "upstream_error"}}
        return b"data: " + json.dumps(error).encode() + b"\n\n" + (b"" if done else b"data: [DONE]\n\n")

    def convert(self, status: int, raw: bytes) -> tuple[int, bytes]:
        """llama.cpp's own (OpenAI-shaped) error, in this shape, and the status to answer it with."""
        try:
            decoded = json.loads(raw)
            error = decoded["error"]
            message = str(error["message"])
        except (ValueError, KeyError, TypeError):
            return status, raw
        if status == 500 and _UNSUPPORTED_INPUT.match(message):
            # An image or audio for a text-only model: the client's mistake, and a 500 makes the
            # SDKs retry what can only fail again.
            status = 400
            raw = json.dumps({**decoded, "error": {**error, "code": 400, "type": "invalid_request_error"}}).encode()
        if self.name != "anthropic":
            return status, raw
        return status, self.body(ApiError(status, message))


# How llama.cpp words a 500 for input the loaded model cannot take.
_UNSUPPORTED_INPUT = re.compile(r"\w+ input is not supported")


OPENAI = ErrorShape("openai")
RESPONSES = ErrorShape("responses")
ANTHROPIC = ErrorShape("anthropic")


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def llama_timings(event: Any) -> dict[str, Any]:
    """llama.cpp's own C{timings}, where a response or event carries them."""
    timings = event.get("timings") if isinstance(event, dict) else None
    return timings if isinstance(timings, dict) else {}


def responses_counts(event: Any) -> dict[str, Any]:
    """A Responses answer or stream event: llama.cpp's timings, else its usage as timings keys."""
    if not isinstance(event, dict):
        return {}
    timings = llama_timings(event)
    if timings:
        return timings
    nested = event.get("response")
    response = nested if isinstance(nested, dict) else event
    usage = response.get("usage")
    if not isinstance(usage, dict):
        return {}
    details = usage.get("input_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
    total = _count(usage.get("input_tokens"))
    if cached is None or total is None:
        return {}
    counts = {"cache_n": cached, "prompt_n": max(total - cached, 0)}
    output = _count(usage.get("output_tokens"))
    if output is not None:
        counts["predicted_n"] = output
    return counts
