"""
Run a llama.cpp server as a child process: either a real C{llama-server}
binary or, by default, this module itself around C{xllamacpp.Server}.

The child dies with its parent: it exits on SIGTERM/SIGINT and when its stdin
reaches end of file, which happens as soon as the parent goes away.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

SHUTDOWN_GRACE = 3.0  # seconds the embedded server has to finish in-flight work


@attrs.frozen(kw_only=True)
class LlamaServerSpec:
    """How to start one llama.cpp server; C{None} leaves llama.cpp's default."""

    model: str
    slots: int
    ctx_per_slot: int = 16384
    save_dir: str | None = None
    host: str = "127.0.0.1"
    port: int
    threads: int | None = None
    cache_ram_mib: int | None = None
    cache_idle_slots: bool | None = None
    kv_unified: bool | None = None
    slot_prompt_similarity: float | None = None
    metrics: bool = True
    api_key: str | None = None
    binary: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def n_threads(self) -> int:
        return self.threads or min(os.cpu_count() or 1, 4)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# llama-server reads --api-key from this variable; so does our xllamacpp child.
API_KEY_ENV = "LLAMA_API_KEY"


def command(spec: LlamaServerSpec) -> list[str]:
    """
    The argv that starts C{spec}. The API key is not in it (any local user can
    read a command line): L{child_env} passes it.
    """
    if spec.binary is None:
        public = attrs.evolve(spec, api_key=None)
        return [sys.executable, "-m", "proxycache.embedded", json.dumps(attrs.asdict(public))]
    argv = [
        spec.binary,
        "-m", spec.model,
        "-np", str(spec.slots),
        "-c", str(spec.slots * spec.ctx_per_slot),
        "--host", spec.host,
        "--port", str(spec.port),
        "-t", str(spec.n_threads),
        "--slots",
    ]
    if spec.save_dir is not None:
        argv += ["--slot-save-path", _with_slash(spec.save_dir)]
    if spec.metrics:
        argv.append("--metrics")
    if spec.cache_ram_mib is not None:
        argv += ["--cache-ram", str(spec.cache_ram_mib)]
    if spec.cache_idle_slots is not None:
        argv.append("--cache-idle-slots" if spec.cache_idle_slots else "--no-cache-idle-slots")
    if spec.kv_unified is not None:
        argv.append("--kv-unified" if spec.kv_unified else "--no-kv-unified")
    if spec.slot_prompt_similarity is not None:
        argv += ["--slot-prompt-similarity", str(spec.slot_prompt_similarity)]
    return argv


def recommended_argv(
    *,
    model: str,
    slots: int,
    ctx_per_slot: int,
    save_dir: str,
    api_key_file: str,
    port: int = 8080,
    binary: str = "llama-server",
) -> list[str]:
    """
    The C{llama-server} command line proxycache recommends (README,
    C{contrib/llama-server.service}): an explicit C{-np} (per-slot KV), a slot
    save directory, no RAM prompt cache, metrics and slots endpoints, loopback
    only, and an API key read from a file.
    """
    return [
        binary,
        "-m", model,
        "-np", str(slots),
        "-c", str(slots * ctx_per_slot),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--slots",
        "--metrics",
        "--slot-save-path", _with_slash(save_dir),
        "--cache-ram", "0",
        "--api-key-file", api_key_file,
    ]


def child_env(spec: LlamaServerSpec | None = None) -> dict[str, str]:
    """
    Our environment, with this package importable by C{python -m}, and
    C{spec}'s API key (or none, whatever ours says) in L{API_KEY_ENV}.
    """
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.pop(API_KEY_ENV, None)
    if spec is not None and spec.api_key is not None:
        env[API_KEY_ENV] = spec.api_key
    return env


def _with_slash(directory: str) -> str:
    # llama.cpp concatenates slot_save_path and the filename.
    return directory if directory.endswith("/") else directory + "/"


def _params(spec: LlamaServerSpec) -> Any:
    import xllamacpp

    p = xllamacpp.CommonParams()
    p.model.path = spec.model
    p.n_parallel = spec.slots
    p.n_ctx = spec.slots * spec.ctx_per_slot
    p.hostnames = [spec.host]
    p.port = spec.port
    p.cpuparams.n_threads = spec.n_threads
    p.cpuparams_batch.n_threads = spec.n_threads
    p.endpoint_slots = True
    p.endpoint_metrics = spec.metrics
    if spec.save_dir is not None:
        os.makedirs(spec.save_dir, exist_ok=True)
        p.slot_save_path = _with_slash(spec.save_dir)
    if spec.cache_ram_mib is not None:
        p.cache_ram_mib = spec.cache_ram_mib
    if spec.cache_idle_slots is not None:
        p.cache_idle_slots = spec.cache_idle_slots
    if spec.kv_unified is not None:
        p.kv_unified = spec.kv_unified
    if spec.slot_prompt_similarity is not None:
        p.slot_prompt_similarity = spec.slot_prompt_similarity
    if spec.api_key is not None:
        p.api_keys = [spec.api_key]
    return p


