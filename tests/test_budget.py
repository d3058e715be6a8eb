"""
The default disk budget: the pure choice, and the tier using it (in process,
with a fake thread pool, disk usage and llama-server).
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any

from twisted.internet.defer import Deferred

from proxycache.backend import IdleSlot, Saved
from proxycache.cache._budget import AUTO_CAP, GiB, auto_budget, headroom
from proxycache.routing import Fingerprint, SlotId, SlotState
from proxycache.slots import Slot, SlotContent
from tests.fakes import FakeBackend
from tests.test_tier_races import MODEL, make_tier

Usage = namedtuple("Usage", "total used free")


def test_auto_budget_is_half_the_usable_space_capped_and_leaves_headroom():
    assert auto_budget(free=100 * GiB, total=500 * GiB, cached=0) == 50 * GiB
    assert auto_budget(free=80 * GiB, total=500 * GiB, cached=20 * GiB) == 50 * GiB  # its own caches count
    assert auto_budget(free=10_000 * GiB, total=20_000 * GiB, cached=0) == AUTO_CAP
    # a nearly full disk: never into the headroom, and never 0 (which would mean unlimited)
    assert auto_budget(free=8 * GiB, total=500 * GiB, cached=0) == 3 * GiB
    assert auto_budget(free=1 * GiB, total=500 * GiB, cached=0) == 1
    # a small disk keeps 10% free rather than 5 GiB
    assert headroom(20 * GiB) == 2 * GiB and headroom(500 * GiB) == 5 * GiB
    assert auto_budget(free=10 * GiB, total=20 * GiB, cached=0) == 5 * GiB


def hot_slot() -> tuple[Slot, SlotContent]:
    content = SlotContent(SlotState.HOT, Fingerprint((7, 8, 9), 300, 48), tokens=500)
    return Slot(SlotId("b", 0), content=content), content


def test_the_tier_chooses_a_budget_at_start_and_saves_only_above_the_headroom(tmp_path):
    tier, threads = make_tier(tmp_path)
    free = [100 * GiB]
    tier.store.disk_usage = lambda path: Usage(500 * GiB, 0, free[0])
    llama = FakeBackend(url="b", idle=IdleSlot(used=True, tokens=500), saved=Saved(tokens=500, bytes=4096, ms=1.0))
    tier.backends = {"b": llama}
    tier.catalog.backend_up("b", MODEL)
    tier.startService()
    threads.run_newest_first()
    assert tier.catalog.max_bytes == 50 * GiB

    slot, content = hot_slot()
    saved = Deferred.fromCoroutine(tier.save(slot, content))
    threads.run_newest_first()
    assert saved.result in tier.index.entries and len(llama.calls) == 1

    free[0] = 4 * GiB  # under the 5 GiB headroom: no save, however often asked
    for _ in range(2):
        skipped = Deferred.fromCoroutine(tier.save(slot, content))
        threads.run_newest_first()
        assert skipped.result is None
    assert len(llama.calls) == 1 and tier.counters.saves_skipped_low_space == 2
    assert tier.counters.save_failures == 0


def _store_over(tmp_path, **settings: Any) -> tuple[Any, Any, dict[str, Any]]:
    """A SavedCaches for backends "a" and "b", each with its own save directory (--backend-save-dirs)."""
    from proxycache.cache import Catalog
    from proxycache.cache._saved_caches import SavedCaches
    from proxycache.config import Config
    from tests.test_tier_races import Threads

    dirs = {name: tmp_path / f"saves-{name}" for name in ("a", "b")}
    for directory in dirs.values():
        directory.mkdir()
    config = Config.load({"meta_dir": str(tmp_path / "meta"), **settings}, environ={})
    catalog = Catalog(min_ratio=0.85, storage={name: str(d) for name, d in dirs.items()})
    threads = Threads()
    return SavedCaches(config, catalog, to_thread=threads), threads, dirs


def _entry(key: str, backend: str, last_used: float, size: int = 4096) -> Any:
    from proxycache.cache import MetaEntry

    return MetaEntry(key, backend, MODEL, Fingerprint((int(key[:4], 16),), 300, 48), 100, size, 1.0, last_used)


def _run(threads: Any, coroutine: Any) -> Any:
    d = Deferred.fromCoroutine(coroutine)
    threads.run_newest_first()
    return d.result


def test_each_backends_files_are_deleted_and_counted_in_its_own_directory(tmp_path):
    store, threads, dirs = _store_over(tmp_path, max_cache_bytes=3 * 4096)
    _run(threads, store.load())
    entries = [_entry(f"{i:04x}aaaaaaaa", "ab"[i % 2], last_used=float(i)) for i in range(5)]
    for entry in entries:
        (dirs[entry.backend] / entry.filename).write_bytes(b"k" * entry.bytes)
        assert _run(threads, store.record(entry))
    _run(threads, store.enforce_budget())
    on_disk = sorted(p.name for d in dirs.values() for p in d.iterdir())
    assert on_disk == sorted(e.filename for e in entries[2:])  # the two oldest went, from their own directory
    assert sum(p.stat().st_size for d in dirs.values() for p in d.iterdir()) <= store.catalog.max_bytes
    assert sorted(p.stem for p in store.meta_dir.iterdir()) == sorted(e.key for e in entries[2:])


def test_a_conversation_saved_by_a_backend_with_other_storage_leaves_no_file_behind(tmp_path):
    store, threads, dirs = _store_over(tmp_path)
    first, then = _entry("1234aaaaaaaa", "a", 1.0), _entry("1234aaaaaaaa", "b", 2.0)
    for entry in (first, then):
        (dirs[entry.backend] / entry.filename).write_bytes(b"kv")
        assert _run(threads, store.record(entry))
    assert not (dirs["a"] / first.filename).exists() and (dirs["b"] / then.filename).exists()


def test_start_up_reconciles_each_entry_with_its_own_backends_directory(tmp_path):
    from proxycache.cache import write_meta

    store, threads, dirs = _store_over(tmp_path, slot_save_path=str(tmp_path / "saves-a"))
    kept = [_entry("1111aaaaaaaa", "a", 1.0), _entry("2222aaaaaaaa", "b", 1.0)]
    gone = _entry("3333aaaaaaaa", "b", 1.0)  # its file is in the other backend's directory: not its own
    for entry in kept + [gone]:
        write_meta(store.meta_dir, entry)
    for entry, directory in ((kept[0], "a"), (kept[1], "b"), (gone, "a")):
        (dirs[directory] / entry.filename).write_bytes(b"kv")
    store.disk_usage = lambda path: Usage(500 * GiB, 0, 100 * GiB)
    _run(threads, store.load())
    assert sorted(store.index.entries) == sorted(e.key for e in kept)
    assert not (store.meta_dir / f"{gone.key}.meta").exists()
    assert store.catalog.counters.stray_files == 1  # gone's file, in a's directory
    assert store.catalog.max_bytes == auto_budget(100 * GiB, 500 * GiB, 2 * 4096)  # one file system, counted once


def test_a_budget_is_chosen_when_only_backend_directories_are_known(tmp_path):
    store, threads, _ = _store_over(tmp_path)  # --backend-save-dirs without --slot-save-path
    store.disk_usage = lambda path: Usage(500 * GiB, 0, 100 * GiB)
    _run(threads, store.load())
    assert store.catalog.max_bytes == 50 * GiB


def test_an_entry_of_a_backend_no_longer_configured_is_kept_and_its_file_left_alone(tmp_path):
    # each backend has its own directory: where one no longer listed wrote cannot be told
    store, threads, dirs = _store_over(tmp_path, slot_save_path=str(tmp_path / "saves-a"),
                                       backend_save_dirs="a-dir,b-dir", llama_url="http://a,http://b")
    from proxycache.cache import write_meta

    gone = _entry("4444aaaaaaaa", "http://removed", 1.0)
    write_meta(store.meta_dir, gone)
    (dirs["a"] / gone.filename).write_bytes(b"not its file: a's directory is not where it wrote")
    _run(threads, store.load())
    assert list(store.index.entries) == [gone.key]
    _run(threads, store.drop(store.index.entries[gone.key]))
    assert (dirs["a"] / gone.filename).exists() and not (store.meta_dir / f"{gone.key}.meta").exists()
