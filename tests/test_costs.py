"""
The routing layer's cost model and reconciliation: whether a restore pays,
and whether llama.cpp reused what the plan expected.
"""

from __future__ import annotations

from proxycache.routing import Decision, DiskMatch, Fingerprint, Plan, Request, SlotId, Speeds, fell_short


def entry(tokens: int, size: int, blocks: int = 10) -> tuple[int, int, int]:
    """A saved cache of C{tokens} in C{size} bytes over C{blocks} blocks."""
    return tokens, size, blocks


def test_restoring_a_long_prefix_pays():
    speeds = Speeds(read_bytes_per_second=400e6, prefill_tokens_per_second=1000)
    assert speeds.restore_pays(*entry(30_000, 120_000_000), common_blocks=10)  # 0.35 s vs 30 s


def test_recomputing_a_tiny_prefix_is_cheaper():
    speeds = Speeds(read_bytes_per_second=400e6, prefill_tokens_per_second=5000)
    assert not speeds.restore_pays(*entry(100, 400_000), common_blocks=10)  # 0.05 s vs 0.02 s


def test_only_the_shared_part_counts():
    speeds = Speeds(read_bytes_per_second=100e6, prefill_tokens_per_second=1000)
    big = entry(10_000, 100_000_000)
    assert speeds.restore_pays(*big, common_blocks=10)  # 1 s vs 10 s
    assert not speeds.restore_pays(*big, common_blocks=1)  # 1 s vs 1 s


def test_speeds_follow_measurements():
    speeds = Speeds(read_bytes_per_second=100e6, prefill_tokens_per_second=100)
    for _ in range(20):
        speeds.observe_prefill(2000, 1000.0)  # 2000 tok/s
        speeds.observe_restore(200_000_000, 500.0)  # 400 MB/s
    assert 1900 < speeds.prefill_tokens_per_second < 2100
    assert 390e6 < speeds.read_bytes_per_second < 410e6
    speeds.observe_prefill(1, 50.0)  # a one-token prompt says nothing about prefill speed
    assert 1900 < speeds.prefill_tokens_per_second < 2100


def test_fell_short_flags_a_stale_slot_map():
    fp = Fingerprint(tuple(range(1, 11)), 1000, 160)
    hit = Plan(Decision.HIT, SlotId("b", 0), common_blocks=9)
    request = Request(fp, small=False)
    assert not fell_short(hit, request, cache_n=900, prompt_n=100)
    assert fell_short(hit, request, cache_n=0, prompt_n=1000)
    miss = Plan(Decision.MISS, SlotId("b", 0))
    assert not fell_short(miss, request, cache_n=0, prompt_n=1000)


def test_reused_unplanned_spots_llama_servers_own_cache():
    from proxycache.routing import reused_unplanned

    miss = Plan(Decision.MISS, SlotId("b", 0))
    assert reused_unplanned(miss, cache_n=3000, prompt_n=40)
    assert not reused_unplanned(miss, cache_n=10, prompt_n=3000)
    assert not reused_unplanned(Plan(Decision.HIT, SlotId("b", 0), 9), cache_n=3000, prompt_n=40)


def test_a_restore_after_a_long_reply_is_judged_on_the_prompt_it_serves():
    # The entry holds 1000 prompt tokens and a 3000-token reply (n_restored = 4000); the next
    # prompt shares the 1000 prompt tokens (and the reply, re-tokenized differently): llama.cpp
    # reuses 1000 and computes 3100.  That is a good restore, not an ineffective one.
    fp = Fingerprint(tuple(range(1, 11)), 1000, 160)
    restore = Plan(Decision.RESTORE, SlotId("b", 0), common_blocks=3, restore=DiskMatch("ab" * 8, "b", 3, 1.0))
    assert not fell_short(restore, Request(fp, small=False), cache_n=1000, prompt_n=3100)
    assert fell_short(restore, Request(fp, small=False), cache_n=1, prompt_n=4100)


def test_fork_pays_counts_the_save_only_when_the_slot_is_unsaved():
    speeds = Speeds(read_bytes_per_second=1e9, prefill_tokens_per_second=1000, write_bytes_per_second=100e6)
    # 12,000 shared tokens of a 14,000-token slot, 56 MB: recompute 12 s; save 0.61 s + restore 0.11 s
    assert speeds.fork_pays(14_000, 56_000_000, 14, 12, saved=False)
    # a 200-token shared prefix: 0.2 s of recompute, less than the save
    assert not speeds.fork_pays(14_000, 56_000_000, 70, 1, saved=False)
    # already saved: only the restore (0.106 s) counts
    assert speeds.fork_pays(14_000, 56_000_000, 140, 2, saved=True)
    # KV size unknown (nothing saved yet): only fixed costs, 0.1 s
    assert speeds.fork_pays(14_000, None, 140, 2, saved=False)  # 0.2 s of recompute
    assert not speeds.fork_pays(14_000, None, 140, 1, saved=False)  # 0.1 s


def test_speeds_follow_save_measurements():
    speeds = Speeds(write_bytes_per_second=100e6)
    for _ in range(30):
        speeds.observe_save(300_000_000, 1000.0)
    assert 290e6 < speeds.write_bytes_per_second < 310e6
    speeds.observe_save(10, 1000.0)  # too small to say anything
    assert 290e6 < speeds.write_bytes_per_second < 310e6