def main(argv: list[str] | None = None) -> None:
    """
    Serve the spec given as JSON in C{argv[0]} with xllamacpp until SIGTERM,
    SIGINT or end of stdin.
    """
    import xllamacpp

    spec = LlamaServerSpec(**json.loads((sys.argv[1:] if argv is None else argv)[0]))
    spec = attrs.evolve(spec, api_key=os.environ.pop(API_KEY_ENV, None) or spec.api_key)
    # Before the server starts: it answers /health before its constructor returns, and a SIGTERM
    # sent then must stop it cleanly, not kill it with Python's default action.
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server = xllamacpp.Server(_params(spec))  # returns once the model is loaded
    print(f"listening {server.listening_address}", flush=True)

    def watch_stdin() -> None:
        sys.stdin.buffer.read()  # returns at end of file: our parent is gone
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    while not stop.wait(0.2):  # a timeout, so a signal caught by a native thread is seen
        pass

    # ~Server waits for in-flight HTTP requests (until their clients hang up),
    # holding the GIL: only a C-level watchdog can cut that short.
    faulthandler.dump_traceback_later(SHUTDOWN_GRACE, exit=True, file=open(os.devnull, "w"))
    del server
    sys.stdout.flush()
    os._exit(0)


class LlamaServerError(Exception):
    """The llama.cpp child did not come up."""


class _Child(ProcessProtocol):
    def __init__(self, owner: EmbeddedLlamaService) -> None:
        self.owner = owner
        self.buffers: dict[int, bytes] = {}

    def childDataReceived(self, fd: int, data: bytes) -> None:
        *lines, self.buffers[fd] = (self.buffers.get(fd, b"") + data).split(b"\n")
        for line in lines:
            self.owner._output(fd, line.decode("utf-8", "replace").rstrip())

    def processEnded(self, reason: Failure) -> None:
        self.owner._ended(reason)


class EmbeddedLlamaService(Service):
    """A llama.cpp server child process, stopped with this service."""

    log = Logger()
    kill_after = 10.0

    def __init__(self, spec: LlamaServerSpec, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.spec = spec
        self.reactor = reactor
        self.transport: Any = None
        self.exit: Failure | None = None
        self._stopping = False
        self._waiters: list[Deferred[None]] = []

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def pid(self) -> int | None:
        return None if self.transport is None else self.transport.pid

    def startService(self) -> None:
        super().startService()
        argv = command(self.spec)
        self.log.info("starting llama.cpp on {url}: {argv}", url=self.url, argv=" ".join(argv))
        self.exit = None
        self._stopping = False
        self.transport = self.reactor.spawnProcess(
            _Child(self), argv[0], argv, env=child_env(self.spec), childFDs={0: "w", 1: "r", 2: "r"}
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self.transport is None or self.exit is not None:
            return succeed(None)
        self._stopping = True
        done = self._whenEnded()
        try:
            self.transport.signalProcess("TERM")
        except ProcessExitedAlready:
            return done
        self.transport.closeStdin()
        killer = self.reactor.callLater(self.kill_after, self._kill)
        done.addBoth(lambda result: (killer.active() and killer.cancel(), result)[1])
        return done

    def whenReady(self, timeout: float = 60.0, interval: float = 0.1) -> Deferred[None]:
        """Fires once C{GET /health} answers 200; fails on timeout or exit."""
        return Deferred.fromCoroutine(self._ready(timeout, interval))

    async def _ready(self, timeout: float, interval: float) -> None:
        import treq
        from twisted.internet.task import deferLater
        from twisted.web.client import HTTPConnectionPool

        pool = HTTPConnectionPool(self.reactor, persistent=False)
        pool._factory.noisy = False  # no "Starting factory" line per poll
        deadline = self.reactor.seconds() + timeout
        while True:
            if self.exit is not None:
                raise LlamaServerError(f"llama.cpp on {self.url} exited: {self.exit.value}")
            try:
                response = await treq.get(
                    self.url + "/health", reactor=self.reactor, pool=pool, timeout=2
                )
                await response.content()
                if response.code == 200:
                    return
            except Exception:
                pass  # not listening yet
            if self.reactor.seconds() >= deadline:
                raise LlamaServerError(f"llama.cpp on {self.url} not ready after {timeout} s")
            await deferLater(self.reactor, interval, lambda: None)

    def _whenEnded(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def _kill(self) -> None:
        self.log.warn("llama.cpp on {url} ignored SIGTERM; killing it", url=self.url)
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass

    def _output(self, fd: int, line: str) -> None:
        if not line:
            return
        level = line.split(None, 2)[1:2]  # llama.cpp: "<time> <I|W|E> <text>"
        if fd == 1:
            self.log.info("llama.cpp: {line}", line=line)
        elif level == ["E"]:
            self.log.error("llama.cpp: {line}", line=line)
        elif level == ["W"]:
            self.log.warn("llama.cpp: {line}", line=line)
        # llama.cpp's info lines (a dozen per request) are left out of the daemon's log.

    def _ended(self, reason: Failure) -> None:
        self.exit = reason
        if self._stopping:
            self.log.info("llama.cpp on {url} stopped: {reason}", url=self.url, reason=reason.value)
        elif reason.check(ProcessDone):
            self.log.error("llama.cpp on {url} exited unexpectedly", url=self.url)
        else:
            self.log.error(
                "llama.cpp on {url} died unexpectedly: {reason}", url=self.url, reason=reason.value
            )
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


if __name__ == "__main__":
    main()
