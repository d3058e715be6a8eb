"""
The proxy's fixed overhead, two checkouts side by side in one run.

Three identical llama-servers (the bench model, 1 slot, --cache-ram 0): one
alone, one behind this checkout's proxy, one behind the proxy whose C{twistd}
is given (C{--before}: a venv installed from another checkout).  Rounds
alternate between the three in a rotating order, so that the machine's load
falls on all alike.

Two workloads: C{micro}, bench.micro's overhead request (the openai SDK, a
tiny chat, 1 token, the same every time: a cache hit), and C{siblings}, a 2,000-character context
and a new last question each time (8 tokens), as bench.siblings sends.
Reported per variant: the median wall time, the median time outside
llama.cpp's own prefill and decode, and each proxy's CPU time per request
(user + system, from /proc: what the machine's load does not blur).

    python -m bench.overhead_ab --before /tmp/before/.venv/bin/twistd --rounds 100
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.processes import Proxy, wait_until_quiet
from bench.siblings import DEFAULT_MODELS, LIMITS, ask, words
from proxycache.embedded import LlamaServerSpec, free_port
from proxycache.testing import LlamaProcess
from proxycache.testing.workload import make_client
from proxycache.tinymodel import PRESETS, ensure_model


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process C{pid} so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def micro_hit(client: Any) -> dict[str, Any]:
    """bench.micro.proxy_overhead's request (the openai SDK): its wall time, and the time outside llama.cpp."""
    started = time.perf_counter()
    reply = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Say hi."}], max_tokens=1, temperature=0,
    )
    seconds = time.perf_counter() - started
    timings = (reply.model_extra or {}).get("timings") or {}
    return {"seconds": seconds,
            "outside_s": seconds - ((timings.get("prompt_ms") or 0) + (timings.get("predicted_ms") or 0)) / 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="twistd of the other checkout's venv")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--quiet-wait", type=float, default=5.0)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    from proxycache.testing.llamabin import binary_path

    workdir = Path(tempfile.mkdtemp(prefix="overhead-ab-"))
    model = ensure_model(DEFAULT_MODELS, PRESETS["bench"])
    found = binary_path()
    llamas, proxies = {}, {}
    for name in ("alone", "before", "after"):
        saves = workdir / name / "saves"
        saves.mkdir(parents=True)
        spec = LlamaServerSpec(model=str(model), slots=1, ctx_per_slot=args.size + 1024, save_dir=str(saves),
                               port=free_port(), threads=2, cache_ram_mib=0,
                               binary=str(found) if found.exists() else None)
        llamas[name] = LlamaProcess(spec, workdir / name / "llama.log")
        if name != "alone":
            proxies[name] = Proxy(llamas[name].url, workdir / name / "proxy", slot_save_path=str(saves), **LIMITS)
    plain = proxies["before"].argv
    proxies["before"].argv = lambda: [args.before] + plain()[1:]  # type: ignore[method-assign]
    results: dict[str, Any] = {"rounds": args.rounds, "size_chars": args.size}
    try:
        for llama in llamas.values():
            llama.start()
        for proxy in proxies.values():
            proxy.start()
        urls = {"alone": llamas["alone"].url, "before": proxies["before"].url, "after": proxies["after"].url}
        rng = random.Random(7)
        context = "Repository context. " + words(rng, args.size)
        clients = {name: make_client(url + "/v1") for name, url in urls.items()}
        for workload in ("micro", "siblings"):
            wait_until_quiet(args.quiet_wait)
            times: dict[str, dict[str, list[float]]] = {k: {"seconds": [], "outside_s": []} for k in urls}
            cpu: dict[str, float] = {}
            for n in range(-3, args.rounds):  # three warm-up rounds
                if n == 0:
                    cpu = {name: cpu_seconds(proxy.pid) for name, proxy in proxies.items()}
                order = list(urls)
                order = order[n % 3:] + order[:n % 3]
                question = f"Question {n}: " + words(rng, 60)
                for name in order:
                    url = urls[name]
                    got = micro_hit(clients[name]) if workload == "micro" else ask(url, context, question, 8)
                    if n >= 0:
                        for key in ("seconds", "outside_s"):
                            times[name][key].append(got[key])
            results[workload] = {
                name: {"wall_p50_ms": round(statistics.median(t["seconds"]) * 1000, 2),
                       "outside_p50_ms": round(statistics.median(t["outside_s"]) * 1000, 2)}
                for name, t in times.items()
            }
            for name in ("before", "after"):
                row = results[workload][name]
                row["cpu_ms_per_request"] = round((cpu_seconds(proxies[name].pid) - cpu[name]) / args.rounds * 1000, 2)
                row["added_wall_p50_ms"] = round(row["wall_p50_ms"] - results[workload]["alone"]["wall_p50_ms"], 2)
                row["added_outside_p50_ms"] = round(
                    row["outside_p50_ms"] - results[workload]["alone"]["outside_p50_ms"], 2)
            print(workload, json.dumps(results[workload]), flush=True)
    finally:
        for process in [*proxies.values(), *llamas.values()]:
            process.stop()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
