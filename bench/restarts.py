"""
Requests through restarts: OpenAI-SDK clients (kept-alive connections, no
retries) send chat requests without a pause while the proxy is restarted
(SIGTERM, then started again) and while llama-server is restarted (same
weights); every request's outcome is kept.

    python -m bench.restarts --restarts 3 --clients 2 --between 4

Runs the proxy restarts twice, listening itself (C{--listen tcp:...}) and
with the socket handed over as systemd's socket activation does
(L{proxycache.testing.activation}), then once more with SIGKILL instead of
SIGTERM (socket activation), then the llama-server restarts. Prints one
JSON summary: answered and failed requests per run, the failures by message,
and how many of them were sent before a process exited and ended after it was
signalled (for a SIGKILL: in flight when it died).
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from proxycache.embedded import LlamaServerSpec, free_port
from proxycache.testing import LlamaProcess, ProxyProcess
from proxycache.tinymodel import TINY, ensure_model

MESSAGES = [{"role": "user", "content": "Say something about the weather in Lisbon today, please."}]


class Client(threading.Thread):
    def __init__(self, proxy: ProxyProcess) -> None:
        super().__init__(daemon=True)
        self.sdk = proxy.client(timeout=120)  # max_retries=0: every failure counts
        self.stopping = threading.Event()
        self.outcomes: list[tuple[float, float, str | None]] = []  # (sent, ended, error or None)

    def run(self) -> None:
        while not self.stopping.is_set():
            sent = time.monotonic()
            try:
                self.sdk.chat.completions.create(model="any", messages=MESSAGES, max_tokens=2, temperature=0)
                error = None
            except Exception as e:
                error = f"{type(e).__name__}: {str(e)[:80]}"
            self.outcomes.append((sent, time.monotonic(), error))


def under_load(proxy: ProxyProcess, clients: int, restarts: int, between: float,
               restart: Callable[[], None]) -> list[tuple[float, float, str | None]]:
    """C{restart()} C{restarts} times, C{between} seconds apart, while C{clients} send."""
    senders = [Client(proxy) for _ in range(clients)]
    for sender in senders:
        sender.start()
    time.sleep(between)
    for _ in range(restarts):
        restart()
        time.sleep(between)
    for sender in senders:
        sender.stopping.set()
    for sender in senders:
        sender.join(180)
    return [outcome for sender in senders for outcome in sender.outcomes]


def summary(name: str, outcomes: list[tuple[float, float, str | None]],
            stops: list[tuple[float, float]]) -> dict[str, Any]:
    """C{stops}: when each stop began and when the process had exited."""
    failed = [(sent, ended, error) for sent, ended, error in outcomes if error is not None]
    in_flight = [1 for sent, ended, _ in failed if any(sent < gone and ended > began for began, gone in stops)]
    return {
        "run": name,
        "answered": len(outcomes) - len(failed),
        "failed": len(failed),
        "failed_while_stopping": len(in_flight),  # sent before the exit, ended after the signal
        "failures": dict(collections.Counter(error for _, _, error in failed).most_common(5)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--between", type=float, default=4.0, help="seconds of load before, between and after")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = ensure_model(Path.home() / ".cache" / "proxycache" / "test-models", TINY)
        llama = LlamaProcess(
            LlamaServerSpec(model=str(model), slots=2, ctx_per_slot=4096, save_dir=str(work / "saves"),
                            port=free_port(), threads=2),
            work / "llama.log",
        ).start()
        try:
            for activated, sig in ((False, signal.SIGTERM), (True, signal.SIGTERM), (True, signal.SIGKILL)):
                sock = None
                if activated:
                    sock = socket.socket()
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(("127.0.0.1", 0))
                    sock.listen(4096)
                proxy = ProxyProcess(work / f"proxy-{activated}", llama.url, listen_socket=sock, health_interval=5)
                proxy.start()

                stops: list[tuple[float, float]] = []

                def restart_proxy(
                    proxy: ProxyProcess = proxy, sig: int = sig, stops: list[tuple[float, float]] = stops
                ) -> None:
                    began = time.monotonic()
                    proxy.stop(sig)
                    stops.append((began, time.monotonic()))
                    proxy.spawn()

                try:
                    outcomes = under_load(proxy, args.clients, args.restarts, args.between, restart_proxy)
                finally:
                    proxy.stop()
                    if sock is not None:
                        sock.close()
                how = ("socket activation" if activated else "--listen tcp") + (", SIGKILL" if sig == signal.SIGKILL else "")
                results.append(summary("proxy restarts, " + how, outcomes, stops))

            proxy = ProxyProcess(work / "proxy-llama", llama.url, health_interval=5).start()
            stops = []

            def restart_llama() -> None:
                began = time.monotonic()
                llama.stop()
                stops.append((began, time.monotonic()))
                llama.start()

            try:
                outcomes = under_load(proxy, args.clients, args.restarts, args.between, restart_llama)
            finally:
                proxy.stop()
            results.append(summary("llama-server restarts", outcomes, stops))
        finally:
            llama.stop()
    print(json.dumps({"restarts": args.restarts, "clients": args.clients, "results": results}, indent=2))


if __name__ == "__main__":
    main()
