"""
bench.run --presets: several named workloads (bench.run.PRESETS) one after the other in one run, a
report each in OUT/NAME, and OUT/summary.md with issue 24's verdict per pair of scenarios.
"""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Callable

from bench import verdict
from bench.run import OUT_DIR, log


def without_option(argv: list[str], name: str) -> list[str]:
    """C{argv} without the option C{name} (C{--name VALUE} or C{--name=VALUE})."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def run_presets(argv: list[str], args: argparse.Namespace, main: Callable[[list[str]], None]) -> None:
    """Each of --presets in turn, as C{--preset NAME} with the other options; a summary of the verdicts."""
    out = args.out or OUT_DIR / "presets"
    rest = without_option(without_option(without_option(argv, "--presets"), "--out"), "--workdir")
    summary = ["# Issue 24's target per workload", "", f"`python -m bench.run {shlex.join(argv)}`", ""]
    for name in args.presets.split(","):
        sub = [*rest, "--preset", name, "--out", str(out / name)]
        if args.workdir:
            sub += ["--workdir", str(args.workdir / name)]
        log(f"preset {name}: python -m bench.run {shlex.join(sub)}")
        main(sub)
        results = json.loads((out / name / "results.json").read_text())
        summary += [f"## {name} ([report]({name}/report.md), {results['total_seconds'] / 60:.1f} minutes)",
                    "", *verdict.run_section(results)[3:], ""]
        (out / "summary.md").write_text("\n".join(summary) + "\n")
    log(f"summary in {out / 'summary.md'}")
