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


# -- issue 24: in time, at the context length --------------------------------------


def test_prefill_time_grows_with_the_position_of_the_tokens():
    # llama.cpp's timings from a model whose token at position n costs 100 us + 10 ns * n
    speeds = Speeds()
    a, b = 1e-4, 1e-8

    def truth(start: int, end: int) -> float:
        return a * (end - start) + b * (end * end - start * start) / 2

    for cache_n, prompt_n in ((0, 2000), (0, 30_000), (28_000, 2_000), (2000, 500), (10_000, 4000)):
        speeds.observe_prefill(prompt_n, truth(cache_n, cache_n + prompt_n) * 1000, cache_n)
    # 2000 tokens at the end of a 30k context cost far more than the first 2000
    assert abs(speeds.prefill_seconds(28_000, 30_000) - truth(28_000, 30_000)) < 0.01
    assert abs(speeds.prefill_seconds(0, 2000) - truth(0, 2000)) < 0.01
    assert speeds.prefill_seconds(28_000, 30_000) > 3 * speeds.prefill_seconds(0, 2000)
    assert speeds.prefill_seconds(100, 100) == 0


def test_prefill_at_one_context_length_fits_a_flat_rate():
    speeds = Speeds()
    for _ in range(3):
        speeds.observe_prefill(4000, 2000.0)  # 2000 tok/s, all from an empty cache
    assert abs(speeds.prefill_seconds(0, 4000) - 2.0) < 1e-6


def test_kv_bytes_per_token_are_learnt_from_saves_and_restores():
    speeds = Speeds()
    assert speeds.size_of(1000) is None
    speeds.observe_save(131_072_000, 500.0, 1000)  # a 7B-class model: 128 KiB a token
    assert speeds.size_of(30_000) == 30_000 * 131_072
    speeds.observe_restore(10, 1.0, 0)  # says nothing
    assert speeds.bytes_per_token == 131_072


def test_a_sibling_tail_of_65_tokens_is_recomputed_not_saved():
    # 30,000 tokens of 128 KiB: a 3.9 GB file, 3.3 s to write at 1.2 GB/s; 65 tokens at position 30k
    # cost ~0.05 s to compute again
    speeds = Speeds(write_bytes_per_second=1.2e9, read_bytes_per_second=2e9)
    speeds.observe_save(131_072_000, 110.0, 1000)
    for cache_n, prompt_n in ((0, 2000), (0, 30_000), (28_000, 2_000)):
        speeds.observe_prefill(prompt_n, (1e-4 * prompt_n + 1e-8 * ((cache_n + prompt_n) ** 2 - cache_n**2) / 2) * 1000,
                               cache_n)
    assert not speeds.keep_pays(30_065, 30_000, saved=False)
    # keeping it costs 3.3 s of save and 2 s of restore: a team member's 20,000 private tokens
    # after a shared 10,000 are worth it (6 s to compute there), 8,000 after 22,000 not (2.9 s)
    assert speeds.keep_pays(30_000, 10_000, saved=False)
    assert not speeds.keep_pays(30_000, 22_000, saved=False)
    # already saved: only the restore counts
    assert speeds.keep_pays(30_000, 20_000, saved=True)  # 3.5 s to compute
    assert not speeds.keep_pays(30_000, 28_500, saved=True)  # 0.6 s


def test_a_restore_is_judged_against_what_the_slot_keeps_in_place():
    speeds = Speeds(read_bytes_per_second=1e9, prefill_tokens_per_second=1000)
    # 10,000 tokens, 1.3 GB (1.35 s to read): against 0 in place it pays (10 s), against 9 of 10 blocks not (1 s)
    assert speeds.restore_pays(10_000, 1_300_000_000, 10, 10)
    assert not speeds.restore_pays(10_000, 1_300_000_000, 10, 10, have_blocks=9)
    assert not speeds.restore_pays(10_000, 1_300_000_000, 10, 10, have_blocks=10)


def test_a_save_on_a_requests_path_counts_that_the_branch_may_not_come_back():
    # Issue 24, measured on the bench model (4 KiB a token) on a loaded machine, 2 slots: a sibling's
    # slot, 16,100 tokens of which 16,000 are the shared context, taken over by the next sibling.
    # The save (66 MB) took 0.16 s, the restore would take 0.1 s; the 100-token tail costs 0.35 s to
    # compute again at position 16k (the load makes prefill slow, not the page cache).
    speeds = Speeds(write_bytes_per_second=400e6, read_bytes_per_second=1e9, bytes_per_token=4096,
                    save_overhead=0.01, restore_overhead=0.05)
    a, b = 5e-4, 1.875e-7  # seconds a token at position n: a + b*n (3.5 ms at 16k)
    for cache_n, prompt_n in ((0, 16_000), (0, 2_000)):
        speeds.observe_prefill(prompt_n, (a * prompt_n + b * ((cache_n + prompt_n) ** 2 - cache_n**2) / 2) * 1000,
                               cache_n)
    assert 0.3 < speeds.prefill_seconds(16_000, 16_100) < 0.4
    # judged as if it came back for sure, the save pays (0.18 + 0.12 < 0.35 s): off the path, it may run
    assert speeds.keep_pays(16_100, 16_000, saved=False)
    # on a request's path the save is paid for certain, the recompute avoided only if it comes back
    assert not speeds.keep_pays(16_100, 16_000, saved=False, odds=0.5)
    # a team member's 4,000 own tokens after the shared 12,000 are still worth it on the way
    assert speeds.keep_pays(16_100, 12_000, saved=False, odds=0.5)
