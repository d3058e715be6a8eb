"""
Running the real daemon (C{twistd -n proxycache}) as a child process for tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

TWISTD = str(Path(sys.executable).with_name("twistd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: Any = None, headers: dict | None = None, timeout: float = 60):
    """(status, headers, decoded JSON or raw bytes) without raising on HTTP errors."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "Content-Type" not in (headers or {}):
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, head, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        status, head, raw = e.code, e.headers, e.read()
    try:
        return status, head, json.loads(raw)
    except ValueError:
        return status, head, raw


class ProxyProcess:
    """C{twistd -n proxycache} with the given options, on a free port."""

    def __init__(self, workdir: Path, llama_url: str | None, env: dict | None = None, **options: Any) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.options = {
            "listen": f"tcp:{self.port}:interface=127.0.0.1",
            "meta-dir": str(workdir / "meta"),
            "health-interval": "0.5",
            **({"llama-url": llama_url} if llama_url else {}),
            **{k.replace("_", "-"): str(v) for k, v in options.items()},
        }
        self.env = env or {}
        self.log_path = workdir / f"proxy-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        flags = []
        for name, value in self.options.items():
            if value is True:
                flags.append(f"--{name}")
            elif value not in (None, False):
                flags.append(f"--{name}={value}")
        return [TWISTD, "-n", "--pidfile=", f"--logfile={self.log_path}", "proxycache", *flags]

    def start(self, wait_ready: bool = True, timeout: float = 60) -> "ProxyProcess":
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_", "PROXY"))}
        env.update(self.env)
        self.process = subprocess.Popen(self.argv(), cwd=self.workdir, env=env, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"proxycache exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                status, _, body = http("GET", self.url + "/proxycache/health", timeout=2)
            except OSError:
                time.sleep(0.1)
                continue
            if not wait_ready or status == 200:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"proxycache not ready in {timeout}s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def status(self) -> dict:
        return http("GET", self.url + "/status")[2]

    def client(self, **kwargs: Any):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)


def send_raw_chat(sock: "socket.socket", body: dict | bytes) -> "socket.socket":
    """Write a chat request on a plain socket (to disconnect or stall at will); returns it."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxycache\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(raw) + raw
    )
    return sock


def open_raw_chat(port: int, body: dict | bytes) -> "socket.socket":
    return send_raw_chat(socket.create_connection(("127.0.0.1", port)), body)
