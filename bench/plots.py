"""The PNG plots of bench.run's report (matplotlib: the `bench` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from bench.report import PROXY_SPEEDUP_TARGET
from proxycache.testing.workload import Record

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen


def _save(fig: Any, ax: Any, title: str, path: Path, legend_size: float | None = None) -> None:
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(results: dict[str, Any], summaries: list[dict], out_dir: Path) -> None:
    keys = [s["key"] for s in summaries]
    colors = ["tab:green" if s["key"].startswith("proxy") else "tab:gray" for s in summaries]

    fig, ax = plt.subplots(figsize=(8, 4))
    later = {stat: [s["later"][stat] or 0 for s in summaries] for stat in ("mean", "p50", "p95")}
    ax.bar(keys, later["mean"], color=colors, label="mean")
    ax.scatter(keys, later["p50"], color="black", marker="_", s=400, label="p50", zorder=3)
    ax.scatter(keys, later["p95"], color="tab:red", marker="v", label="p95", zorder=3)
    ax.set_yscale("log")
    ax.set_ylabel("seconds (log)")
    ax.tick_params(axis="x", labelrotation=20)
    _save(fig, ax, "Time to first token of later turns", out_dir / "later_ttft.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(keys, [s["prefill"] for s in summaries], color=colors)
    oracle = np.median([s["oracle"] for s in summaries])
    ax.axhline(oracle, color="tab:blue", linestyle="--", label=f"oracle ({oracle:.0f})")
    ax.set_ylabel("prompt tokens computed by llama.cpp")
    ax.tick_params(axis="x", labelrotation=20)
    _save(fig, ax, "Backend prefill per scenario", out_dir / "prefill.png")

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for result, s in zip(results["scenarios"], summaries):
        turns = [r for r in (Record(**row) for row in result["records"]) if r.kind == "turn" and r.ttft is not None]
        ax.plot(range(len(turns)), [r.ttft for r in turns], marker=".", linewidth=1, label=s["key"])
    turns, users = results["workload"]["turns"], results["workload"]["users"]
    if any(r["scenario"]["restart"] for r in results["scenarios"]) and turns >= 2:
        ax.axvline(users * (turns // 2) - 0.5, color="black", linestyle=":", label="restart (-restart runs)")
    ax.set_yscale("log")
    ax.set_xlabel("turn, in the order sent (users round-robin; the first round is every user's first turn)")
    ax.set_ylabel("TTFT seconds (log)")
    _save(fig, ax, "TTFT of every turn", out_dir / "ttft_timeline.png", legend_size=8)


def plot_speedup(points: list[dict[str, Any]], out_dir: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    sizes = [p["context_tokens"] for p in points]
    ax.plot(sizes, [p["speedup_mean"] for p in points], marker="o", label="mean")
    ax.plot(sizes, [p["speedup_p50"] for p in points], marker="s", label="p50")
    ax.axhline(PROXY_SPEEDUP_TARGET, color="tab:red", linestyle="--", label=f"target {PROXY_SPEEDUP_TARGET:.0f}x")
    ax.set_xlabel("private context per user (tokens)")
    ax.set_ylabel("later-turn TTFT, llama-small / proxycache")
    ax.set_ylim(bottom=0)
    _save(fig, ax, "proxycache speed-up against context size", out_dir / "speedup.png")
