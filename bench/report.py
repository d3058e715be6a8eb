"""
docs/benchmarks/report.md from the results of bench.run, and its PNG plots (bench.plots).

Re-render from saved results:  python -m bench.report docs/benchmarks/results.json
"""

from __future__ import annotations

import collections
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench import verdict
from proxycache.testing.workload import Record, oracle_prefill

PROXY_SPEEDUP_TARGET = 15.0
ORACLE_RATIO_TARGET = 1.05
WAIT_COUNTED_MS = 1.0  # a request queued longer than this waited for a slot
DISTURBED = 0.10  # share of the CPUs other processes used during a scenario


def _records(result: dict[str, Any]) -> list[Record]:
    return [Record(**r) for r in result["records"]]


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p95": None}
    array = np.array(values)
    return {
        "n": len(values),
        "mean": float(array.mean()),
        "p50": float(np.percentile(array, 50)),
        "p95": float(np.percentile(array, 95)),
    }


def summarize(result: dict[str, Any], turns: int, shared_tokens: int = 0) -> dict[str, Any]:
    records = _records(result)
    ok = [r for r in records if r.error is None]
    turn_records = [r for r in ok if r.kind == "turn"]
    restart_turn = turns // 2 - 1 if result["scenario"]["restart"] else None
    oracle = oracle_prefill(records, shared_tokens)
    summary = {
        "key": result["scenario"]["key"],
        "title": result["scenario"]["title"],
        "flags": result["flags"],
        "prefill": result["prefill_tokens"],
        "oracle": oracle,
        "vs_oracle": result["prefill_tokens"] / oracle if oracle else None,
        "first": _stats([r.ttft for r in turn_records if r.turn == 0]),
        "later": _stats([r.ttft for r in turn_records if r.turn > 0]),
        "side": _stats([r.ttft for r in ok if r.kind == "side"]),
        "wall": result["wall_seconds"],
        "errors": len(records) - len(ok),
        "requests": len(records),
        "decisions": dict(collections.Counter(r.decision for r in turn_records if r.turn > 0 and r.decision)),
        "side_decisions": dict(collections.Counter(r.decision for r in ok if r.kind == "side" and r.decision)),
        "first_prefill_rate": _median(
            [r.prompt_n / (r.prompt_ms / 1000) for r in turn_records if r.turn == 0 and r.prompt_n and r.prompt_ms]
        ),
        "later_prompt_ms": _median([r.prompt_ms / 1000 for r in turn_records if r.turn > 0 and r.prompt_ms]),
        "rss": result.get("llama_rss_bytes"),
        "waits": sum(1 for r in ok if (r.queue_wait_ms or 0) > WAIT_COUNTED_MS),
        "max_wait_ms": max((r.queue_wait_ms or 0 for r in ok), default=0.0),
        "foreign_cpu": result.get("foreign_cpu_share"),
    }
    if restart_turn is not None:
        summary["after_restart"] = _stats([r.ttft for r in turn_records if r.turn > restart_turn])
        summary["restart_noticed_after_s"] = result.get("restart_noticed_after_s")
    return summary


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _by_key(summaries: list[dict]) -> dict[str, dict]:
    return {s["key"]: s for s in summaries}


