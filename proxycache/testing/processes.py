"""
Real child processes for tests and benchmarks, driven synchronously (so that
pytest-twisted tests can use them too): a llama.cpp server (L{LlamaProcess}),
the daemon, C{twistd -n proxycache} (L{ProxyProcess}), or any command
(L{ChildProcess}).

Each child runs in its own session and gets SIGTERM when its parent dies
(Linux C{PR_SET_PDEATHSIG}), so nothing outlives an interrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from proxycache.embedded import LlamaServerSpec, child_env, command
from proxycache.testing.http import call, free_port, http, prometheus

TWISTD = str(Path(sys.executable).with_name("twistd"))


class LlamaHTTPError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


def _die_with_parent() -> None:
    """
    Run in the child: SIGTERM it when its parent dies, even by SIGKILL (Linux prctl).
    Linux ties this to the spawning thread: a child started from a thread that then
    ends is stopped with it, so start children from a thread that outlives them.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ChildProcess:
    """
    A child process: C{argv()} run with C{child_env()} in C{cwd}, its output
    appended to C{output} (inherited when C{None}); C{log_path} is the log the
    helpers read (the output unless a subclass says otherwise).
    """

    process: subprocess.Popen[bytes] | None = None
    pass_fds: tuple[int, ...] = ()  # descriptors the child inherits (a listening socket)

    def __init__(
        self, argv: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self._argv = argv
        self._env = env
        self.log_path = Path(log_path)
        self.output: Path | None = self.log_path
        self.cwd = cwd

    def argv(self) -> list[str]:
        return self._argv

    def child_env(self) -> dict[str, str]:
        return dict(os.environ) if self._env is None else self._env

    def spawn(self) -> None:
        if self.output is None:
            self._popen(None)
            return
        self.output.parent.mkdir(parents=True, exist_ok=True)
        with open(self.output, "ab") as out:
            self._popen(out)

    def _popen(self, out: IO[bytes] | None) -> None:
        # stdin stays a pipe: proxycache.embedded's child exits when it closes
        self.process = subprocess.Popen(
            self.argv(), stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, env=self.child_env(),
            cwd=self.cwd, start_new_session=True, preexec_fn=_die_with_parent, pass_fds=self.pass_fds,
        )

    def wait_for(self, url: str, timeout: float, what: str, interval: float = 0.05) -> None:
        """Until C{GET url} answers 200; kills the child and raises if it exits or C{timeout} passes."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self._close()
                raise RuntimeError(f"{what} exited with {code}; log {self.log_path}:\n{self.log_tail()}")
            try:
                if http("GET", url, timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{what} not ready after {timeout} s; log {self.log_path}:\n{self.log_tail()}")
            time.sleep(interval)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal C{sig}, then SIGKILL after C{timeout} s; returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close()
        return self.process.returncode

    def kill(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._close()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(no log)"

    def rss_bytes(self) -> int | None:
        """Resident memory of the process, from /proc."""
        if self.process is None or not self.alive:
            return None
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def _close(self) -> None:
        if self.process is not None and self.process.stdin is not None:
            self.process.stdin.close()


class LlamaProcess(ChildProcess):
    """
    A llama.cpp server: the embedded xllamacpp one, or the binary named in the
    spec. C{start()} returns once C{/health} answers 200. C{argv}, if given,
    starts it instead of the spec's command line (it must agree with the spec
    on the port, save directory and key; the key is then not put in the
    environment).
    """

    def __init__(
        self, spec: LlamaServerSpec, log_path: Path, timeout: float = 120.0, argv: list[str] | None = None
    ) -> None:
        # a given argv says it all: the key is not added to the environment
        super().__init__(command(spec) if argv is None else argv, log_path, child_env(spec if argv is None else None))
        self.spec = spec
        self.timeout = timeout

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def save_dir(self) -> Path | None:
        return None if self.spec.save_dir is None else Path(self.spec.save_dir)

    def start(self) -> LlamaProcess:
        if self.save_dir is not None:
            self.save_dir.mkdir(parents=True, exist_ok=True)
        self.spawn()
        self.wait_for(self.url + "/health", self.timeout, f"llama.cpp on {self.url}")
        return self

    def restart(self) -> None:
        """Stop and start again on the same port and save_dir."""
        self.stop()
        self.start()

    def call(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> tuple[int, Any]:
        """C{(status, parsed JSON or text)}; HTTP errors are returned, not raised."""
        return call(method, self.url + path, body, timeout, self.spec.api_key)

    def get_json(self, path: str) -> Any:
        return self._ok(*self.call("GET", path))

    def post_json(self, path: str, body: Any, timeout: float = 600.0) -> Any:
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

    def prompt_tokens_total(self) -> int:
        """llama.cpp's C{llamacpp:prompt_tokens_total}: prompt tokens computed since it started."""
        return int(self.metrics().get("llamacpp:prompt_tokens_total", 0))

    def _ok(self, status: int, body: Any) -> Any:
        if not 200 <= status < 300:
            raise LlamaHTTPError(status, body)
        return body


