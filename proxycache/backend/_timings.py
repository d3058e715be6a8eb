"""
Reading llama.cpp's C{timings} out of a relayed SSE stream without buffering it.
"""

from __future__ import annotations

import json
from typing import Any


class TimingsTap:
    """Fed every relayed chunk; remembers the last C{timings} object seen in a C{data:} line."""

    def __init__(self) -> None:
        self._partial = b""
        self.timings: dict[str, Any] = {}
        self.done = False

    def feed(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
            elif b'"timings"' in payload:
                try:
                    timings = json.loads(payload).get("timings")
                except (ValueError, AttributeError):
                    continue
                if isinstance(timings, dict):
                    self.timings.clear()  # in place: the relay holds on to this dict
                    self.timings.update(timings)


def timings_of(body: Any) -> dict[str, Any]:
    timings = body.get("timings") if isinstance(body, dict) else None
    return timings if isinstance(timings, dict) else {}
