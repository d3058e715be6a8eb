"""
Saved caches llama.cpp will never restore, in process: which restore failures
drop the entry (its file gone, damaged, or refused twice by the backend that
wrote it) and which keep it (failures that may go away, another backend's
storage).  The same against a real llama.cpp server: tests/test_disk_tier.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.internet.defer import TimeoutError

from proxycache.backend import FailureKind, SlotActionFailed, UpstreamError
from proxycache.backend._actions import refused
from proxycache.cache import MetaEntry
from proxycache.cache._unusable import GONE, SLOT_FILE_MAGIC, Fault, file_fault
from proxycache.routing import Decision, Fingerprint
from tests.fakes import FakeBackend
from tests.test_identity_tier import restore_lease
from tests.test_tier_races import MODEL, _run, _tier_on

# What b11434 and b11549 answer to a restore of a missing, truncated, garbage or foreign file alike.
UNABLE = refused("restore", 0, 400, {"error": {"code": 400, "message": "Unable to restore slot: No available space "
                                               "in KV cache or invalid slot save file"}})
SIZE = 4096


def slot_file(path: Path, size: int = SIZE) -> None:
    path.write_bytes(SLOT_FILE_MAGIC + b"\0" * (size - len(SLOT_FILE_MAGIC)))


def entry_on_disk(tier, key: str = "0123456789abcdef") -> MetaEntry:
    entry = MetaEntry(key, "b", MODEL, Fingerprint((1, 2, 3), 300, 48), 100, SIZE, 1.0, 1.0)
    tier.index.put(entry)
    (tier.store.meta_dir).mkdir(parents=True, exist_ok=True)
    (tier.store.meta_dir / f"{key}.meta").write_text("{}")
    if tier.store.save_dir is not None:
        slot_file(tier.store.save_dir / entry.filename)
    return entry


def restore(tier, threads, key: str, backend: str = "b") -> Decision:
    return _run(threads, tier._prepare(restore_lease(key, backend)))


# -- the file, looked at ----------------------------------------------------------------


def test_a_file_is_judged_by_presence_size_and_magic(tmp_path):
    path = tmp_path / "slotcache_x.bin"
    assert file_fault(path, SIZE) is GONE
    slot_file(path)
    assert file_fault(path, SIZE) is None
    assert file_fault(path, 0) is None  # size not known: the magic alone
    path.write_bytes(path.read_bytes()[: SIZE // 2])  # a save cut short (disk full): removed with the entry
    assert file_fault(path, SIZE) == Fault("its file has 2048 bytes, 4096 were saved (cut short)")
    assert file_fault(path, SIZE, read_head=False) is not None  # told before a restore: llama.cpp may abort on it
    slot_file(path, 2 * SIZE)  # written over (another proxy sharing the directory?): not removed
    fault = file_fault(path, SIZE, read_head=False)
    assert fault is not None and "8192 bytes" in fault.why and not fault.remove
    path.write_bytes(os.urandom(SIZE))  # same size, not a slot file (zeros after a crash, garbage)
    assert file_fault(path, SIZE, read_head=False) is None  # only once llama.cpp refused it
    fault = file_fault(path, SIZE)
    assert fault is not None and "not a llama.cpp slot file" in fault.why and fault.remove
    path.write_bytes(b"")
    assert file_fault(path, 0) is not None
    path.unlink()
    os.mkfifo(path)  # a FIFO does not hang the reader, and is left alone
    fault = file_fault(path, SIZE)
    assert fault is not None and "not a regular file" in fault.why and not fault.remove


# -- the tier: dropped ---------------------------------------------------------------------


def test_a_file_gone_from_the_save_directory_is_dropped_without_asking_llama(tmp_path):
    tier, threads, backend = _tier_on(tmp_path)
    entry = entry_on_disk(tier)
    (tier.store.save_dir / entry.filename).unlink()  # an operator cleaned up, another proxy's budget
    assert restore(tier, threads, entry.key) is Decision.MISS
    assert ("restore", 0) not in backend.calls  # no round trip, the slot not cleared
    assert entry.key not in tier.index.entries
    assert not (tier.store.meta_dir / f"{entry.key}.meta").exists()
    assert (tier.counters.restore_failures, tier.counters.dropped_unusable) == (1, 1)


@pytest.mark.parametrize("damage", ["truncated", "empty", "longer"])
def test_a_file_of_another_size_than_saved_is_dropped_without_asking_llama(tmp_path, damage):
    # Some truncated files abort llama-server (GGML_ASSERT(nread <= state_size), b11434 and b11549).
    tier, threads, backend = _tier_on(tmp_path)
    entry = entry_on_disk(tier)
    path = tier.store.save_dir / entry.filename
    path.write_bytes({"truncated": path.read_bytes()[:100], "empty": b"", "longer": SLOT_FILE_MAGIC * SIZE}[damage])
    assert restore(tier, threads, entry.key) is Decision.MISS
    assert ("restore", 0) not in backend.calls
    assert entry.key not in tier.index.entries and not (tier.store.meta_dir / f"{entry.key}.meta").exists()
    assert path.exists() == (damage == "longer")  # a longer one may be another writer's: left alone
    assert (tier.counters.restore_failures, tier.counters.dropped_unusable) == (1, 1)


def test_a_refused_file_that_is_not_a_slot_file_is_dropped_with_its_file_at_the_first_refusal(tmp_path):
    tier, threads, backend = _tier_on(tmp_path)
    backend.restored = UNABLE
    entry = entry_on_disk(tier)
    path = tier.store.save_dir / entry.filename
    path.write_bytes(os.urandom(SIZE))  # the right size, garbage (zeros after a crash, a disk error)
    assert restore(tier, threads, entry.key) is Decision.MISS
    assert backend.calls.count(("restore", 0)) == 1
    assert entry.key not in tier.index.entries
    assert not path.exists() and not (tier.store.meta_dir / f"{entry.key}.meta").exists()
    assert (tier.counters.restore_failures, tier.counters.dropped_unusable) == (1, 1)


def test_a_file_that_looks_whole_is_dropped_when_its_own_backend_refuses_it_twice_in_a_row(tmp_path):
    # Another shape's file of the same size, or no room: a first refusal may be the room (a unified KV cache
    # full of other slots), which may go away; a second in a row is taken as lasting.
    tier, threads, backend = _tier_on(tmp_path)
    backend.restored = UNABLE
    entry = entry_on_disk(tier)
    assert restore(tier, threads, entry.key) is Decision.MISS
    assert tier.index.entries[entry.key] is entry and tier.counters.dropped_unusable == 0
    assert restore(tier, threads, entry.key) is Decision.MISS
    assert entry.key not in tier.index.entries and tier.counters.dropped_unusable == 1
    assert not (tier.store.save_dir / entry.filename).exists()
    assert restore(tier, threads, entry.key) is Decision.MISS
    assert backend.calls.count(("restore", 0)) == 2  # not a third time


def test_a_restore_between_two_refusals_or_a_newer_save_starts_the_count_again(tmp_path):
    tier, threads, backend = _tier_on(tmp_path)
    good = backend.restored
    entry = entry_on_disk(tier)
    backend.restored = UNABLE
    restore(tier, threads, entry.key)
    backend.restored = good
    assert restore(tier, threads, entry.key) is Decision.RESTORE
    backend.restored = UNABLE
    restore(tier, threads, entry.key)
    assert entry.key in tier.index.entries  # refused twice, not in a row
    newer = entry_on_disk(tier, entry.key)  # the conversation saved again: another file
    restore(tier, threads, newer.key)
    assert tier.index.entries[entry.key] is newer and tier.counters.dropped_unusable == 0


def test_without_the_save_directory_in_sight_two_refusals_in_a_row_drop_it(tmp_path):
    tier, threads, backend = _tier_on(tmp_path)
    tier.store.save_dir = None  # llama-server on another host: only its answers tell
    backend.restored = UNABLE
    entry = entry_on_disk(tier)
    restore(tier, threads, entry.key)
    assert entry.key in tier.index.entries
    restore(tier, threads, entry.key)
    assert entry.key not in tier.index.entries and tier.counters.dropped_unusable == 1


def test_a_server_saying_the_file_is_not_there_drops_it_at_once(tmp_path):
    tier, threads, backend = _tier_on(tmp_path)
    tier.store.save_dir = None
    backend.restored = refused("restore", 0, 404, {"error": {"message": "File Not Found"}})
    entry = entry_on_disk(tier)
    restore(tier, threads, entry.key)
    assert entry.key not in tier.index.entries and tier.counters.dropped_unusable == 1


# -- the tier: kept --------------------------------------------------------------------------


@pytest.mark.parametrize("failure", [
    TimeoutError(),
    SlotActionFailed("restore", 0, None, "Connection refused", FailureKind.UNREACHABLE),
    SlotActionFailed("restore", 0, None, "timed out", FailureKind.TIMEOUT),
    refused("restore", 0, 503, {"error": {"message": "Loading model"}}),
    refused("restore", 0, 500, "oops"),
    refused("restore", 0, 501, {"error": {"message": "This server does not support slots action"}}),
    UpstreamError("a reply cut short"),
])
def test_failures_that_may_go_away_keep_the_entry_however_often(tmp_path, failure):
    tier, threads, backend = _tier_on(tmp_path)
    entry = entry_on_disk(tier)
    (tier.store.save_dir / entry.filename).write_bytes(os.urandom(SIZE))  # damaged, but llama.cpp did not say so
    backend.restored = failure
    for _ in range(3):
        assert restore(tier, threads, entry.key) is Decision.MISS
    assert tier.index.entries[entry.key] is entry
    assert (tier.counters.restore_failures, tier.counters.dropped_unusable) == (3, 0)


def test_a_refusal_by_another_backend_keeps_an_intact_file_but_not_a_damaged_one(tmp_path):
    tier, threads, backend = _tier_on(tmp_path)
    shared = str(tmp_path / "saves")
    other = FakeBackend(url="c", idle=backend.idle, restored=UNABLE)
    tier.backends = {"b": backend, "c": other}  # type: ignore[dict-item]
    tier.catalog.storage.update(b=shared, c=shared)
    tier.catalog.backend_up("c", MODEL)
    entry = entry_on_disk(tier)
    for _ in range(3):  # its storage may not be the writer's after all (a mount, a misconfiguration)
        assert restore(tier, threads, entry.key, backend="c") is Decision.MISS
    assert tier.index.entries[entry.key] is entry and other.calls.count(("restore", 0)) == 3
    path = tier.store.save_dir / entry.filename
    path.write_bytes(path.read_bytes()[:100])  # but a file seen cut short is damaged for everyone
    restore(tier, threads, entry.key, backend="c")
    assert entry.key not in tier.index.entries and not path.exists()


def test_drops_are_counted_on_the_status_page_and_in_the_metrics():
    from tests.fakes import InProcessDaemon

    daemon = InProcessDaemon(FakeBackend())
    daemon.wired.tier.counters.dropped_unusable = 2
    assert daemon.status()["disk"]["dropped_unusable"] == 2
    code, _, metrics = daemon.http("GET", "/metrics")
    assert code == 200 and b"proxycache_disk_dropped_unusable_total 2.0" in metrics
