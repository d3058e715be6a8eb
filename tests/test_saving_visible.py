"""
A real llama.cpp slot busy only with a background save, as an operator and a
client see it: C{/status} and C{/metrics} say "saving" while the write-behind
runs, and a sibling that waits for it says so in its headers.  The save is
held at a relay in front of llama-server until the test has looked, so that
what is seen does not depend on how long the write takes.
"""

from __future__ import annotations

import random
import socket
import threading
from typing import Any

from proxycache.testing import ProxyProcess, wait_for
from tests.conversations import text

LIMITS = dict(min_prefix_chars=1000, min_prefix_words=150, min_prefix_blocks=8)


class SaveGate:
    """Relays connections to C{target_url}; a slot save request goes on only once L{opened} is set."""

    def __init__(self, target_url: str) -> None:
        host, port = target_url.rsplit("/", 1)[-1].rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.held = threading.Event()  # a save reached the gate
        self.opened = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self._target)
            self._sockets += [client, upstream]
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=_copy, args=(upstream, client), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := client.recv(65536):
                if b"action=save" in data and not self.opened.is_set():
                    self.held.set()
                    self.opened.wait(120)
                upstream.sendall(data)
        except OSError:
            pass
        _close(upstream)

    def close(self) -> None:
        self.opened.set()
        _close(self._listener)
        for sock in self._sockets:
            _close(sock)


def _copy(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def ask(client: Any, context: str, question: str) -> dict[str, Any]:
    raw = client.chat.completions.with_raw_response.create(
        model="any", max_tokens=4,
        messages=[{"role": "system", "content": context}, {"role": "user", "content": question}],
    )
    raw.parse()
    return {name: raw.headers[f"x-proxycache-{name}"] for name in (
        "decision", "slot", "queue-wait-ms", "save-wait-ms", "path-ms", "save-ms", "restore-ms")}


def test_status_shows_a_slot_saving_and_a_sibling_the_wait_for_it(llama_factory, tmp_path):
    llama = llama_factory(slots=2)
    gate = SaveGate(llama.url)
    proxy = ProxyProcess(
        tmp_path, gate.url, slot_save_path=str(llama.save_dir), write_behind=0.2, affinity_wait=300, **LIMITS
    ).start()
    try:
        client = proxy.client(timeout=300)
        rng = random.Random("saving visible")
        context = "Repository context. " + text(rng, 600)
        first = ask(client, context, "What does the parser do? " + text(rng, 10))
        assert first["decision"] == "miss"
        assert gate.held.wait(60), "no write-behind save of the context's slot"
        # the write-behind holds the slot now, until llama-server has written the file
        slots = {str(s["slot"]): s for s in proxy.status()["slots"]}
        assert (slots[first["slot"]]["busy"], slots[first["slot"]]["saving"]) == (True, True), slots
        assert [s["saving"] for n, s in slots.items() if n != first["slot"]] == [False], slots
        assert proxy.status()["backends"][0]["saving"] == 1
        assert proxy.metrics()["proxycache_slots_saving"] == 1

        answers: list[dict[str, Any]] = []
        sibling = threading.Thread(target=lambda: answers.append(ask(client, context, "And the lexer? ")))
        sibling.start()
        try:
            # the sibling waits for the slot holding its context instead of computing it on the free one
            wait_for(lambda: proxy.status()["queue_depth"] == 1, 30, "the sibling queued behind the save")
        finally:
            gate.opened.set()
            sibling.join(300)
        (answer,) = answers
        assert answer["decision"] == "hit" and answer["slot"] == first["slot"], answer
        save_wait = int(answer["save-wait-ms"])
        assert save_wait > 0, answer
        assert int(answer["queue-wait-ms"]) >= save_wait, answer
        parts = save_wait + int(answer["save-ms"]) + int(answer["restore-ms"])
        assert abs(int(answer["path-ms"]) - parts) <= 1, answer  # each rounded to the ms on its own
        status = proxy.status()
        assert not any(s["saving"] for s in status["slots"]), status["slots"]
        assert status["disk"]["saves"] == 1
        assert status["recent"][0]["save_wait_ms"] == save_wait and status["recent"][0]["path_ms"] >= save_wait
        assert proxy.metrics()["proxycache_slots_saving"] == 0
    finally:
        gate.opened.set()
        proxy.stop()
        gate.close()
