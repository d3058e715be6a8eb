"""
Socket activation (C{--listen systemd:domain=INET:index=0}): the daemon
restarted while clients keep sending refuses no connection and fails no
request, because the listening socket outlives the process (as systemd keeps
it) and the kernel queues connections until the new process accepts them.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from typing import Any, Callable

from proxycache.testing import TWISTD, ProxyProcess, http

MESSAGES = [{"role": "user", "content": "Say something about the weather in Lisbon today, please."}]
BODY = {"messages": MESSAGES, "max_tokens": 2, "temperature": 0}


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    return sock


class Sender(threading.Thread):
    """Sends chat requests one after another and keeps every outcome."""

    def __init__(self, send: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.send = send
        self.stopping = threading.Event()
        self.outcomes: list[tuple[float, float, Any]] = []  # (sent, answered, status or the error)

    def run(self) -> None:
        while not self.stopping.is_set():
            sent = time.monotonic()
            try:
                outcome = self.send()
            except Exception as e:  # refused, reset, an error status: what must not happen
                outcome = repr(e)
            self.outcomes.append((sent, time.monotonic(), outcome))

    def answered_after(self, moment: float) -> int:
        return sum(1 for _, answered, _ in self.outcomes if answered > moment)


def read_response(sock: socket.socket) -> bytes:
    sock.settimeout(120)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_restart_under_load_refuses_nothing_and_fails_nothing(llama, tmp_path):
    sock = listening_socket()
    proxy = ProxyProcess(tmp_path, llama.url, listen_socket=sock, health_interval=5)
    # each request on a new connection, and the OpenAI SDK's kept-alive ones (no retries)
    fresh = Sender(lambda: http("POST", proxy.url + "/v1/chat/completions", BODY, timeout=120)[0])
    client = proxy.client(timeout=120)
    kept_alive = Sender(lambda: 200 if client.chat.completions.create(model="any", **BODY).choices else "empty")
    senders = [fresh, kept_alive]
    try:
        proxy.start()
        old_pid = proxy.pid
        for sender in senders:
            sender.start()
        started = time.monotonic()
        while min(sender.answered_after(started) for sender in senders) < 3:
            time.sleep(0.05)
        assert proxy.stop() in (0, -15)  # SIGTERM: drains, then exits
        # Nothing runs now: a client connecting is queued by the kernel, not refused.
        waiting = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        raw = json_request(BODY)
        waiting.sendall(raw)
        proxy.spawn()
        restarted = time.monotonic()
        assert proxy.pid != old_pid
        answer = read_response(waiting)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        while min(sender.answered_after(restarted) for sender in senders) < 3:
            time.sleep(0.05)
    finally:
        for sender in senders:
            sender.stopping.set()
        for sender in senders:
            sender.join(120)
        proxy.stop()
        sock.close()
    outcomes = [outcome for sender in senders for _, _, outcome in sender.outcomes]
    failed = [outcome for outcome in outcomes if outcome != 200]
    assert failed == [], f"{len(failed)} of {len(outcomes)} requests failed: {failed[:5]}"
    # some were sent while the old process drained or nothing ran, and answered by the new one
    straddling = [1 for sender in senders for sent, answered, _ in sender.outcomes if sent < restarted < answered]
    assert straddling


def json_request(body: dict[str, Any]) -> bytes:
    import json

    raw = json.dumps(body).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw
    )


def test_a_systemd_listen_without_a_socket_is_one_clear_line(tmp_path):
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "proxycache", "--listen", "systemd:domain=INET:index=0",
         "--meta-dir", str(tmp_path / "meta")],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert "systemd passed no socket" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_the_launcher_hands_over_the_socket_like_systemd():
    """The test launcher itself: fd 3, LISTEN_FDS=1 and LISTEN_PID of the program (not of the launcher)."""
    import sys

    sock = listening_socket()
    try:
        probe = (
            "import os, socket; s = socket.socket(fileno=3); "
            "print(os.environ['LISTEN_FDS'], os.environ['LISTEN_PID'] == str(os.getpid()), s.getsockname()[1])"
        )
        result = subprocess.run(
            [sys.executable, "-m", "proxycache.testing.activation", str(sock.fileno()), sys.executable, "-c", probe],
            capture_output=True, text=True, timeout=60, pass_fds=(sock.fileno(),),
        )
        assert result.stdout.split() == ["1", "True", str(sock.getsockname()[1])], result.stderr
    finally:
        sock.close()
