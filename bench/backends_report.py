"""
What bench.backends reports: per configuration, prefill against the oracle, later-turn TTFT,
which backend served what, utilisation and queueing from the /status samples, the failover;
written as backends.md (keeping its hand-written notes) and backends.json.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from proxycache.testing.workload import Record, oracle_prefill

NOTES_MARKER = "<!-- hand-written notes below: kept when the bench rewrites this file -->"


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
