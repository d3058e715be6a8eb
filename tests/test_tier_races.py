"""
The disk tier's writes of one key, in process: a fake thread pool runs the
blocking file work in the worst order, to show that a drop or a newer save
is never undone by a write that was pending when it happened.
"""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from proxycache.backend import IdleSlot, Restored, Saved
from proxycache.cache import Catalog, DiskTier, MetaEntry, load_index, write_meta
from proxycache.config import Config
from proxycache.routing import Fingerprint
from proxycache.slots import Scheduler
from tests.fakes import FakeBackend, put

MODEL = "m0del"
Usage = namedtuple("Usage", "total used free")


class Threads:
    """C{to_thread} whose calls run only when the test says, newest first."""

    def __init__(self) -> None:
        self.pending: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((d, f, args))
        return d

    def run_newest_first(self) -> None:
        while self.pending:
            d, f, args = self.pending.pop()
            try:
                result = f(*args)
            except Exception as e:  # noqa: BLE001 - handed to the caller's errback
                d.errback(e)
            else:
                d.callback(result)


def make_tier(tmp_path: Path) -> tuple[DiskTier, Threads]:
    config = Config.load({"meta_dir": str(tmp_path / "meta"), "slot_save_path": str(tmp_path / "saves")}, environ={})
    (tmp_path / "saves").mkdir()
    clock = Clock()
    catalog = Catalog(min_ratio=0.85)
    scheduler = Scheduler(clock, min_ratio=0.85, affinity_wait=1.0, max_queue=4, disk_lookup=catalog.lookup)
    threads = Threads()
    return DiskTier(config, clock, scheduler, {}, catalog, to_thread=threads), threads


def saved_entry(tier: DiskTier, key: str = "0123456789abcdef", last_used: float = 1.0) -> MetaEntry:
    entry = MetaEntry(key, "b", MODEL, Fingerprint((1, 2, 3), 300, 48), 100, 4096, 1.0, last_used)
    write_meta(tier.store.meta_dir, entry)
    assert tier.store.save_dir is not None
    # as llama.cpp writes it: its magic, the size saved (a file of another size is not restored)
    (tier.store.save_dir / entry.filename).write_bytes(b"qsgg" + bytes(entry.bytes - 4))
    tier.index.put(entry)
    return entry


def test_a_drop_during_a_pending_meta_write_is_not_undone(tmp_path):
    tier, threads = make_tier(tmp_path)
    entry = saved_entry(tier)
    tier.store.update(entry, last_used=2.0)  # a restore touched it: its meta write waits for a thread
    updated = tier.index.entries[entry.key]
    dropped = Deferred.fromCoroutine(tier.store.drop(updated))  # the budget drops it meanwhile
    threads.run_newest_first()  # the removal would run before the pending write
    assert dropped.called
    assert entry.key not in tier.index.entries
    assert not (tier.store.meta_dir / f"{entry.key}.meta").exists()  # no meta came back
    assert not (tmp_path / "saves" / entry.filename).exists()


def test_an_update_of_a_replaced_entry_does_not_undo_the_newer_one(tmp_path):
    tier, threads = make_tier(tmp_path)
    old = saved_entry(tier, last_used=1.0)
    newer = MetaEntry(old.key, "b", MODEL, Fingerprint((1, 2, 3, 4), 400, 64), 150, 5000, 1.0, 3.0)
    write_meta(tier.store.meta_dir, newer)
    tier.index.put(newer)  # a save of the next turn landed while a restore of the old one finished
    tier.store.update(old, last_used=2.0)
    Deferred.fromCoroutine(tier.store.drop(old))  # a budget decision about the old one
    threads.run_newest_first()
    assert tier.index.entries[old.key] is newer
    assert load_index(tier.store.meta_dir, tier.store.save_dir).entries == [newer]


