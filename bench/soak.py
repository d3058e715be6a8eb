"""
Soak: many clients for a while through proxycache, with disconnects and bad
input mixed in; then checks that nothing leaked (locks, queue, memory).

    python bench/soak.py --minutes 5 --clients 50 --slots 4

Prints one summary (requests by outcome, latency p50/p95/max, proxy RSS at
start and end, slots and queue at the end).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.processes import Proxy
from proxycache.embedded import LlamaServerSpec, free_port
from proxycache.testing import LlamaProcess, call
from proxycache.tinymodel import TINY, ensure_model


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def good_request(url: str, rng: random.Random, i: int) -> tuple[str, float]:
    stream = rng.random() < 0.5
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(rng.randint(5, 400)))
    body = {
        "messages": [{"role": "user", "content": f"#{i} {words}"}],
        "max_tokens": rng.randint(1, 32),
        "stream": stream,
    }
    started = time.monotonic()
    status, _ = call("POST", url + "/v1/chat/completions", body, timeout=300)
    return ("ok" if status == 200 else f"http {status}"), time.monotonic() - started


def bad_request(url: str, rng: random.Random) -> tuple[str, float]:
    started = time.monotonic()
    body = rng.choice(
        [
            {"messages": []},
            {"messages": "x"},
            {"messages": [{"role": "wizard"}]},
            {"n": 3, "messages": [{"role": "user", "content": "x"}]},
        ]
    )
    status, reply = call("POST", url + "/v1/chat/completions", body)
    ok = status == 400 and isinstance(reply, dict) and "error" in reply
    return ("bad input answered" if ok else f"bad input got {status}"), time.monotonic() - started


def disconnect(url: str, rng: random.Random) -> tuple[str, float]:
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(
        {"messages": [{"role": "user", "content": "long " * 50}], "max_tokens": 2000, "stream": True}
    ).encode()
    started = time.monotonic()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n"
            % len(body)
            + body
        )
        time.sleep(rng.random() * 0.5)
    return "disconnected", time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--slots", type=int, default=4)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="proxycache-soak-"))
    model = ensure_model(Path.home() / ".cache" / "proxycache" / "bench-models", TINY)
    llama = LlamaProcess(
        LlamaServerSpec(
            model=str(model),
            slots=args.slots,
            ctx_per_slot=4096,
            save_dir=str(workdir / "saves"),
            port=free_port(),
            threads=2,
        ),
        workdir / "llama.log",
    )
    proxy = Proxy(
        llama.url,
        workdir,
        slot_save_path=str(workdir / "saves"),
        min_prefix_chars=500,
        min_prefix_words=80,
        min_prefix_blocks=4,
        max_queue=1000,
    )
    outcomes: dict[str, int] = {}
    latencies: list[float] = []
    lock = threading.Lock()
    try:
        llama.start()
        proxy.start()
        rss_start = rss_kb(proxy.process.pid)
        deadline = time.monotonic() + args.minutes * 60

        def client(n: int) -> None:
            rng = random.Random(n)
            i = 0
            while time.monotonic() < deadline:
                roll = rng.random()
                kind = (
                    good_request(proxy.url, rng, i)
                    if roll < 0.9
                    else bad_request(proxy.url, rng)
                    if roll < 0.95
                    else disconnect(proxy.url, rng)
                )
                with lock:
                    outcomes[kind[0]] = outcomes.get(kind[0], 0) + 1
                    if kind[0] == "ok":
                        latencies.append(kind[1])
                i += 1

        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(client, range(args.clients)))
        time.sleep(2)
        status = proxy.status()
        rss_end = rss_kb(proxy.process.pid)
        latencies.sort()
        print(f"soak: {args.minutes:g} min, {args.clients} clients, {args.slots} slots, tiny model")
        print("outcomes:", json.dumps(dict(sorted(outcomes.items()))))
        if latencies:
            print(
                f"latency of good requests: p50 {statistics.median(latencies) * 1000:.0f} ms, "
                f"p95 {latencies[int(len(latencies) * 0.95) - 1] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms"
            )
        print(f"proxy RSS: {rss_start / 1024:.1f} MB at start, {rss_end / 1024:.1f} MB at end")
        print(
            f"at the end: busy slots {sum(s['busy'] for s in status['slots'])}, queue {status['queue_depth']}, "
            f"decisions {json.dumps(status['totals']['by_decision'])}, warnings {len(proxy.warnings())}"
        )
    finally:
        proxy.stop()
        llama.stop()


if __name__ == "__main__":
    main()
