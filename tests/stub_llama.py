"""
A misbehaving stand-in for llama-server, for the faults a real one will not
produce on demand: slow headers, stalled bodies, odd errors.  The behaviour is
chosen by the last message's content.  (Real-server tests cover the rest.)
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROPS = {"total_slots": 2, "model_path": "stub.gguf", "build_info": "stub"}
SLOTS = [{"id": 0, "n_ctx": 4096, "is_processing": False}, {"id": 1, "n_ctx": 4096, "is_processing": False}]
CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}],"object":"chat.completion.chunk"}\n\n'


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _json(self, status, body):
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        if self.path == "/props":
            self._json(200, PROPS)
        elif self.path == "/slots" and self.server.cut_slots > 0:
            # a reply cut inside its headers, as by a crash or a proxy in between
            self.server.cut_slots -= 1
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/js")
            self.wfile.flush()
            self.close_connection = True
        elif self.path == "/slots":
            self._json(200, self.server.slots)
        elif self.path == "/v1/models":
            self._json(200, {"data": [{"id": "stub", "meta": {"n_params": 1}}]})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, body))
        if self.path.startswith("/slots/"):
            # a slow save or restore, to cancel a request in the middle of it
            time.sleep(self.server.slot_action_seconds)
            self.server.actions_done.append(self.path)
            self._json(200, {"id_slot": 0, "filename": body.get("filename"), "n_saved": 1000, "n_written": 4096,
                             "n_restored": 1000, "n_read": 4096, "timings": {"save_ms": 1.0, "restore_ms": 1.0}})
            return
        if self.path == "/completion":  # the model identity probe
            top = [{"id": i, "token": "x", "logprob": -1.0 - i} for i in range(body.get("n_probs", 0))]
            probabilities = [{"id": 0, "logprob": -1.0, "top_logprobs": top}]
            self._json(200, {"content": "x", "completion_probabilities": probabilities})
            return
        for slot in self.server.slots:
            if slot["id"] == body.get("id_slot"):
                slot["id_task"] = slot.get("id_task", 0) + 1
        behaviour = body["messages"][-1]["content"]
        if behaviour == "slow-headers":
            time.sleep(3)
            self._json(200, {"choices": []})
        elif behaviour == "error-503":
            self._json(503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
        elif behaviour == "error-418":
            self._json(418, {"error": {"code": 418, "message": "teapot", "type": "odd_error"}})
        elif behaviour == "done-then-linger":
            # a complete stream whose body llama.cpp is slow to close
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            last = (b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
                    b'"timings":{"cache_n":4000,"prompt_n":12,"prompt_ms":3.0,"predicted_n":1}}\n\ndata: [DONE]\n\n')
            for chunk in (CHUNK, last):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
            time.sleep(2)
            self.wfile.write(b"0\r\n\r\n")
        elif behaviour in ("stall-stream", "stall-body"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream" if behaviour == "stall-stream" else "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            first = CHUNK if behaviour == "stall-stream" else b'{"choices": ['
            self.wfile.write(b"%x\r\n%s\r\n" % (len(first), first))
            self.wfile.flush()
            time.sleep(3)
        else:
            prompt_n = len(json.dumps(body["messages"]))
            self._json(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                             "timings": {"cache_n": 0, "prompt_n": prompt_n, "prompt_ms": 1.0, "predicted_n": 1}})


class StubLlama:
    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.requests = []
        self.server.actions_done = []
        self.server.slot_action_seconds = 1.5
        self.server.slots = [dict(s) for s in SLOTS]  # this server's own, so that it can "restart"
        self.server.cut_slots = 0  # the next N GET /slots replies break off inside their headers
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def requests(self) -> list:
        return self.server.requests

    @property
    def actions_done(self) -> list:
        return self.server.actions_done

    def cut_slots_replies(self, n: int) -> None:
        self.server.cut_slots = n

    @property
    def slots_cut_pending(self) -> int:
        return self.server.cut_slots

    def restart(self) -> None:
        """Look like a new llama-server process: no slot has served a task."""
        self.server.slots = [dict(s) for s in SLOTS]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
