"""
The proxy's own capacity, in front of a backend that answers at once
(L{bench.fast_backend}): requests per second, latency, concurrent streams,
and the proxy's CPU time per request.  Also the same load sent to the
backend directly, so the load generator is seen not to be the limit.

    python -m bench.capacity --seconds 20 --clients 32 --streams 200

Prints one JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.processes import Proxy
from proxycache.testing import ChildProcess, free_port

# Small requests (below the default 2000-char threshold): the relay and the scheduler, no saves.
BODY = {"messages": [{"role": "user", "content": "capacity " * 100}], "max_tokens": 8}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process C{pid}."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(url: str, clients: int, seconds: float, stream: bool) -> dict[str, Any]:
    """C{clients} concurrent keep-alive loops for C{seconds}, run by a Twisted client in a child process."""
    script = Path(__file__).with_name("_load_client.py")
    out = subprocess.run(
        [sys.executable, str(script), url, str(clients), str(seconds), json.dumps({**BODY, "stream": stream})],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout)


def measure(name: str, url: str, pid: int, clients: int, seconds: float, stream: bool) -> dict[str, Any]:
    before = cpu_seconds(pid)
    result = load(url, clients, seconds, stream)
    used = cpu_seconds(pid) - before
    done = result["ok"]
    return {
        "target": name, "stream": stream, "clients": clients, "requests": done, "errors": result["errors"],
        "requests_per_second": round(done / result["seconds"], 1),
        "latency_ms_p50": round(statistics.median(result["latencies"]) * 1000, 2) if done else None,
        "latency_ms_p99": round(sorted(result["latencies"])[int(0.99 * (done - 1))] * 1000, 2) if done else None,
        "cpu_ms_per_request": round(1000 * used / done, 3) if done else None,
        "cpu_share_of_one_core": round(used / result["seconds"], 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--streams", type=int, default=200, help="concurrent streaming requests")
    parser.add_argument("--slots", type=int, default=256)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="proxycache-capacity-") as tmp:
        work = Path(tmp)
        port = free_port()
        backend = ChildProcess([sys.executable, "-m", "bench.fast_backend", str(port), str(args.slots), "64"],
                               work / "backend.log")
        backend.spawn()
        backend_url = f"http://127.0.0.1:{port}"
        backend.wait_for(backend_url + "/props", 30, "fast backend")
        proxy = Proxy(backend_url, work, max_queue=100000).start()
        try:
            assert backend.process is not None and proxy.process is not None
            rows = [
                measure("backend directly", backend_url, backend.process.pid, args.clients, args.seconds, False),
                measure("through proxycache", proxy.url, proxy.process.pid, args.clients, args.seconds, False),
                measure("through proxycache", proxy.url, proxy.process.pid, args.streams, args.seconds, True),
            ]
        finally:
            proxy.stop()
            backend.stop()
    print(json.dumps({"machine_cores": os.cpu_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
