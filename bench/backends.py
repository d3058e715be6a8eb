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
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import attrs

from bench.processes import Proxy, cpu_seconds, foreign_cpu_share, wait_until_quiet
from bench.run import DEFAULT_MODELS, log, machine, proxycache_version
from proxycache.embedded import LlamaServerSpec
from proxycache.testing import LlamaProcess, free_port, http
from proxycache.testing.workload import Record, Workload, oracle_prefill, run
from proxycache.tinymodel import BENCH, TINY, ensure_model

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "docs" / "benchmarks"
NOTES_MARKER = "<!-- hand-written notes below: kept when the bench rewrites this file -->"


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


def expand(result: dict[str, Any]) -> list[dict[str, Any]]:
    """A run's /status samples as dicts: t, queue_depth, backends: [{url, up, slots, busy}]."""
    urls = result.get("sample_urls") or []
    return [
        {
            "t": t,
            "queue_depth": depth,
            "backends": [
                {"url": url, "up": bool(up), "slots": slots, "busy": busy} for url, (up, slots, busy) in zip(urls, rows)
            ],
        }
        for t, depth, rows in result["samples"]
    ]


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


# -- summaries -------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p95": None, "max": None}
    ordered = sorted(values)
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "p50": statistics.median(values),
        "p95": ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)],
        "max": ordered[-1],
    }


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    layout = result["layout"]
    rows = result["records"]
    records = [Record(**{k: v for k, v in row.items() if k != "backend"}) for row in rows]
    turns = [(row, r) for row, r in zip(rows, records) if r.kind == "turn"]
    ok = [(row, r) for row, r in turns if r.error is None]
    oracle = oracle_prefill(records)
    later = [r.ttft for _, r in ok if r.turn > 0 and r.ttft is not None]
    by_backend_header: dict[str, int] = {}
    for row, _ in ok:
        key = str(row["backend"])
        by_backend_header[key] = by_backend_header.get(key, 0) + 1
    decisions: dict[str, int] = {}
    for _, r in ok:
        if r.turn > 0:
            decisions[r.decision or "-"] = decisions.get(r.decision or "-", 0) + 1
    summary: dict[str, Any] = {
        "key": layout["key"],
        "title": layout["title"],
        "backends": layout["backends"],
        "slots": layout["slots"],
        "threads": layout["threads"],
        "flags": result["flags"],
        "prefill": result["prefill_tokens"],
        "oracle": oracle,
        "vs_oracle": result["prefill_tokens"] / oracle if oracle else None,
        "prefill_by_backend": [b["prompt_tokens"] for b in result["per_backend"]],
        "first": _stats([r.ttft for _, r in ok if r.turn == 0 and r.ttft is not None]),
        "later": _stats(later),
        "errors": sum(1 for r in records if r.error is not None),
        "error_messages": sorted({r.error for r in records if r.error}),
        "requests_by_backend_header": dict(sorted(by_backend_header.items())),
        "requests_by_backend_status": {b["url"]: b["requests"] for b in result["status"]["backends"]},
        "later_decisions": decisions,
        "cross_backend_restores": result["status"]["disk"].get("cross_backend_restores"),
        "disk": {k: result["status"]["disk"].get(k) for k in ("saves", "restores", "restored_tokens", "entries")},
        "queued_requests": sum(1 for _, r in ok if (r.queue_wait_ms or 0) > 0),
        "queue_wait_s_total": sum((r.queue_wait_ms or 0) for _, r in ok) / 1000,
        "wall_seconds": result["wall_seconds"],
        "foreign_cpu_share": result["foreign_cpu_share"],
        "load": (result.get("load_before"), result.get("load_after")),
    }
    summary.update(_utilisation(expand(result)))
    killed = result.get("killed")
    summary["imbalance"] = _imbalance(
        rows, records, layout["backends"], None if killed is None else (killed["backend"], killed["at_workload_s"])
    )
    if "killed" in result:
        summary["failover"] = _failover(result, rows, records)
    return summary


