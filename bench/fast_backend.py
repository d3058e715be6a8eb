"""
A llama-server stand-in that answers at once, for measuring the proxy itself:
C{python -m bench.fast_backend PORT SLOTS [STREAM_CHUNKS]}.

It speaks just enough of llama.cpp for proxycache: C{/props}, C{/slots},
C{/v1/models}, chat completions (whole, or C{STREAM_CHUNKS} SSE events with
C{timings} in the last one) and slot actions.  Twisted, one process.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

TIMINGS = {"cache_n": 1000, "prompt_n": 12, "prompt_ms": 1.0, "predicted_n": 8, "predicted_ms": 1.0}
ANSWER = json.dumps({
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1012, "completion_tokens": 8, "total_tokens": 1020},
    "timings": TIMINGS,
}).encode()
CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"token "}}],"object":"chat.completion.chunk"}\n\n'
LAST = (b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"timings":'
        + json.dumps(TIMINGS).encode() + b"}\n\ndata: [DONE]\n\n")


class Backend(Resource):
    isLeaf = True

    def __init__(self, slots: int, stream_chunks: int) -> None:
        super().__init__()
        self.slots = slots
        self.stream_chunks = stream_chunks
        self.tasks = 0

    def _json(self, request: Request, value: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return value if isinstance(value, bytes) else json.dumps(value).encode()

    def render_GET(self, request: Request) -> bytes:
        path = request.path
        if path == b"/props":
            return self._json(request, {"total_slots": self.slots, "model_path": "fast.gguf", "build_info": "fast"})
        if path == b"/slots":
            return self._json(request, [
                {"id": i, "n_ctx": 65536, "is_processing": False, "id_task": self.tasks} for i in range(self.slots)
            ])
        if path == b"/v1/models":
            return self._json(request, {"data": [{"id": "fast", "meta": {"n_params": 1}}]})
        request.setResponseCode(404)
        return self._json(request, {"error": {"message": "not found"}})

    def render_POST(self, request: Request) -> bytes | int:
        body = json.loads(request.content.read() or b"{}")
        self.tasks += 1
        if request.path.startswith(b"/slots/"):
            return self._json(request, {"id_slot": 0, "n_saved": 1000, "n_written": 4096, "n_restored": 1000,
                                        "n_read": 4096, "timings": {"save_ms": 1.0, "restore_ms": 1.0}})
        if not body.get("stream"):
            return self._json(request, ANSWER)
        request.setHeader(b"content-type", b"text/event-stream")
        for _ in range(self.stream_chunks):
            request.write(CHUNK)
        request.write(LAST)
        request.finish()
        return NOT_DONE_YET


def main() -> None:
    port, slots = int(sys.argv[1]), int(sys.argv[2])
    chunks = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    reactor.listenTCP(port, Site(Backend(slots, chunks)), interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
