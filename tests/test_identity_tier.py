"""
The disk tier's identity checks in process (issue 20): an entry's key names
the weights and the directory that wrote it, and a restore is judged against
what the target backend runs when the slot action is made, not when planned.
"""

from __future__ import annotations

from proxycache.cache import Catalog, MetaEntry
from proxycache.cache._index import entry_key
from proxycache.routing import Decision, DiskMatch, Fingerprint, Plan, Request, SlotId, SlotState
from proxycache.slots import NOTHING, Lease, Slot, SlotContent
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
    from twisted.internet.defer import Deferred

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
