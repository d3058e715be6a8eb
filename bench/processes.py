"""
The benchmark's child processes: a llama.cpp server and C{twistd -n proxycache}.

Each runs in its own session (process group); L{Child.stop} signals the whole
group, so nothing outlives the benchmark, also when it is interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from proxycache.embedded import LlamaServerSpec, child_env, command, free_port

TWISTD = str(Path(sys.executable).with_name("twistd"))


def call(
    method: str, url: str, body: Any = None, timeout: float = 60.0, api_key: str | None = None
) -> tuple[int, Any]:
    """(status, parsed JSON or text); HTTP errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def prometheus(text: str) -> dict[str, float]:
    """Prometheus text format as C{{"name{labels}": value}}."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                values[name.strip()] = float(value)
            except ValueError:
                pass
    return values


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds every process on the machine used, CPU seconds we and our reaped children used)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    machine = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return machine, own.user + own.system + own.children_user + own.children_system


def wait_until_quiet(max_wait: float, busy_below: float = 0.15) -> float:
    """
    Wait until other processes leave the CPUs nearly idle (two 1-s samples
    under C{busy_below} of all cores), at most C{max_wait} s; returns the wait.
    """
    started = time.monotonic()
    quiet = 0
    cores = os.cpu_count() or 1
    while time.monotonic() - started < max_wait and quiet < 2:
        before, _ = cpu_seconds()
        time.sleep(1.0)
        after, _ = cpu_seconds()
        quiet = quiet + 1 if (after - before) / cores < busy_below else 0
    return time.monotonic() - started


def _die_with_parent() -> None:
    """Run in the child: SIGTERM it when the benchmark dies, even by SIGKILL (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Child:
    """A child process in its own process group, logging to a file."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen | None = None

    def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # stdin is a pipe: the embedded llama.cpp server exits when it closes.
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, start_new_session=True, preexec_fn=_die_with_parent,
            )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the group, SIGKILL after C{timeout}."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            self._signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(process, signal.SIGKILL)
                process.wait()
        else:
            self._signal_group(process, signal.SIGKILL)  # leftovers of a dead leader
        if process.stdin is not None:
            process.stdin.close()

    @staticmethod
    def _signal_group(process: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass

    def rss_bytes(self) -> int | None:
        """Resident memory of the process (the llama.cpp server runs in it), from /proc."""
        if not self.alive:
            return None
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def wait_for(self, url: str, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                raise RuntimeError(f"{what} exited; log {self.log_path}:\n" + "\n".join(self.log_lines()[-30:]))
            try:
                status, _ = call("GET", url, timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready after {timeout} s; log {self.log_path}")
            time.sleep(0.1)


class Llama(Child):
    """A llama.cpp server (xllamacpp, or the binary named in the spec)."""

    def __init__(self, spec: LlamaServerSpec, log_path: Path) -> None:
        super().__init__(command(spec), log_path, child_env())
        self.spec = spec
        if spec.save_dir is not None:
            Path(spec.save_dir).mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return self.spec.url

    def start(self, timeout: float = 120.0) -> "Llama":
        self.spawn()
        self.wait_for(self.url + "/health", timeout, f"llama.cpp on {self.url}")
        return self

    def restart(self) -> None:
        self.stop()
        self.start()

    def post(self, path: str, body: Any, timeout: float = 600.0) -> Any:
        status, reply = call("POST", self.url + path, body, timeout)
        if status != 200:
            raise RuntimeError(f"POST {path}: HTTP {status}: {reply}")
        return reply

    def prompt_tokens_total(self) -> int:
        """llama.cpp's C{llamacpp:prompt_tokens_total}: prompt tokens computed since it started."""
        status, text = call("GET", self.url + "/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics: HTTP {status} (started without --metrics?)")
        return int(prometheus(str(text)).get("llamacpp:prompt_tokens_total", 0))


class Proxy(Child):
    """C{twistd -n proxycache} in front of one llama.cpp server."""

    def __init__(self, llama_url: str, workdir: Path, **options: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        flags = {
            "listen": f"tcp:{self.port}:interface=127.0.0.1",
            "llama-url": llama_url,
            "meta-dir": str(workdir / "meta"),
            **{k.replace("_", "-"): v for k, v in options.items()},
        }
        argv = [TWISTD, "-n", "--pidfile=", f"--logfile={workdir / 'proxy.log'}", "proxycache"]
        argv += [f"--{name}={value}" for name, value in flags.items() if value is not None]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_", "PROXY"))}
        super().__init__(argv, workdir / "proxy.out", env)
        self.log_path_twistd = workdir / "proxy.log"

    def start(self, timeout: float = 60.0) -> "Proxy":
        self.spawn()
        self.wait_for(self.url + "/proxycache/health", timeout, "proxycache")
        return self

    def status(self) -> dict[str, Any]:
        return call("GET", self.url + "/status")[1]

    def metrics(self) -> dict[str, float]:
        return prometheus(str(call("GET", self.url + "/metrics")[1]))

    def wait_for_restart_seen(self, restarts: int, timeout: float = 30.0) -> float:
        """Wait until the proxy noticed llama-server's restart and saw it up again; returns seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            backends = self.status().get("backends") or [{}]
            if backends[0].get("restarts", 0) >= restarts and backends[0].get("up"):
                return time.monotonic() - started
            time.sleep(0.1)
        raise RuntimeError(f"proxycache did not notice the llama-server restart within {timeout} s")

    def warnings(self) -> list[str]:
        """The proxy's warning and error log lines."""
        try:
            lines = self.log_path_twistd.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [line for line in lines if "#warn]" in line or "#error]" in line or "#critical]" in line]

    def log_text(self) -> str:
        try:
            return self.log_path_twistd.read_text(errors="replace")
        except OSError:
            return ""