def _targets(summaries: list[dict]) -> list[str]:
    by = _by_key(summaries)
    lines = []
    small = by.get("llama-small")
    for key in ("proxy-ram0", "proxy-ram"):
        proxy = by.get(key)
        if proxy is None:
            continue
        ratio = proxy["vs_oracle"]
        met = ratio is not None and ratio <= ORACLE_RATIO_TARGET
        lines.append(
            f"- `{key}`: backend prefill {proxy['prefill']} tokens = **{_fmt(ratio, 3)}x the oracle** "
            f"(target ≤ {ORACLE_RATIO_TARGET}x): **{'met' if met else 'not met'}**."
        )
        if small and proxy["later"]["mean"] and small["later"]["mean"]:
            speedup = small["later"]["mean"] / proxy["later"]["mean"]
            p50 = small["later"]["p50"] / proxy["later"]["p50"]
            verdict = {
                (True, True): "met (mean and p50)",
                (True, False): "met by the mean only",
                (False, True): "met by the p50 only",
                (False, False): "not met",
            }[(speedup >= PROXY_SPEEDUP_TARGET, p50 >= PROXY_SPEEDUP_TARGET)]
            lines.append(
                f"- `{key}`: later-turn TTFT mean {_fmt(proxy['later']['mean'], 3)} s vs "
                f"{_fmt(small['later']['mean'], 3)} s for `llama-small` = **{speedup:.1f}x lower**, "
                f"p50 {_fmt(proxy['later']['p50'], 3)} s vs {_fmt(small['later']['p50'], 3)} s = "
                f"**{p50:.1f}x** (target ≥ {PROXY_SPEEDUP_TARGET:.0f}x): **{verdict}**."
            )
    return lines


def _restore_rate_from_proxy(metrics: dict[str, float]) -> float | None:
    size = metrics.get('proxycache_slot_action_bytes_sum{action="restore"}')
    seconds = metrics.get('proxycache_slot_action_seconds_sum{action="restore"}')
    return size / seconds if size and seconds else None


def _unique_warnings(lines: list[str], limit: int = 8) -> list[tuple[int, str]]:
    """Warnings with timestamps and keys masked, most frequent first."""
    counts: collections.Counter[str] = collections.Counter()
    example: dict[str, str] = {}
    for line in lines:
        text = line.split("] ", 1)[-1]
        shape = re.sub(r"\b[0-9a-f]{16}\b", "KEY", re.sub(r"\d+(\.\d+)?", "N", text))
        counts[shape] += 1
        example.setdefault(shape, text)
    return [(n, example[shape]) for shape, n in counts.most_common(limit)]


