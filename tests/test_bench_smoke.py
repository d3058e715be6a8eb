"""
A tiny run of the benchmark's workload driver through the real daemon: the
driver works and records everything the report needs.  Not the benchmark.
"""

from __future__ import annotations

from proxycache.testing import ProxyProcess
from proxycache.testing.workload import Workload, oracle_prefill, run

# Thresholds scaled to ~300-token contexts, so turns are not "small" requests.
LIMITS = dict(min_prefix_chars=200, min_prefix_words=30, min_prefix_blocks=2)


def test_workload_driver_records_every_request(llama, tmp_path):
    proxy = ProxyProcess(tmp_path, llama.url, slot_save_path=str(llama.save_dir), **LIMITS).start()
    try:
        workload = Workload(users=2, context_tokens=300, turns=2, question_tokens=40,
                            answer_tokens=4, side_calls=1, side_tokens=60, ascii_answers=True)
        records = run(proxy.url + "/v1", workload)
    finally:
        proxy.stop()

    assert [(r.user, r.turn, r.kind) for r in records] == [
        (user, turn, kind) for turn in range(2) for user in range(2) for kind in ("turn", "side")
    ]
    for r in records:
        assert r.error is None, r
        assert 0 < r.ttft <= r.seconds, r
        assert r.prompt_n is not None and r.cache_n is not None and r.prompt_ms is not None, r
        assert r.prompt_tokens >= r.prompt_n + r.cache_n - 1 > 0, r
        assert r.completion_tokens, r
        assert r.decision in ("hit", "miss", "restore", "small"), r
        assert r.slot is not None, r
    turns = [r for r in records if r.kind == "turn"]
    assert [r.decision for r in turns[:2]] == ["miss", "miss"]
    assert all(r.cache_n > 300 for r in turns[2:]), turns  # each user's context was reused
    assert 0 < oracle_prefill(records) <= sum(r.prompt_tokens for r in records)


def test_index_lookup_bench_runs(capsys):
    import sys

    from bench import index_lookup

    argv, sys.argv = sys.argv, ["index_lookup", "--entries", "200", "--lookups", "5"]
    try:
        index_lookup.main()  # asserts that the maps and the scan agree
    finally:
        sys.argv = argv
    assert "new conversation" in capsys.readouterr().out