def test_a_drop_waits_for_a_write_in_progress_and_skips_a_newer_entry(tmp_path):
    tier, threads = make_tier(tmp_path)
    entry = saved_entry(tier)
    tier.store.update(entry, last_used=2.0)
    touched = tier.index.entries[entry.key]
    tier.store.update(touched, last_used=3.0)  # a second update queues behind the first
    latest = tier.index.entries[entry.key]
    threads.run_newest_first()
    assert load_index(tier.store.meta_dir, tier.store.save_dir).entries == [latest]
    assert not tier.store._key_locks  # no lock left behind


def test_stray_cache_files_are_counted(tmp_path):
    tier, threads = make_tier(tmp_path)
    saved_entry(tier)
    (tmp_path / "saves" / "slotcache_00000000deadbeef.bin").write_bytes(b"kv")  # no meta
    tier.index.remove("0123456789abcdef")
    tier.startService()
    threads.run_newest_first()
    assert tier.loaded.called
    assert tier.counters.stray_files == 1 and len(tier.index) == 1


def test_an_unexpected_error_in_a_background_save_is_logged_and_frees_the_slot(tmp_path):
    from twisted.logger import globalLogPublisher

    from proxycache.routing import SlotId, SlotState
    from proxycache.slots import Slot, SlotContent

    tier, threads = make_tier(tmp_path)
    tier.backends = {"b": FakeBackend(url="b", idle=RuntimeError("something nobody expected"))}
    tier.catalog.backend_up("b", MODEL)
    tier.store.disk_usage = lambda path: Usage(total=100 * 2**30, used=0, free=50 * 2**30)
    slot = put(tier.scheduler, Slot(SlotId("b", 0), content=SlotContent(SlotState.HOT, Fingerprint((5, 6), 200, 32), tokens=300)))
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        tier.background.schedule(slot.id)
        tier.clock.advance(tier.background.delay(slot.content))  # a size not yet measured: 4x
        threads.run_newest_first()  # the free-space check
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert not tier.scheduler.slots[slot.id].busy
    (logged,) = [e for e in events if "background save" in e.get("log_format", "")]
    assert logged["log_failure"].check(RuntimeError)


def _tier_on(tmp_path: Path) -> tuple[DiskTier, Threads, FakeBackend]:
    """A tier whose one backend, "b", runs MODEL, holds 300 tokens in each idle slot and answers every slot action."""
    tier, threads = make_tier(tmp_path)
    backend = FakeBackend(url="b", idle=IdleSlot(used=True, tokens=300), saved=Saved(tokens=300, bytes=4096, ms=1.0),
                          restored=Restored(tokens=100, bytes=4096, ms=1.0))
    tier.backends = {"b": backend}  # type: ignore[dict-item]
    tier.catalog.backend_up("b", MODEL)
    tier.store.disk_usage = lambda path: Usage(total=100 * 2**30, used=0, free=50 * 2**30)
    return tier, threads, backend


def test_a_restore_right_after_the_eviction_save_does_not_ask_llama_again_whether_the_slot_is_idle(tmp_path):
    # Every request to llama.cpp's task loop waits for a batch of the other slots: an eviction and a
    # restore take three of them (is it idle and what does it hold; save; restore), not four.  (Which
    # process answers, /props, is asked around each action: not a task.)
    from proxycache.routing import Decision, DiskMatch, Plan, Request, SlotId, SlotState
    from proxycache.slots import Lease, Slot, SlotContent

    tier, threads, backend = _tier_on(tmp_path)
    entry = saved_entry(tier)
    evicted = SlotContent(SlotState.HOT, Fingerprint((5, 6), 200, 32), tokens=300)
    slot = Slot(SlotId("b", 0), content=evicted)
    request = Request(Fingerprint((1, 2, 3, 4), 400, 64), small=False)
    plan = Plan(Decision.RESTORE, slot.id, common_blocks=3, similarity=0.75, evicts=True,
                restore=DiskMatch(entry.key, "b", 3, 0.75))
    lease = Lease(slot, plan, request, waited=0.0, previous=evicted)
    assert _run(threads, tier._prepare(lease)) is Decision.RESTORE
    assert [asked for asked in backend.asked if asked != "props"] == ["slots", "save", "restore"]