def render(results: dict[str, Any], summaries: list[dict], plots: bool = True) -> str:
    disturbed = [s for s in summaries if (s.get("foreign_cpu") or 0) > DISTURBED]
    w = results["workload"]
    m = results["machine"]
    c = results["calibration"]
    out = [
        "# proxycache vs llama-server alone: a team's long-context chats",
        "",
        f"Generated by `bench/run.py` on {results['date']} in {results['total_seconds'] / 60:.1f} minutes. "
        "Everything below is measured on this one machine; rerun with the command to check.",
        "",
        "## Setup",
        "",
        f"- Machine: {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, no GPU; Linux {m['kernel']}, "
        f"Python {m['python']}, xllamacpp {m['xllamacpp']} (llama.cpp's server, in-process).",
        f"- Command: `{results['command']}` (proxycache at commit `{results.get('proxycache_commit', '?')}`)",
        f"- Model: `{results['model']['file']}` (generated random weights, "
        f"{results['model']['shape']['embedding']} wide, {results['model']['shape']['layers']} layers; "
        "byte-level tokenizer: one token per byte). "
        f"Prefill here: {c['prefill_tokens_per_s']:.0f} tokens/s for a {c['prompt_n']}-token prompt; "
        f"KV cache: {c['kv_bytes_per_token']:.0f} bytes/token (from a slot save's n_written/n_saved).",
        f"- llama-server: `-np {results['slots']}`, {results['ctx_per_slot']} tokens a slot, "
        f"`-t {results['threads']}`, `--metrics`; per-scenario flags in the table.",
        f"- Workload: {w['users']} users round-robin, each with a private context of {w['context_tokens']} tokens, "
        f"{w['turns']} turns of a {w['question_tokens']}-token question and a {w['answer_tokens']}-token answer "
        f"(streamed, temperature 0, answers kept to ASCII by `logit_bias` so that llama.cpp streams each token as "
        "it comes: the random model's bytes are mostly not UTF-8, which llama.cpp holds back to the end), "
        f"{w['side_calls']} side call(s) per turn, concurrency {w['concurrency']}. "
        f"A conversation ends near {c['conversation_tokens_estimate']} tokens "
        f"(~{c['conversation_tokens_estimate'] * c['kv_bytes_per_token'] / 2**20:.0f} MiB of KV), so "
        f"`--cache-ram {c['small_cache_mib']}` holds about two.",
        "",
        "## Headline",
        "",
        "Prefill = prompt tokens llama.cpp computed (`llamacpp:prompt_tokens_total`, delta over the scenario, "
        "summed across a restart). Oracle = each user's first prompt in full, then only the tokens new since "
        "that user's previous turn, side calls in full. TTFT = seconds from sending the request to the first "
        "stream chunk, as the `openai` client sees it; later turns = every turn after a user's first.",
        "",
        "| scenario | llama-server flags | prefill tokens | × oracle | later-turn TTFT mean s | p50 | p95 | "
        "first-turn TTFT p50 s | p95 | wall s | errors | queued (max ms) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        out.append(
            f"| `{s['key']}`: {s['title']} | `{s['flags']}` | {s['prefill']} | {_fmt(s['vs_oracle'])} | "
            f"{_fmt(s['later']['mean'], 3)} | {_fmt(s['later']['p50'], 3)} | {_fmt(s['later']['p95'], 3)} | "
            f"{_fmt(s['first']['p50'])} | {_fmt(s['first']['p95'])} | {s['wall']:.1f} | {s['errors']} | "
            f"{s.get('waits', 0)} ({s.get('max_wait_ms', 0):.0f}) |"
        )
    oracles = [s["oracle"] for s in summaries if not s["errors"]]
    if oracles:
        out.append(f"| oracle | — | {int(np.median(oracles))} | 1.00 | — | — | — | — | — | — | — |")
    out += [
        "",
        "Where the time of a later turn goes, and what the server holds:",
        "",
        "| scenario | first-turn prefill tokens/s (median) | later turns: llama.cpp prompt time p50 s | "
        "later-turn TTFT p50 minus that s | llama-server RSS after the run MiB | CPU used by other processes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        rest = (s["later"]["p50"] - s["later_prompt_ms"]) if s["later"]["p50"] and s["later_prompt_ms"] else None
        rss = f"{s['rss'] / 2**20:.0f}" if s.get("rss") else "—"
        foreign = f"{s['foreign_cpu'] * 100:.0f}%" if s.get("foreign_cpu") is not None else "—"
        out.append(
            f"| `{s['key']}` | {_fmt(s['first_prefill_rate'], 0)} | {_fmt(s['later_prompt_ms'], 3)} | "
            f"{_fmt(rest, 3)} | {rss} | {foreign} |"
        )
    out += ["", "## The issue's targets (8 users, 2 slots, large private contexts)", "", *_targets(summaries)]
    out += verdict.run_section(results)

    points = sweep_points(results, summaries)
    if len(points) > 1:
        out += [
            "",
            "## Speed-up against context size",
            "",
            "`proxy-ram0` against `llama-small` (its `--cache-ram` re-sized to about two conversations at "
            "each size), same workload otherwise:",
            "",
            "| context tokens | proxy later-turn TTFT mean / p50 s | llama-small mean / p50 s | "
            "speed-up mean / p50 | proxy prefill × oracle | other processes' CPU (proxy / llama) |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for p in points:
            out.append(
                f"| {p['context_tokens']} | "
                f"{_fmt(p['proxy']['later']['mean'], 3)} / {_fmt(p['proxy']['later']['p50'], 3)} | "
                f"{_fmt(p['small']['later']['mean'], 3)} / {_fmt(p['small']['later']['p50'], 3)} | "
                f"**{p['speedup_mean']:.1f}x / {p['speedup_p50']:.1f}x** | {_fmt(p['proxy']['vs_oracle'], 3)} | "
                f"{_fmt((p['proxy'].get('foreign_cpu') or 0) * 100, 0)}% / "
                f"{_fmt((p['small'].get('foreign_cpu') or 0) * 100, 0)}% |"
            )
        out += ["", "![speed-up against context size](speedup.png)"]

    restarts = [s for s in summaries if "after_restart" in s]
    if restarts:
        out += [
            "",
            "## After a llama-server restart",
            "",
            "Turn TTFT of the turns after the restart (the restart happens between rounds; for proxycache the "
            "run waits until the proxy has noticed it, as a client returning after a restart would):",
            "",
        ]
        for s in restarts:
            noticed = s.get("restart_noticed_after_s")
            extra = (
                f"; proxy noticed the restart {noticed:.1f} s after llama-server was healthy"
                if noticed is not None
                else ""
            )
            out.append(
                f"- `{s['key']}`: mean {_fmt(s['after_restart']['mean'], 3)} s, p50 "
                f"{_fmt(s['after_restart']['p50'], 3)} s, p95 {_fmt(s['after_restart']['p95'], 3)} s "
                f"({s['after_restart']['n']} turns){extra}."
            )

    out += ["", "## Decisions and the proxy's own account", ""]
    for result, s in zip(results["scenarios"], summaries):
        if not result["scenario"]["proxy"]:
            continue
        metrics = result.get("proxy_metrics", {})
        rate = _restore_rate_from_proxy(metrics)
        out.append(
            f"- `{s['key']}`: later turns {s['decisions']}; side calls {s['side_decisions'] or '—'}; "
            f"saves {int(metrics.get('proxycache_slot_saves_total', 0))}, restores "
            f"{int(metrics.get('proxycache_slot_restores_total', 0))}, ineffective restores "
            f"{int(metrics.get('proxycache_ineffective_restores_total', 0))}, restore failures "
            f"{int(metrics.get('proxycache_slot_restore_failures_total', 0))}"
            + (f"; restores as the proxy timed them (incl. its /slots check): {rate / 1e9:.2f} GB/s" if rate else "")
            + "."
        )
        for n, text in _unique_warnings(result.get("proxy_warnings", [])):
            out.append(f"  - {n}× `{text[:220]}`")
        for name, what in (
            ("proxy_no_timings", "streamed replies the proxy logged without llama.cpp's timings"),
            ("proxy_empty_saves", "saves of an empty slot (0 tokens) over an entry"),
        ):
            lines = result.get(name) or []
            if lines:
                out.append(f"  - {len(lines)} {what}, e.g. `{lines[0].split('] ', 1)[-1][:220]}`")

    costs = results.get("proxy_costs")
    if costs:
        o, st = costs["overhead"], costs["streaming"]
        out += [
            "",
            "## Proxy overhead and streaming (tiny model, to isolate the proxy)",
            "",
            f"- Non-stream tiny prompt, prompt cached, {o['rounds']} alternating rounds: direct p50 "
            f"{o['direct_p50_ms']:.1f} ms, through proxycache p50 {o['proxy_p50_ms']:.1f} ms: "
            f"**{o['added_p50_ms']:.1f} ms added** per request.",
            f"- Streaming {st['tokens']} tokens (ASCII-only, end of stream banned; read with `http.client`, so the "
            f"client is not the bottleneck), median of {st['runs']}: direct "
            f"{st['direct_tokens_per_s']:.0f} tokens/s, through proxycache {st['proxy_tokens_per_s']:.0f} tokens/s "
            f"({st['proxy_vs_direct'] * 100:.0f}% of direct).",
        ]
    fp = results.get("fingerprint")
    if fp:
        out += [
            "",
            "## Fingerprint",
            "",
            f"- `proxycache.fingerprint.fingerprint` of a {fp['bytes']}-byte (~60k-token) conversation: "
            f"median **{fp['median_ms']:.1f} ms** of {fp['runs']} ({fp['blocks']} blocks).",
        ]
    restore = next((r.get("restore") for r in results["scenarios"] if r.get("restore")), None)
    disk = results.get("disk_read")
    if restore or disk:
        out += ["", "## Restore throughput vs the disk", ""]
        if restore and restore["files"]:
            for phase in ("cold", "warm"):
                p = restore[phase]
                how = (
                    "page cache dropped before each restore"
                    if p.get("page_cache_dropped")
                    else "files in the page cache"
                    if phase == "warm"
                    else "page cache NOT dropped (not root?)"
                )
                out.append(
                    f"- Restore, {phase} ({how}): {restore['files']} slot files ({p['bytes'] / 1e6:.0f} MB read), "
                    f"median **{p['bytes_per_s'] / 1e9:.2f} GB/s** "
                    f"(best {p.get('best_bytes_per_s', 0) / 1e9:.2f}) by llama.cpp's restore_ms "
                    f"({p['bytes_per_s_wall'] / 1e9:.2f} GB/s including the HTTP call), "
                    f"{restore.get('pause_s', 0)} s apart."
                )
        if disk:
            how = "page cache dropped" if disk["page_cache_dropped"] else "page cache NOT dropped: a cached read"
            out.append(
                f"- Sequential read of a fresh {disk['bytes'] / 2**20:.0f} MiB file ({how}): "
                f"**{disk['bytes_per_s'] / 1e9:.2f} GB/s**."
            )
    if plots:
        out += [
            "",
            "## Plots",
            "",
            "![later-turn TTFT per scenario](later_ttft.png)",
            "",
            "![prefill tokens per scenario vs the oracle](prefill.png)",
            "",
            "![TTFT of every turn, in order](ttft_timeline.png)",
        ]
    out += [
        "",
        "## Caveats",
        "",
        "- A random-weight model: answers are noise, but tokenizer, chat template, prefill cost, KV size and "
        "slot save/restore are llama.cpp's own. Prefill of a real 7B model on this CPU would be 100x slower or more, "
        "which widens every gap here; restore cost grows with KV bytes/token instead.",
        "- The machine may be shared. Before each scenario the run waits (up to `--quiet-wait` s) for other "
        "processes to leave the CPUs idle, and it reports the share of CPU they used during each scenario "
        "(last column above). With llama.cpp's threads on every core, any foreign load stalls them: timings "
        f"of a scenario above {DISTURBED:.0%} are disturbed, prefill token counts are not."
        + (" Disturbed here: " + ", ".join(f"`{s['key']}`" for s in disturbed) + "." if disturbed else ""),
        "- Raw per-request records: `results.json` next to this report.",
    ]
    return "\n".join(out) + "\n"


def sweep_points(results: dict[str, Any], summaries: list[dict]) -> list[dict[str, Any]]:
    """(context size, proxy-ram0 summary, llama-small summary, speed-ups), the main run included."""
    runs = [(results["workload"]["context_tokens"], summaries)]
    for point in results.get("sweep", []):
        runs.append((point["context_tokens"], [summarize(r, results["workload"]["turns"]) for r in point["scenarios"]]))
    points = []
    for size, found in sorted(runs, key=lambda run: run[0]):
        by = _by_key(found)
        proxy, small = by.get("proxy-ram0"), by.get("llama-small")
        if proxy and small and proxy["later"]["mean"] and small["later"]["mean"]:
            points.append(
                {
                    "context_tokens": size,
                    "proxy": proxy,
                    "small": small,
                    "speedup_mean": small["later"]["mean"] / proxy["later"]["mean"],
                    "speedup_p50": small["later"]["p50"] / proxy["later"]["p50"],
                }
            )
    return points


def write_all(results: dict[str, Any], out_dir: Path) -> list[dict]:
    shared = results["workload"].get("shared_tokens", 0)
    summaries = [summarize(r, results["workload"]["turns"], shared) for r in results["scenarios"]]
    plots = importlib.util.find_spec("matplotlib") is not None
    (out_dir / "report.md").write_text(render(results, summaries, plots))
    if not plots:
        # The plots are optional (the `bench` extra); the report and results.json are not.
        print("matplotlib is not installed (pip install -e '.[bench]'): no plots drawn", file=sys.stderr)
        return summaries
    from bench.plots import plot, plot_speedup  # matplotlib, only when installed

    plot(results, summaries, out_dir)
    points = sweep_points(results, summaries)
    if len(points) > 1:
        plot_speedup(points, out_dir)
    return summaries


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks/results.json")
    write_all(json.loads(path.read_text()), path.parent)
