"""
An editor's completions in llama.vscode's shape (C{/infill} with the open files
as C{input_extra}), one request at a time or typed at a steady pace from a
thread while something else runs.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import attrs

from proxycache.testing.http import http

FILES = [
    {"filename": "proxycache/slots/_scheduler.py", "text": "class Scheduler:\n    def pump(self) -> None:\n" * 30},
    {"filename": "proxycache/web/_app.py", "text": "class Proxy:\n    app = Klein()\n" * 30},
]


def infill_body(prefix: str, extra: list[dict[str, str]] = FILES, head: str = "def acquire(self):\n",
                suffix: str = "\n\n", n_predict: int = 4) -> dict[str, Any]:
    """An editor's FIM request: its files (C{extra}), the code before the cursor, a line after it."""
    return {"input_extra": extra, "input_prefix": head + prefix, "input_suffix": suffix,
            "prompt": "    ", "n_predict": n_predict, "cache_prompt": True, "samplers": ["top_k"], "top_k": 40}


@attrs.define
class Completion:
    started: float  # time.perf_counter() when sent
    seconds: float
    status: int
    slot: str | None
    decision: str | None


@attrs.define
class Editor:
    """
    Someone typing: one C{/infill} every C{every} seconds (the next line of code
    each time) against C{url}, from a thread, until L{stop}.  Every completion is
    kept in C{done}.
    """

    url: str
    every: float = 0.4
    extra: list[dict[str, str]] = attrs.field(factory=lambda: list(FILES))
    done: list[Completion] = attrs.field(factory=list)
    _stop: threading.Event = attrs.field(factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "Editor":
        self._thread = threading.Thread(target=self._type, name="editor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)

    def _type(self) -> None:
        line = 0
        while not self._stop.is_set():
            line += 1
            started = time.perf_counter()
            status, headers, _ = http("POST", self.url + "/infill", infill_body(f"    x{line} = {line}\n", self.extra),
                                      timeout=120)
            self.done.append(Completion(started, time.perf_counter() - started, status,
                                        headers.get("X-Proxycache-Slot"), headers.get("X-Proxycache-Decision")))
            self._stop.wait(max(0.0, self.every - (time.perf_counter() - started)))
