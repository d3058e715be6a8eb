"""
OpenAI-style error bodies: C{{"error": {"message", "type", "code"}}}.
"""

from __future__ import annotations

import json

import attrs


@attrs.frozen
class ApiError(Exception):
    """An error answered to the client as OpenAI error JSON with C{status}."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code)

    def __str__(self) -> str:
        return f"{self.status} {self.message}"


def error_body(message: str, type: str, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "code": code}}).encode()


def bad_request(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code)


def upstream_unavailable(detail: str, retry_after: int = 5) -> ApiError:
    return ApiError(
        503, f"llama-server is not available: {detail}", "server_error", "upstream_unavailable",
        (("Retry-After", str(retry_after)),),
    )