class ProxyProcess(ChildProcess):
    """
    C{twistd -n proxycache} with the given options (C{None} leaves one out), on
    a free port, logging to C{workdir/proxy-<port>.log}. Its environment has no
    C{LLAMA_*} or C{PROXY*} variables but those in C{env}.

    C{listen_socket}: a bound, listening socket the daemon inherits as from
    systemd's socket activation (L{proxycache.testing.activation}) instead of
    listening itself; it stays open here across restarts of the daemon.
    """

    def __init__(
        self, workdir: Path, llama_url: str | None, env: dict[str, str] | None = None,
        listen_socket: socket.socket | None = None, **options: Any,
    ):
        self.workdir = workdir
        self.listen_socket = listen_socket
        self.port = free_port() if listen_socket is None else listen_socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        options = {"health_interval": "0.5", **options}
        listen = f"tcp:{self.port}:interface=127.0.0.1" if listen_socket is None else "systemd:domain=INET:index=0"
        self.options = {
            "listen": listen,
            "meta-dir": str(workdir / "meta"),
            **({"llama-url": llama_url} if llama_url else {}),
            **{k.replace("_", "-"): str(v) for k, v in options.items() if v is not None},
        }
        super().__init__([], workdir / f"proxy-{self.port}.log", cwd=workdir)
        self.output = None  # twistd writes log_path itself
        self.env = env or {}
        if listen_socket is not None:
            self.pass_fds = (listen_socket.fileno(),)

    def argv(self) -> list[str]:
        flags = [f"--{name}={value}" for name, value in self.options.items()]
        twistd = [TWISTD, "-n", "--pidfile=", f"--logfile={self.log_path}", "proxycache", *flags]
        if self.listen_socket is None:
            return twistd
        activate = [sys.executable, "-m", "proxycache.testing.activation", str(self.listen_socket.fileno())]
        return activate + twistd

    def start(self, wait_ready: bool = True, timeout: float = 60) -> ProxyProcess:
        """Start; return once C{/proxycache/health} answers (200, with C{wait_ready})."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.spawn()
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"proxycache exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                status, _, _ = http("GET", self.url + "/proxycache/health", timeout=2)
            except OSError:
                time.sleep(0.1)
                continue
            if not wait_ready or status == 200:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"proxycache not ready in {timeout}s:\n{self.log_tail()}")

    def child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_", "PROXY"))}
        return {**env, **self.env}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        return super().stop(sig, timeout)

    def status(self) -> dict[str, Any]:
        return http("GET", self.url + "/status")[2]

    def metrics(self) -> dict[str, float]:
        return prometheus(str(call("GET", self.url + "/metrics")[1]))

    def warnings(self) -> list[str]:
        """The proxy's warning and error log lines."""
        return [
            line for line in self.log_text().splitlines()
            if "#warn]" in line or "#error]" in line or "#critical]" in line
        ]

    def wait_for_restart_seen(self, restarts: int, timeout: float = 30.0) -> float:
        """Wait until the proxy noticed llama-server's restart and saw it up again; returns seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            backends = self.status().get("backends") or [{}]
            if backends[0].get("restarts", 0) >= restarts and backends[0].get("up"):
                return time.monotonic() - started
            time.sleep(0.1)
        raise RuntimeError(f"proxycache did not notice the llama-server restart within {timeout} s")

    def client(self, **kwargs: Any) -> Any:
        import openai

        return openai.OpenAI(
            base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs
        )


def send_raw_chat(sock: socket.socket, body: dict[str, Any] | bytes) -> socket.socket:
    """Write a chat request on a plain socket (to disconnect or stall at will); returns it."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(raw) + raw
    )
    return sock


def open_raw_chat(port: int, body: dict[str, Any] | bytes) -> socket.socket:
    return send_raw_chat(socket.create_connection(("127.0.0.1", port)), body)
