"""
Where the proxy's own time goes on a cache hit (issue: per-request overhead).

One llama-server (the bench model, 1 slot, --cache-ram 0) behind
C{twistd --profile} proxycache; a 2,000-character context computed once, then
C{--requests} siblings (the same context, a new last question, 8 tokens), one
at a time.  The proxy's cProfile stats (the reactor thread) are printed, top
functions by own and cumulative time.  C{--alone} also times each question
sent straight to llama-server; C{--strace FILE} records the proxy's system
calls instead (the time between a request's bytes arriving and leaving).

    python -m bench.hit_profile --requests 200 --out /tmp/hit.prof
    python -m bench.hit_profile --requests 100 --no-profile --alone
"""

from __future__ import annotations

import argparse
import pstats
import random
import signal
import tempfile
import time
from pathlib import Path

from bench.processes import Proxy
from bench.siblings import DEFAULT_MODELS, LIMITS, ask, words
from proxycache.embedded import LlamaServerSpec, free_port
from proxycache.testing import LlamaProcess
from proxycache.tinymodel import PRESETS, ensure_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--out", default=None, help="cProfile stats file (default: a temp file)")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--alone", action="store_true", help="also time each request sent straight to llama-server")
    parser.add_argument("--no-profile", action="store_true", help="run the proxy without cProfile (timings only)")
    parser.add_argument("--strace", default=None, help="also strace the proxy's syscalls into this file (no cProfile)")
    args = parser.parse_args()
    from proxycache.testing.llamabin import binary_path

    workdir = Path(tempfile.mkdtemp(prefix="hit-profile-"))
    out = Path(args.out or workdir / "proxy.prof")
    model = ensure_model(DEFAULT_MODELS, PRESETS["bench"])
    (workdir / "saves").mkdir()
    found = binary_path()
    spec = LlamaServerSpec(model=str(model), slots=1, ctx_per_slot=args.size + 1024, save_dir=str(workdir / "saves"),
                           port=free_port(), threads=2, cache_ram_mib=0, binary=str(found) if found.exists() else None)
    llama = LlamaProcess(spec, workdir / "llama.log").start()
    proxy = Proxy(llama.url, workdir / "proxy", slot_save_path=str(workdir / "saves"), **LIMITS)
    if args.strace:
        args.no_profile = True
    if not args.no_profile:
        plain = proxy.argv
        proxy.argv = lambda: plain()[:1] + [  # type: ignore[method-assign]
            f"--profile={out}", "--profiler=cprofile", "--savestats"] + plain()[1:]
    proxy.start()
    try:
        rng = random.Random(1)
        context = "Repository context. " + words(rng, args.size)
        ask(proxy.url, context, "Summarize the repository. " + words(rng, 60), 8)
        tracer = None
        if args.strace:
            import subprocess

            tracer = subprocess.Popen(["strace", "-f", "-tt", "-T", "-o", args.strace, "-p", str(proxy.pid)])
            time.sleep(1)
        outside, alone = [], []
        started = time.perf_counter()
        for n in range(args.requests):
            got = ask(proxy.url, context, f"Question {n}: " + words(rng, 60), 8)
            outside.append(got["outside_s"])
            if args.alone:  # the same kind of request straight to llama-server (its slot holds the context too)
                alone.append(ask(llama.url, context, f"Question {n}: " + words(rng, 60), 8)["outside_s"])
        wall = time.perf_counter() - started
        if alone:
            alone.sort()
            print(f"alone: outside llama.cpp p50 {alone[len(alone) // 2] * 1000:.1f} ms")
        if tracer is not None:
            tracer.terminate()
            tracer.wait()
        outside.sort()
        print(f"{args.requests} siblings in {wall:.2f} s; outside llama.cpp p50 {outside[len(outside) // 2] * 1000:.1f} ms")
    finally:
        proxy.stop(signal.SIGINT)
        llama.stop()
    if args.no_profile:
        return
    stats = pstats.Stats(str(out))
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