def _utilisation(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean busy slots per backend while the workload ran, and samples where a request queued beside an idle slot."""
    busy: dict[str, list[float]] = {}
    idle_while_queued = []
    for sample in samples:
        for b in sample["backends"]:
            if b["up"] and b["slots"]:
                busy.setdefault(b["url"], []).append(b["busy"] / b["slots"])
        if sample["queue_depth"] > 0:
            idle = [b["url"] for b in sample["backends"] if b["up"] and b["slots"] and b["busy"] < b["slots"]]
            if idle:
                idle_while_queued.append(
                    {"t": sample["t"], "queue_depth": sample["queue_depth"], "backends": sample["backends"]}
                )
    return {
        "busy_share_by_backend": {url: round(statistics.fmean(v), 3) for url, v in busy.items()},
        "samples": len(samples),
        "samples_queued": sum(1 for s in samples if s["queue_depth"] > 0),
        "samples_idle_while_queued": len(idle_while_queued),
        "idle_while_queued_examples": idle_while_queued[:5],
    }


def _imbalance(
    rows: list[dict], records: list[Record], backends: int, killed: tuple[int, float] | None
) -> dict[str, Any]:
    """
    From the requests' own intervals (start after queue wait .. end of stream): how long a backend ran two
    or more requests at once while another backend that was up ran none, and the requests that started
    on a backend already running one while another up backend was idle.  With one thread per backend,
    two prefills on one backend share its thread while the other backend's thread idles.
    """
    spans = []
    for row, r in zip(rows, records):
        if r.error is None and row["backend"] is not None:
            begin = r.started + (r.queue_wait_ms or 0) / 1000
            spans.append((begin, r.started + r.seconds, row["backend"], r))

    def up(backend: int, t: float) -> bool:
        return killed is None or backend != killed[0] or t < killed[1]

    def running(t: float) -> list[int]:
        counts = [0] * backends
        for begin, end, backend, _ in spans:
            if begin <= t < end:
                counts[backend] += 1
        return counts

    points = sorted({p for begin, end, _, _ in spans for p in (begin, end)})
    doubled_seconds = 0.0
    for a, b in zip(points, points[1:]):
        counts = running((a + b) / 2)
        if max(counts) >= 2 and any(c == 0 and up(i, a) for i, c in enumerate(counts)):
            doubled_seconds += b - a
    stacked = []
    for begin, _, backend, r in spans:
        counts = running(begin)
        counts[backend] -= 1  # the request itself
        if counts[backend] >= 1 and any(c == 0 and up(i, begin) and i != backend for i, c in enumerate(counts)):
            stacked.append(
                {
                    "user": r.user,
                    "turn": r.turn,
                    "backend": backend,
                    "decision": r.decision,
                    "started": round(begin, 3),
                    "ttft": r.ttft,
                    "running_per_backend": counts,
                }
            )
    return {
        "seconds_stacked_beside_idle_backend": round(doubled_seconds, 2),
        "requests_stacked_beside_idle_backend": len(stacked),
        "stacked_by_decision": _count(x["decision"] or "-" for x in stacked),
        # a hit stays with its cache by design; a miss or a restore could have gone to the idle backend
        "stacked_movable": sum(1 for x in stacked if x["decision"] in ("miss", "restore")),
        "stacked_examples": [x for x in stacked if x["decision"] in ("miss", "restore")][:8],
    }


def _failover(result: dict[str, Any], rows: list[dict], records: list[Record]) -> dict[str, Any]:
    killed = result["killed"]
    victim, after = killed["backend"], killed["after_turn"]
    home: dict[int, int | None] = {}  # user -> backend of their last successful turn before the kill
    for row, r in zip(rows, records):
        if r.kind == "turn" and r.error is None and r.turn <= after:
            home[r.user] = row["backend"]
    post = [(row, r) for row, r in zip(rows, records) if r.kind == "turn" and r.turn > after]
    first_post = {}  # each user's first turn after the kill
    for row, r in sorted(post, key=lambda x: x[1].turn):
        first_post.setdefault(r.user, (row, r))
    moved = [(row, r) for row, r in first_post.values() if home.get(r.user) == victim]
    pre_later = [
        r.ttft
        for row, r in zip(rows, records)
        if r.kind == "turn" and r.error is None and 0 < r.turn <= after and r.ttft is not None
    ]
    down_at = next(
        (
            s["t"]
            for s in expand(result)
            if s["t"] >= killed["at_s"] and any(b["url"] == killed["url"] and not b["up"] for b in s["backends"])
        ),
        None,
    )
    return {
        "killed_backend": victim,
        "killed_url": killed["url"],
        "after_turn": after,
        "proxy_saw_it_down_after_s": None if down_at is None else round(down_at - killed["at_s"], 2),
        "turns_after": len(post),
        "errors_after": sum(1 for _, r in post if r.error is not None),
        "ttft_after": _stats([r.ttft for _, r in post if r.error is None and r.ttft is not None]),
        "ttft_later_before": _stats(pre_later),
        "decisions_after": _count(r.decision or ("error" if r.error else "-") for _, r in post),
        "users_homed_on_killed": len(moved),
        "their_first_turn_after": [
            {
                "user": r.user,
                "decision": r.decision,
                "backend": row["backend"],
                "ttft": r.ttft,
                "prompt_n": r.prompt_n,
                "cache_n": r.cache_n,
                "error": r.error,
            }
            for row, r in sorted(moved, key=lambda x: x[1].user)
        ],
        "moved_by_restore": sum(1 for row, r in moved if r.decision == "restore" and row["backend"] != victim),
        "moved_by_recompute": sum(1 for row, r in moved if r.decision == "miss"),
        "cross_backend_restores": result["status"]["disk"].get("cross_backend_restores"),
        "disk_saves_before_kill": killed["disk_before"].get("saves"),
    }


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


# -- report --------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render(results: dict[str, Any], summaries: list[dict[str, Any]]) -> str:
    w = results["workload"]
    m = results["machine"]
    out = [
        "# proxycache in front of several llama.cpp backends (issue 16)",
        "",
        f"Run of {results['date']} at commit `{results['proxycache_commit']}`:",
        "",
        "```sh",
        results["command"],
        "```",
        "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB, no GPU; xllamacpp {m['xllamacpp']}. "
        f"**All backends share these {m['nproc']} cores**: two or three llama-servers do not add compute here, "
        "they only add slots (KV capacity) and parallel queues. Each multi-backend configuration runs every "
        "llama-server with `--threads 1`; `one` does the same (same per-backend CPU), `one-t2` gives the single "
        "backend every core (same total CPU as `two`). The share of CPU other processes took during each "
        "configuration is in the last column (other sessions share this machine).",
        "",
        f"Workload: {w['users']} users, private contexts of {w['context_tokens']} tokens, {w['turns']} turns, "
        f"{w['question_tokens']}-token questions, {w['answer_tokens']}-token answers, concurrency "
        f"{w['concurrency']}, side calls {w['side_calls']}; model `{results['model']['file']}` (generated, "
        f"random weights: its output is noise, its prefill cost and KV caches are real), "
        f"{results['ctx_per_slot']} tokens per slot. Every llama-server: `--cache-ram 0`, the same "
        "`--slot-save-path` (one shared directory), proxycache `--slot-save-path` on it.",
        "",
        "Prefill = the rise of llama.cpp's `llamacpp:prompt_tokens_total` summed over the backends (a killed "
        "backend: its value just before the kill). Oracle = each user's first prompt in full, then only the "
        "new tokens of each turn. TTFT = request sent to first stream chunk, as the `openai` client sees it; "
        "later turns = every turn after a user's first. Requests per backend = the `X-Proxycache-Backend` "
        "header of each turn (index of the `--llama-url`), /status `backends[].requests` agrees unless noted.",
        "",
        "| config | backends × slots, threads each | prefill tokens | × oracle | later-turn TTFT mean s | "
        "p50 | p95 | first-turn TTFT mean s | turns per backend | cross-backend restores | later turns: decisions | "
        "errors | requests queued (total wait s) | wall s | other processes' CPU |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for s in summaries:
        per = " / ".join(f"{n}" for _, n in sorted(s["requests_by_backend_header"].items()))
        decisions = ", ".join(f"{k} {v}" for k, v in sorted(s["later_decisions"].items()))
        out.append(
            f"| `{s['key']}` | {s['backends']} × {s['slots']}, {s['threads']} | {s['prefill']:,} | "
            f"{_f(s['vs_oracle'])}x | {_f(s['later']['mean'], 3)} | {_f(s['later']['p50'], 3)} | "
            f"{_f(s['later']['p95'], 3)} | {_f(s['first']['mean'], 2)} | {per} | {s['cross_backend_restores']} | "
            f"{decisions} | {s['errors']} | {s['queued_requests']} ({s['queue_wait_s_total']:.1f}) | "
            f"{s['wall_seconds']:.0f} | {s['foreign_cpu_share']:.0%} |"
        )
    oracles = sorted({s["oracle"] for s in summaries})
    out += [
        "",
        f"Oracle prefill: {', '.join(f'{o:,}' for o in oracles)} tokens (it differs by a few tokens "
        "between runs when the generated answers differ in length).",
        "",
    ]
    out += [
        "Per backend (in `--llama-url` order): prefill tokens, share of the samples of /status with a slot "
        "busy (mean busy slots / slots), requests from /status:",
        "",
        "| config | prefill tokens per backend | busy share per backend | /status requests per backend | "
        "samples with a queue / with a queue and an idle slot on an up backend | "
        "s with 2+ requests on one backend while another up backend ran none | requests started so: "
        "by decision (miss/restore ones could have gone to the idle backend) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        out.append(
            f"| `{s['key']}` | {' / '.join(f'{t:,}' for t in s['prefill_by_backend'])} | "
            f"{' / '.join(_f(v) for v in s['busy_share_by_backend'].values())} | "
            f"{' / '.join(str(v) for v in s['requests_by_backend_status'].values())} | "
            f"{s['samples_queued']} / {s['samples_idle_while_queued']} of {s['samples']} | "
            f"{s['imbalance']['seconds_stacked_beside_idle_backend']:.1f} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(s['imbalance']['stacked_by_decision'].items())) or '—'} |"
        )
    for s in summaries:
        header, status = sum(s["requests_by_backend_header"].values()), sum(s["requests_by_backend_status"].values())
        if header != status:
            out += [
                "",
                f"`{s['key']}`: /status counts {status} requests against {header} answered turns: it also "
                "counts an attempt on a backend that failed before the request was sent elsewhere.",
            ]
    stacked = [s for s in summaries if s["imbalance"]["stacked_movable"]]
    if stacked:
        s = stacked[0]
        out += [
            "",
            "## Placement: requests stacked on one backend while another idled",
            "",
            "A request that is not a `hit` (a new conversation, or a restore from the shared directory) can run "
            "on any backend. These started on a backend already running a request while another backend that was "
            f"up ran none (`{s['key']}`, first {len(s['imbalance']['stacked_examples'])}; `running` = requests "
            "running on each backend as it started, itself excluded):",
            "",
            "| user | turn | decision | backend | running per backend | TTFT s |",
            "| ---: | ---: | --- | ---: | --- | ---: |",
        ]
        for x in s["imbalance"]["stacked_examples"]:
            out.append(
                f"| {x['user']} | {x['turn']} | {x['decision']} | {x['backend']} | "
                f"{x['running_per_backend']} | {_f(x['ttft'], 3)} |"
            )
    for s in summaries:
        f = s.get("failover")
        if not f:
            continue
        out += [
            "",
            f"## Failover (`{s['key']}`)",
            "",
            f"Backend {f['killed_backend']} (`{f['killed_url']}`) SIGKILLed after turn {f['after_turn']} "
            f"(0-based) of every user, with {f['disk_saves_before_kill']} saves on disk by then; the proxy "
            f"saw it down after {_f(f['proxy_saw_it_down_after_s'])} s (sampled /status).",
            "",
            f"- turns after the kill: {f['turns_after']}, errors {f['errors_after']}; decisions "
            f"{', '.join(f'{k} {v}' for k, v in sorted(f['decisions_after'].items()))}",
            f"- TTFT of turns after the kill: mean {_f(f['ttft_after']['mean'], 3)} s, p50 "
            f"{_f(f['ttft_after']['p50'], 3)} s, max {_f(f['ttft_after']['max'], 3)} s (later turns before the "
            f"kill: mean {_f(f['ttft_later_before']['mean'], 3)} s, p50 {_f(f['ttft_later_before']['p50'], 3)} s)",
            f"- users whose last turn before the kill was served by the killed backend: "
            f"{f['users_homed_on_killed']}; their next turn was a `restore` on the surviving backend for "
            f"**{f['moved_by_restore']}**, recomputed (`miss`) for {f['moved_by_recompute']}",
            f"- `disk.cross_backend_restores` (whole run): {f['cross_backend_restores']}",
            "",
            "| user | decision | backend | TTFT s | prompt_n | cache_n | error |",
            "| ---: | --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for t in f["their_first_turn_after"]:
            out.append(
                f"| {t['user']} | {t['decision']} | {t['backend']} | {_f(t['ttft'], 3)} | {t['prompt_n']} | "
                f"{t['cache_n']} | {t['error'] or ''} |"
            )
    notes = results.get("notes") or []
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    warnings = {s["key"]: s for s in summaries if s["errors"]}
    if warnings:
        out += ["", "## Errors", ""]
        for key, s in warnings.items():
            out += [f"- `{key}`: " + "; ".join(s["error_messages"][:5])]
    out += ["", "Raw figures (every request, /status samples, proxy warnings): `backends.json` next to this file.", ""]
    return "\n".join(out)


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


def dump(value: Any, depth: int = 0, expand_depth: int = 4) -> str:
    """JSON, indented down to C{expand_depth}, then one line per value (one request, one sample a line)."""
    pad = " " * (depth + 1)
    if depth < expand_depth and isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(k)}: {dump(v, depth + 1, expand_depth)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"
    if depth < expand_depth and isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(pad + dump(v, depth + 1, expand_depth) for v in value) + "\n" + " " * depth + "]"
    return json.dumps(value)


def write_report(results: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """backends.md from C{results} (summaries recomputed from the runs), keeping the hand-written notes."""
    summaries = [summarize(r) for r in results["runs"]]
    report = out / "backends.md"
    # a hand-written reading of the figures, after NOTES_MARKER, survives a re-run
    kept = report.read_text().partition(NOTES_MARKER) if report.exists() else ("", "", "")
    report.write_text(render(results, summaries) + ("\n" + NOTES_MARKER + kept[2] if kept[1] else ""))
    return summaries


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
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
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backends.json").write_text(dump(results) + "\n")
    summaries = write_report(results, args.out)
    log(f"report in {args.out / 'backends.md'}; total {results['total_seconds']:.0f} s")
    return summaries


if __name__ == "__main__":
    main()
