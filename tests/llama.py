"""
Synchronous helpers to run a real llama.cpp server from tests.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.processes import call, prometheus
from proxycache.embedded import LlamaServerSpec, child_env, command


class LlamaHTTPError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class LlamaProcess:
    """A llama.cpp server child; started by the constructor."""

    def __init__(self, spec: LlamaServerSpec, log_path: Path, timeout: float = 60.0) -> None:
        self.spec = spec
        self.log_path = Path(log_path)
        self.timeout = timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def save_dir(self) -> Path | None:
        return None if self.spec.save_dir is None else Path(self.spec.save_dir)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command(self.spec), stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                env=child_env(),
            )
        self._wait_healthy()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after C{timeout}."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close()

    def kill(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._close()

    def restart(self) -> None:
        """Stop and start again on the same port and save_dir."""
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def call(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> tuple[int, Any]:
        """C{(status, parsed JSON or text)}; HTTP errors are returned, not raised."""
        return call(method, self.url + path, body, timeout, self.spec.api_key)

    def get_json(self, path: str) -> Any:
        return self._ok(*self.call("GET", path))

    def post_json(self, path: str, body: Any, timeout: float = 60.0) -> Any:
        return self._ok(*self.call("POST", path, body, timeout))

    def slots(self) -> list[dict[str, Any]]:
        return self.get_json("/slots")

    def chat(self, content: str, **extra: Any) -> dict[str, Any]:
        """A short, deterministic chat completion."""
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 4,
                "temperature": 0, **extra}
        return self.post_json("/v1/chat/completions", body)

    def metrics(self) -> dict[str, float]:
        """C{/metrics} as C{{"name{labels}": value}}."""
        status, text = self.call("GET", "/metrics")
        if status != 200:
            raise LlamaHTTPError(status, text)
        return prometheus(str(text))

    def _ok(self, status: int, body: Any) -> Any:
        if not 200 <= status < 300:
            raise LlamaHTTPError(status, body)
        return body

    def _wait_healthy(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.timeout
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self._close()
                raise RuntimeError(f"llama.cpp exited with {code}; log:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"llama.cpp on {self.url} not healthy after {self.timeout} s; log:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def _close(self) -> None:
        if self.process is not None and self.process.stdin is not None:
            self.process.stdin.close()
