"""
proxycache in front of 1, 2 and 3 llama.cpp backends, and a backend killed half-way (issue 16).

One command plays the same IDE/team workload (proxycache/testing/workload.py: N users, each with a
private context of a few thousand tokens, a few turns each) through proxycache in front of:

  one       1 backend  x 4 slots, --threads 1             (same per-backend CPU as the others)
  one-t2    1 backend  x 4 slots, all cores               (the whole machine in one llama-server)
  two       2 backends x 2 slots, --threads 1 each        (same total slots as `one`)
  three     3 backends x 2 slots, --threads 1 each        (more total slots; 3 threads on the cores)
  failover  2 backends x 2 slots, --threads 1 each, one backend SIGKILLed after half the turns

Every llama-server runs the same generated model with --cache-ram 0 and ONE shared --slot-save-path;
proxycache gets that directory as its --slot-save-path, so a backend can restore a cache another one
saved.  Per configuration it reports backend prefill (the rise of llama.cpp's
llamacpp:prompt_tokens_total summed over the backends) against the oracle, later-turn TTFT, which
backend served each request (X-Proxycache-Backend, and /status backends[].requests),
disk.cross_backend_restores, and from /status sampled every --sample-interval s: how busy each
backend was and whether requests queued while a backend had an idle slot.

    python -m bench.backends                                   # ~15 min on 2 cores
    python -m bench.backends --configs two,failover --users 4 --turns 3 --context-tokens 3000
    python -m bench.backends --model tiny ...                  # fast, for a smoke run

Writes docs/benchmarks/backends.md and backends.json (--out to choose); the hand-written reading of the
figures at the end of backends.md (after NOTES_MARKER) is kept when the bench rewrites the file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import attrs

from bench.backends_report import dump, summarize, write_report
from bench.processes import Proxy, cpu_seconds, foreign_cpu_share, wait_until_quiet
from bench.run import DEFAULT_MODELS, log, machine, proxycache_version
from proxycache.embedded import LlamaServerSpec
from proxycache.testing import LlamaProcess, free_port, http
from proxycache.testing.workload import Record, Workload, run
from proxycache.tinymodel import BENCH, TINY, ensure_model

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "docs" / "benchmarks"


@attrs.frozen
class Layout:
    key: str
    title: str
    backends: int
    slots: int  # per backend
    threads: int  # per backend
    kill: bool = False  # SIGKILL one backend after half the turns


def layouts(threads: int, all_threads: int) -> dict[str, Layout]:
    return {
        "one": Layout("one", f"1 backend x 4 slots, {threads} thread", 1, 4, threads),
        "one-t2": Layout("one-t2", f"1 backend x 4 slots, {all_threads} threads", 1, 4, all_threads),
        "two": Layout("two", f"2 backends x 2 slots, {threads} thread each", 2, 2, threads),
        "three": Layout("three", f"3 backends x 2 slots, {threads} thread each", 3, 2, threads),
        "failover": Layout(
            "failover", f"2 backends x 2 slots, {threads} thread each, one killed half-way", 2, 2, threads, kill=True
        ),
    }


# -- the workload, with the backend of each request ------------------------------------


@attrs.frozen
class Served:
    record: Record
    backend: int | None  # X-Proxycache-Backend: the index of the --llama-url that served it


def play(
    base_url: str,
    workload: Workload,
    between_turns: Callable[[int], None] | None = None,
    progress: Callable[[Served], None] | None = None,
    t0: float | None = None,
) -> list[Served]:
    """L{proxycache.testing.workload.run}, keeping the X-Proxycache-Backend header of each request."""
    served: list[Served] = []

    def keep(record: Record, headers: dict[str, str] | None) -> None:
        number = (headers or {}).get("x-proxycache-backend")
        item = Served(record, int(number) if number is not None and number.isdigit() else None)
        served.append(item)
        if progress is not None:
            progress(item)

    run(base_url, workload, between_turns, replies=keep, t0=t0)
    return served


class Sampler(threading.Thread):
    """C{/status} every C{interval} s: queue depth and each backend's up/slots/busy."""

    def __init__(self, url: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.interval = interval
        self.samples: list[list[Any]] = []
        self.urls: list[str] = []  # the backends' order in the samples
        self.stopping = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                status, _, body = http("GET", self.url + "/status", timeout=5)
            except OSError:
                continue
            if status != 200 or not isinstance(body, dict):
                continue
            backends = body.get("backends", [])
            if not self.urls:
                self.urls = [b["url"] for b in backends]
            # compact: [t, queue depth, [[up, slots, busy] for each backend, in self.urls order]]
            by_url = {b["url"]: b for b in backends}
            self.samples.append(
                [
                    round(time.perf_counter() - self.t0, 2),
                    body.get("queue_depth", 0),
                    [
                        [int(bool(b.get("up"))), b.get("slots", 0), b.get("busy", 0)] if b else [0, 0, 0]
                        for b in (by_url.get(url) for url in self.urls)
                    ],
                ]
            )

    def stop(self) -> list[list[Any]]:
        self.stopping.set()
        self.join(10)
        return self.samples


# -- one configuration ---------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Setup:
    workload: Workload
    model: Path
    workdir: Path
    quiet_wait: float
    sample_interval: float
    kill_backend: int
    kill_delay: float
    proxy_options: dict[str, str]

    @property
    def ctx_per_slot(self) -> int:
        return max(4096, math.ceil(self.workload.final_tokens() * 1.2 / 1024) * 1024)


def run_layout(setup: Setup, layout: Layout) -> dict[str, Any]:
    """Start the backends and the proxy of C{layout}, play the workload, stop them; everything measured."""
    waited = wait_until_quiet(setup.quiet_wait)
    log(f"{layout.key}: {layout.title} (waited {waited:.0f} s for idle CPUs)")
    workdir = setup.workdir / layout.key
    saves = workdir / "saves"  # ONE directory for every backend
    saves.mkdir(parents=True, exist_ok=True)
    llamas = [
        LlamaProcess(
            LlamaServerSpec(
                model=str(setup.model),
                slots=layout.slots,
                ctx_per_slot=setup.ctx_per_slot,
                save_dir=str(saves),
                port=free_port(),
                threads=layout.threads,
                cache_ram_mib=0,
            ),
            workdir / f"llama-{i}.log",
        )
        for i in range(layout.backends)
    ]
    result: dict[str, Any] = {
        "layout": attrs.asdict(layout),
        "quiet_wait_s": waited,
        "flags": f"-np {layout.slots} -t {layout.threads} --cache-ram 0 --slot-save-path SHARED",
    }
    proxy = None
    sampler = None
    machine_cpu, own_cpu = cpu_seconds()
    clock = time.perf_counter()
    try:
        for llama in llamas:
            llama.start()
        urls = [llama.url for llama in llamas]
        proxy = Proxy(",".join(urls), workdir / "proxy", slot_save_path=str(saves), **setup.proxy_options).start()
        _wait(lambda: len(proxy.status()["slots"]) == layout.backends * layout.slots, 60, "proxy to see every slot")
        result["backend_urls"] = urls
        result["status_backend_order"] = [b["url"] for b in proxy.status()["backends"]]

        victim = min(setup.kill_backend, layout.backends - 1)
        kill_after = max(0, setup.workload.turns // 2 - 1)
        prompt_tokens_at_kill: dict[int, int] = {}

        def between_turns(turn: int) -> None:
            if layout.kill and turn == kill_after:
                if setup.kill_delay:
                    time.sleep(setup.kill_delay)
                prompt_tokens_at_kill[victim] = llamas[victim].prompt_tokens_total()
                log(f"  killing backend {victim} ({llamas[victim].url}) after turn {turn}")
                result["killed"] = {
                    "backend": victim,
                    "url": llamas[victim].url,
                    "after_turn": turn,
                    "at_s": round(time.perf_counter() - sampler.t0, 2),
                    "at_workload_s": round(time.perf_counter() - started, 3),
                    "disk_before": proxy.status()["disk"],
                }
                llamas[victim].kill()

        sampler = Sampler(proxy.url, setup.sample_interval)
        sampler.start()
        result["load_before"] = os.getloadavg()[0]
        started = time.perf_counter()
        served = play(proxy.url + "/v1", setup.workload, between_turns, progress=_progress, t0=started)
        result["wall_seconds"] = time.perf_counter() - started
        result["load_after"] = os.getloadavg()[0]
        time.sleep(setup.sample_interval * 2)
        result["samples"] = sampler.stop()
        result["sample_urls"] = sampler.urls

        per_backend = []
        for i, llama in enumerate(llamas):
            tokens = prompt_tokens_at_kill[i] if i in prompt_tokens_at_kill else llama.prompt_tokens_total()
            per_backend.append(
                {"url": llama.url, "prompt_tokens": tokens, "rss_bytes": llama.rss_bytes(), "alive": llama.alive}
            )
        result["per_backend"] = per_backend
        result["prefill_tokens"] = sum(b["prompt_tokens"] for b in per_backend)
        status = proxy.status()
        result["status"] = {"backends": status["backends"], "disk": status["disk"], "totals": status["totals"]}
        result["records"] = [attrs.asdict(s.record) | {"backend": s.backend} for s in served]
        proxy.stop()
        result["proxy_warnings"] = proxy.warnings()
        proxy = None
        log(f"  done in {result['wall_seconds']:.1f} s, prefill {result['prefill_tokens']} tokens")
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        if proxy is not None:
            proxy.stop()
        for llama in llamas:
            llama.stop()
    result["foreign_cpu_share"] = foreign_cpu_share(machine_cpu, own_cpu, clock)
    log(f"  other processes used {result['foreign_cpu_share']:.0%} of the CPUs meanwhile")
    return result


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (OSError, KeyError, TypeError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _progress(item: Served) -> None:
    r = item.record
    ttft = f"{r.ttft:.2f}s" if r.ttft is not None else "-"
    log(
        f"  user {r.user} turn {r.turn} {r.kind:4} backend {item.backend if item.backend is not None else '-'} "
        f"slot {r.slot or '-'} ttft {ttft:>7} prompt_n {r.prompt_n} cache_n {r.cache_n} "
        f"wait {r.queue_wait_ms or 0:.0f}ms {r.decision or ''} {r.error or ''}"
    )


# -- the whole run -------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs", default="one,one-t2,two,three,failover", help="comma-separated: one, one-t2, two, three, failover"
    )
    parser.add_argument("--repeat", type=int, default=1, help="run every configuration this many times (noise)")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--context-tokens", type=int, default=8000)
    parser.add_argument("--question-tokens", type=int, default=150)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--side-calls", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=2, help="users of a round sent at once")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per backend (not one-t2)")
    parser.add_argument("--model", choices=("bench", "tiny"), default="bench")
    parser.add_argument("--kill-backend", type=int, default=1, help="failover: which --llama-url index to kill")
    parser.add_argument(
        "--kill-delay",
        type=float,
        default=0.0,
        help="failover: seconds between the end of the half-way turn and the kill",
    )
    parser.add_argument(
        "--proxy-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra proxycache option, e.g. write_behind=1 (repeatable)",
    )
    parser.add_argument("--sample-interval", type=float, default=0.5, help="seconds between /status samples")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="seconds to wait, before each configuration, for other processes to idle the CPUs",
    )
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS)
    parser.add_argument("--workdir", type=Path, default=None, help="logs and slot saves (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where backends.md and backends.json go")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="only rewrite backends.md (in --out) from this backends.json; no run",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render is not None:
        return write_report(json.loads(args.render.read_text()), args.out)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: children stop
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="proxycache-backends-"))
    workdir.mkdir(parents=True, exist_ok=True)
    workload = Workload(
        users=args.users,
        context_tokens=args.context_tokens,
        turns=args.turns,
        question_tokens=args.question_tokens,
        answer_tokens=args.answer_tokens,
        side_calls=args.side_calls,
        concurrency=args.concurrency,
        ascii_answers=True,
    )
    shape = BENCH if args.model == "bench" else TINY
    options = dict(o.split("=", 1) for o in args.proxy_option)
    setup = Setup(
        workload=workload,
        model=ensure_model(args.models_dir, shape),
        workdir=workdir,
        quiet_wait=args.quiet_wait,
        sample_interval=args.sample_interval,
        kill_backend=args.kill_backend,
        kill_delay=args.kill_delay,
        proxy_options=options,
    )
    known = layouts(args.threads, os.cpu_count() or 2)
    chosen = [known[k] for k in args.configs.split(",") if k]
    log(
        f"workdir {workdir}; model {setup.model.name}; {setup.ctx_per_slot} tokens a slot; "
        f"configs {', '.join(l.key for l in chosen)}"
    )
    given = sys.argv[1:] if argv is None else argv
    results: dict[str, Any] = {
        "command": "python -m bench.backends " + " ".join(shlex.quote(a) for a in given),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine(),
        "proxycache_commit": proxycache_version(),
        "workload": attrs.asdict(workload),
        "ctx_per_slot": setup.ctx_per_slot,
        "model": {"file": setup.model.name, "shape": attrs.asdict(shape)},
        "proxy_options": options,
        "runs": [],
    }
    started = time.perf_counter()
    for round_ in range(args.repeat):
        for layout in chosen:
            if round_:
                layout = attrs.evolve(layout, key=f"{layout.key}#{round_ + 1}")
            results["runs"].append(run_layout(attrs.evolve(setup, workdir=workdir / f"round-{round_ + 1}"), layout))
    results["total_seconds"] = time.perf_counter() - started
    results["summaries"] = [summarize(r) for r in results["runs"]]
    (args.out / "backends.json").write_text(dump(results) + "\n")
    summaries = write_report(results, args.out)
    log(f"report in {args.out / 'backends.md'}; total {results['total_seconds']:.0f} s")
    return summaries


if __name__ == "__main__":
    main()
