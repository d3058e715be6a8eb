"""
A few seconds of bench/backends.py on the tiny model: two backends behind the real daemon, and one of
them killed half-way.  Checks that the bench runs and records what its report needs; not the benchmark.
"""

from __future__ import annotations

import json

import pytest

from bench import backends

pytestmark = pytest.mark.llama


def test_backends_bench_runs_and_survives_a_killed_backend(tmp_path):
    out = tmp_path / "out"
    summaries = backends.main([
        "--model", "tiny", "--configs", "two,failover", "--users", "4", "--turns", "2",
        "--context-tokens", "2500", "--answer-tokens", "8", "--quiet-wait", "0",
        "--workdir", str(tmp_path / "work"), "--out", str(out),
    ])
    two, failover = summaries
    for summary in summaries:
        assert summary["errors"] == 0, summary["error_messages"]
        assert summary["prefill"] > 0 and summary["oracle"] > 0
        assert sum(summary["requests_by_backend_header"].values()) == 8
        # /status also counts a failed attempt on the killed backend before the request went elsewhere
        assert sum(summary["requests_by_backend_status"].values()) >= 8
    assert set(two["requests_by_backend_header"]) == {"0", "1"}
    f = failover["failover"]
    assert f["turns_after"] == 4 and f["errors_after"] == 0
    assert f["users_homed_on_killed"] == len(f["their_first_turn_after"])
    assert all(t["backend"] == 0 for t in f["their_first_turn_after"])  # the survivor served them
    results = json.loads((out / "backends.json").read_text())
    assert [r["layout"]["key"] for r in results["runs"]] == ["two", "failover"]
    assert "| `failover` |" in (out / "backends.md").read_text()
