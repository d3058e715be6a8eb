"""
The disk tier's identity checks in process (issue 20): an entry's key names
the weights and the directory that wrote it, and a restore is judged against
what the target backend runs when the slot action is made, not when planned.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred

from proxycache.backend import IdleSlot, Restored, Saved
from proxycache.cache import Catalog, MetaEntry
from proxycache.cache._entries import entry_key
from proxycache.cache._probed import PROBE_WAIT
from proxycache.routing import Decision, DiskMatch, Fingerprint, Plan, Request, SlotId, SlotState
from proxycache.slots import NOTHING, Lease, Slot, SlotContent
from tests.fakes import put
from tests.test_tier_races import MODEL, _run, _tier_on, saved_entry

OTHER = "other-weights"


def restore_lease(key: str, backend: str = "b") -> Lease:
    slot = Slot(SlotId(backend, 0), busy=True)
    plan = Plan(Decision.RESTORE, slot.id, common_blocks=3, similarity=1.0, restore=DiskMatch(key, "b", 3, 1.0))
    return Lease(slot, plan, Request(Fingerprint((1, 2, 3, 4), 400, 64), small=False), waited=0.0, previous=NOTHING)


def test_a_restore_planned_before_the_backend_changed_weights_is_not_made(tmp_path):
    tier, threads, backend = _tier_on(tmp_path)
    entry = saved_entry(tier)
    held = _run(threads, tier.store.lock_key(entry.key))  # a save of that key is under way
    prepared = Deferred.fromCoroutine(tier._prepare(restore_lease(entry.key)))
    tier.backend_up("b", OTHER)  # meanwhile the backend came back with other weights of the same shape
    tier.store.unlock_key(entry.key, held)
    assert _run(threads, _wait(prepared)) is Decision.MISS
    assert ("restore", 0) not in backend.calls


async def _wait(d):
    return await d


def test_one_conversation_saved_by_two_models_or_into_two_directories_has_two_keys():
    key = entry_key("0123456789abcdef", MODEL, "/saves")
    assert len(key) == 16 and key == entry_key("0123456789abcdef", MODEL, "/saves")
    assert key != entry_key("0123456789abcdef", OTHER, "/saves")
    assert key != entry_key("0123456789abcdef", MODEL, "/elsewhere")
    assert key != entry_key("fedcba9876543210", MODEL, "/saves")


def test_an_entry_is_restorable_where_its_weights_run_and_its_file_is_read():
    catalog = Catalog(min_ratio=0.0, storage={"a": "/saves", "b": "/saves", "c": "/elsewhere"})
    for name in "abc":
        catalog.backend_up(name, MODEL)
    catalog.backend_up("d", OTHER)
    catalog.storage["d"] = "/saves"
    entry = MetaEntry("0123456789abcdef", "a", MODEL, Fingerprint((1, 2), 200, 32), 10, 100, 0.0, 0.0,
                      save_dir="/saves")
    assert [name for name in "abcd" if catalog.restorable_on(entry, name)] == ["a", "b"]
    catalog.backend_up("b", OTHER)  # restarted with other weights
    assert not catalog.restorable_on(entry, "b")


def test_a_save_names_its_directory_and_weights(tmp_path):
    tier, threads, backend = _tier_on(tmp_path)
    tier.catalog.storage["b"] = str(tmp_path / "saves")
    slot = Slot(SlotId("b", 0), content=SlotContent(SlotState.HOT, Fingerprint((5, 6), 200, 32), tokens=300))
    key = _run(threads, tier.save(slot, slot.content))
    assert key == entry_key(slot.content.fingerprint.key, MODEL, str(tmp_path / "saves"))
    entry = tier.index.entries[key]
    assert entry.save_dir == str(tmp_path / "saves") and entry.model == MODEL
    assert MetaEntry.from_json(entry.to_json()) == entry


# -- the process a slot action reaches --------------------------------------

class _Marked:
    """A backend whose /props shows the markers the test scripts, one per call (the last one stays)."""

    name = url = "b"

    def __init__(self, *markers: str | None) -> None:
        self.markers = list(markers)
        self.calls: list[tuple[str, int]] = []

    async def process(self) -> str | None:
        return self.markers.pop(0) if len(self.markers) > 1 else self.markers[0]

    async def wait_until_idle(self, index: int) -> IdleSlot:
        return IdleSlot(used=True, tokens=300)

    async def save_slot(self, index: int, filename: str, timeout: float) -> Saved:
        self.calls.append(("save", index))
        return Saved(tokens=300, bytes=4096, ms=1.0)

    async def restore_slot(self, index: int, filename: str, timeout: float) -> Restored:
        self.calls.append(("restore", index))
        return Restored(tokens=100, bytes=4096, ms=1.0)

    async def erase_slot(self, index: int, timeout: float) -> None:
        self.calls.append(("erase", index))


def _tier_marked(tmp_path, *markers: str | None):
    tier, threads, _ = _tier_on(tmp_path)
    backend = _Marked(*markers)
    tier.backends = {"b": backend}  # type: ignore[dict-item]
    tier.backend_up("b", MODEL, "P1")
    looks: list[bool] = []
    tier.on_empty_slot = lambda: looks.append(True)
    return tier, threads, backend, looks


def hot(index: int = 0) -> Slot:
    return Slot(SlotId("b", index), content=SlotContent(SlotState.HOT, Fingerprint((5, 6), 200, 32), tokens=300))


def test_a_save_in_another_process_than_the_probed_one_is_not_made(tmp_path):
    # llama-server restarted (other weights, perhaps) and the monitor has not looked since
    tier, threads, backend, looks = _tier_marked(tmp_path, "P2")
    slot = hot()
    assert _run(threads, tier.save(slot, slot.content)) is None
    assert backend.calls == [] and looks  # and the monitor looks again
    assert tier.catalog.current_model("b") is None  # until described again
    assert _run(threads, tier.save(slot, slot.content)) is None and backend.calls == []
    tier.backend_up("b", "other-weights", "P2")  # the monitor probed the new process
    key = _run(threads, tier.save(slot, slot.content))
    assert tier.index.entries[key].model == "other-weights" and backend.calls == [("save", 0)]


def test_a_save_the_next_process_may_have_made_is_dropped_with_what_its_key_held(tmp_path):
    tier, threads, backend, looks = _tier_marked(tmp_path, "P1", "P1", "P1", "P2")
    slot = hot()
    key = _run(threads, tier.save(slot, slot.content))  # P1 before and after: kept
    slot = attrs.evolve(slot, content=attrs.evolve(slot.content, lineage=key, tokens=400))
    assert _run(threads, tier.save(slot, slot.content)) is None  # P1 before, P2 after
    assert backend.calls == [("save", 0), ("save", 0)]
    assert key not in tier.index.entries and not (tier.store.meta_dir / f"{key}.meta").exists()
    assert looks


def test_a_restore_around_which_the_process_changed_is_erased_and_recomputed(tmp_path):
    tier, threads, backend, looks = _tier_marked(tmp_path, "P2")
    entry = saved_entry(tier)
    assert _run(threads, tier._prepare(restore_lease(entry.key))) is Decision.MISS
    assert backend.calls == [("restore", 0), ("erase", 0)]
    assert tier.counters.restores == 0 and looks
    assert entry.key in tier.index.entries  # the file is fine: only where it went is not known


def test_nothing_is_saved_or_restored_after_a_sign_of_a_restart_until_described_again(tmp_path):
    tier, threads, backend, looks = _tier_marked(tmp_path, "P1")
    entry = saved_entry(tier)
    tier.identity_lost("b")  # the monitor saw a restart, or the backend went away
    slot = hot(1)
    assert _run(threads, tier.save(slot, slot.content)) is None
    gave_up = Deferred.fromCoroutine(tier._prepare(restore_lease(entry.key)))
    tier.clock.advance(PROBE_WAIT)  # a restore waits that long for the probe, then recomputes
    assert _run(threads, _wait(gave_up)) is Decision.MISS
    assert backend.calls == []
    waited = Deferred.fromCoroutine(tier._prepare(restore_lease(entry.key)))
    assert not waited.called
    tier.backend_up("b", MODEL, "P1")  # probed again: the same weights
    assert _run(threads, _wait(waited)) is Decision.RESTORE
    assert backend.calls == [("restore", 0)]


def _refused_write_behind(tmp_path):
    """A hot idle slot whose write-behind came while the backend's weights were unconfirmed."""
    tier, threads, backend, looks = _tier_marked(tmp_path, "P1")
    slot = put(tier.scheduler, hot())
    tier.identity_lost("b")  # the monitor saw a sign of a restart
    tier.background.schedule(slot.id)
    tier.clock.advance(tier.background.delay(slot.content))  # a size not yet measured: 4x
    threads.run_newest_first()
    assert backend.calls == [] and tier.scheduler.slots[slot.id].content.saved_key is None
    return tier, threads, backend, slot


def test_a_write_behind_refused_while_unconfirmed_is_made_once_the_weights_are_probed(tmp_path):
    tier, threads, backend, slot = _refused_write_behind(tmp_path)
    tier.backend_up("b", MODEL, "P1")  # probed again: the same weights, the same process
    while threads.pending:
        threads.run_newest_first()
    assert backend.calls == [("save", 0)]
    key = tier.scheduler.slots[slot.id].content.saved_key
    assert key is not None and key in tier.index.entries and not tier.scheduler.slots[slot.id].busy


def test_a_refused_write_behind_is_not_retried_for_other_content_or_other_weights(tmp_path):
    tier, threads, backend, slot = _refused_write_behind(tmp_path)
    tier.backend_up("b", OTHER, "P2")  # restarted with other weights: its slots hold nothing of the old ones
    assert backend.calls == [] and not threads.pending
    (tmp_path / "again").mkdir()
    tier, threads, backend, slot = _refused_write_behind(tmp_path / "again")
    put(tier.scheduler, attrs.evolve(slot, content=attrs.evolve(slot.content, tokens=500)))  # another request's since
    tier.backend_up("b", MODEL, "P1")
    assert backend.calls == [] and not threads.pending