def _three_hot_slots(tmp_path: Path) -> tuple[DiskTier, Threads, FakeBackend, list[Any]]:
    from proxycache.routing import SlotId, SlotState
    from proxycache.slots import Slot, SlotContent

    tier, threads, backend = _tier_on(tmp_path)
    slots = []
    for index in range(3):
        content = SlotContent(SlotState.HOT, Fingerprint((10 * index + 1, 10 * index + 2), 200, 32), tokens=300)
        slots.append(put(tier.scheduler, Slot(SlotId("b", index), content=content, last_used=float(index))))
    return tier, threads, backend, slots


def _lease_taking(tier: DiskTier, slot: Any) -> Any:
    """A request for another conversation that took C{slot} (evicting what it held)."""
    from proxycache.routing import Decision, Plan, Request
    from proxycache.slots import Lease

    assert tier.scheduler.try_hold(slot.id) is not None
    request = Request(Fingerprint((7, 8, 9), 300, 48), small=False)
    return Lease(slot, Plan(Decision.MISS, slot.id, evicts=True), request, waited=0.0, previous=slot.content)


def _run(threads: Threads, work: Any) -> Any:
    d = Deferred.fromCoroutine(work)
    while not d.called:
        threads.run_newest_first()
    return d.result


def test_a_contended_backend_saves_the_next_victim_while_a_request_decodes(tmp_path):
    # Like a page cleaner: the save runs while llama.cpp generates, not on the next request's way.
    tier, threads, backend, slots = _three_hot_slots(tmp_path)
    lease = _lease_taking(tier, slots[2])
    _run(threads, tier._prepare(lease))  # slot 2 is taken from another conversation: saved first
    assert backend.calls == [("save", 2)]
    tier.decoding(lease)
    threads.run_newest_first()
    assert backend.calls == [("save", 2), ("save", 0)]  # the least recently used idle slot
    victim = tier.scheduler.slots[slots[0].id]
    assert victim.content.saved_key is not None and not victim.busy
    tier.decoding(lease)  # a spare is kept: nothing more to save
    assert backend.calls == [("save", 2), ("save", 0)]


def test_no_early_save_on_a_backend_that_evicts_nobody(tmp_path):
    from proxycache.routing import Decision, Plan, Request
    from proxycache.slots import Lease

    tier, threads, backend, slots = _three_hot_slots(tmp_path)
    assert tier.scheduler.try_hold(slots[2].id) is not None
    hit = Lease(slots[2], Plan(Decision.HIT, slots[2].id), Request(slots[2].content.fingerprint, small=False),
                waited=0.0, previous=slots[2].content)
    _run(threads, tier._prepare(hit))
    tier.decoding(hit)
    threads.run_newest_first()
    assert backend.calls == []  # write-behind saves idle slots after its delay, as before


def test_a_backend_without_a_save_directory_is_asked_to_save_once_until_it_restarts(tmp_path):
    from proxycache.backend._actions import refused
    from proxycache.routing import SlotId, SlotState
    from proxycache.slots import Slot, SlotContent

    tier, threads, backend = _tier_on(tmp_path)
    works = backend.saved
    # llama-server's answer without --slot-save-path
    message = "This server does not support slots action. Start it with `--slot-save-path`"
    backend.saved = refused("save", 0, 501, {"error": {"code": 501, "message": message}})
    slot = Slot(SlotId("b", 0), content=SlotContent(SlotState.HOT, Fingerprint((5, 6), 200, 32), tokens=300))
    for _ in range(3):
        assert _run(threads, tier.save(slot, slot.content)) is None
    assert backend.calls == [("save", 0)]
    backend.saved = works
    tier.backend_up("b", MODEL)  # restarted, with --slot-save-path this time
    assert _run(threads, tier.save(slot, slot.content)) is not None
    assert backend.calls == [("save", 0), ("save", 0)]
