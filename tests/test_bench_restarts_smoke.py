"""
A tiny run of bench/restarts.py (one restart of each kind): it runs and
reports every run.  Not the benchmark.
"""

from __future__ import annotations

import json
import sys

import pytest


@pytest.mark.llama
def test_restarts_bench_runs(capsys):
    from bench import restarts

    argv, sys.argv = sys.argv, ["restarts", "--restarts", "1", "--clients", "1", "--between", "1"]
    try:
        restarts.main()
    finally:
        sys.argv = argv
    results = {r["run"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert set(results) == {"proxy restarts, --listen tcp", "proxy restarts, socket activation",
                            "proxy restarts, socket activation, SIGKILL", "llama-server restarts"}
    killed = results["proxy restarts, socket activation, SIGKILL"]
    assert killed["failed"] == killed["failed_while_stopping"], killed  # only those in flight at the kill
    assert results["proxy restarts, socket activation"]["answered"] > 0
    assert results["proxy restarts, socket activation"]["failed"] == 0, results
