"""
How long a disk-cache lookup (C{Index.best}) takes with a large index.

Builds a deterministic index of C{--entries} saved conversations (default
10,000, 20-600 blocks each, all behind one shared system-prompt block, some
forks of others) and times lookups of requests that continue a saved
conversation, fork one, or match nothing: the median in microseconds, with
the maps (new) and with a scan of every entry (the old way), and how many
entries each lookup compared.

    python bench/index_lookup.py [--entries N] [--lookups N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxycache.cache import Index, MetaEntry  # noqa: E402
from proxycache.routing import Fingerprint  # noqa: E402

MODEL, BACKEND, MIN_RATIO = "model", "backend", 0.85
SYSTEM = 12345  # the first block every conversation shares


def chain(conversation: int, length: int) -> tuple[int, ...]:
    return (SYSTEM,) + tuple(hash((conversation, i)) for i in range(1, length))


def build(n: int, rng: random.Random) -> tuple[Index, list[tuple[int, ...]]]:
    index, saved = Index(), []
    for i in range(n):
        if saved and rng.random() < 0.2:  # a fork: an earlier conversation's start, then its own blocks
            parent = rng.choice(saved)
            cut = rng.randrange(1, len(parent))
            blocks = parent[:cut] + tuple(hash((i, j)) for j in range(cut, cut + rng.randrange(1, 200)))
        else:
            blocks = chain(i, rng.randrange(20, 600))
        saved.append(blocks)
        index.put(MetaEntry(f"{i:016x}", BACKEND, MODEL, Fingerprint(blocks, 1, 1), 1, 1, 0.0, float(i)))
    return index, saved


def scan_best(index: Index, fp: Fingerprint) -> tuple[MetaEntry, int, float] | None:
    """The lookup as it was before the maps: every entry compared."""
    best = None
    for entry in index.entries.values():
        if entry.ineffective or entry.model != MODEL or entry.backend != BACKEND:
            continue
        common = fp.common_blocks(entry.fingerprint)
        if common == 0:
            continue
        ratio = common / min(len(fp.blocks), len(entry.fingerprint.blocks))
        if ratio >= MIN_RATIO and (best is None or (common, entry.last_used) > (best[1], best[0].last_used)):
            best = (entry, common, ratio)
    return best


def requests(saved: list[tuple[int, ...]], count: int, rng: random.Random) -> dict[str, list[Fingerprint]]:
    def continued() -> Fingerprint:
        blocks = rng.choice(saved)
        return Fingerprint(blocks + tuple(rng.getrandbits(60) for _ in range(rng.randrange(1, 20))), 1, 1)

    def forked() -> Fingerprint:
        blocks = rng.choice(saved)
        cut = rng.randrange(1, len(blocks))
        return Fingerprint(blocks[:cut] + tuple(rng.getrandbits(60) for _ in range(len(blocks) - cut)), 1, 1)

    def unknown() -> Fingerprint:
        return Fingerprint((SYSTEM,) + tuple(rng.getrandbits(60) for _ in range(rng.randrange(20, 600))), 1, 1)

    return {name: [make() for _ in range(count)] for name, make in
            (("continues a saved one", continued), ("forks a saved one", forked), ("new conversation", unknown))}


def median_us(lookup, fps: list[Fingerprint]) -> float:
    times = []
    for fp in fps:
        started = time.perf_counter()
        lookup(fp)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--lookups", type=int, default=200)
    args = parser.parse_args()
    rng = random.Random(1)
    index, saved = build(args.entries, rng)
    print(f"{len(index)} entries, {sum(len(e.fingerprint.blocks) for e in index)} blocks")
    print(f"{'request':<24} {'maps µs':>10} {'scan µs':>10} {'entries compared':>18}")
    for name, fps in requests(saved, args.lookups, rng).items():
        for fp in fps:  # same answers both ways
            new, old = index.best(fp, MODEL, [BACKEND], MIN_RATIO), scan_best(index, fp)
            assert (new and new[1:]) == (old and old[1:]), (new, old)
        index.touched = 0
        new_us = median_us(lambda fp: index.best(fp, MODEL, [BACKEND], MIN_RATIO), fps)
        touched = index.touched / len(fps)
        old_us = median_us(lambda fp: scan_best(index, fp), fps[: max(1, len(fps) // 10)])
        print(f"{name:<24} {new_us:>10.1f} {old_us:>10.1f} {touched:>12.1f} of {len(index)}")


if __name__ == "__main__":
    main()
