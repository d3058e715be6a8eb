"""
The disk tier's index (L{proxycache.cache}): meta round trips, loading and
reconciling a directory, matching, replacing and evicting entries.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxycache.cache import (
    META_VERSION,
    Index,
    MetaEntry,
    bin_name,
    load_index,
    remove_entry_files,
    write_meta,
)
from proxycache.backend import model_identity
from proxycache.routing import Fingerprint
from tests.fakes import fp

MODEL = "m0del"


_keys = iter(range(1, 10**6))


def entry(fingerprint: Fingerprint | None = None, *, key: str | None = None, backend: str = "a",
          model: str = MODEL, bytes: int = 100, last_used: float = 0.0, **kw) -> MetaEntry:
    return MetaEntry(
        key=key or f"{next(_keys):016x}",
        backend=backend,
        model=model,
        fingerprint=fingerprint if fingerprint is not None else fp(4),
        tokens=kw.pop("tokens", 64),
        bytes=bytes,
        created=kw.pop("created", 1.5),
        last_used=last_used,
        **kw,
    )


def index_of(*entries: MetaEntry) -> Index:
    return Index({e.key: e for e in entries})


# -- MetaEntry -------------------------------------------------------------------


def test_meta_entry_json_round_trip():
    original = entry(fp(3, 5, tag=7), key="0123456789abcdef", backend="http://b:8080",
                     bytes=12345, last_used=99.25, pinned=True, ineffective=True, tokens=777)
    data = json.loads(json.dumps(original.to_json()))
    assert data["version"] == META_VERSION
    assert MetaEntry.from_json(data) == original
    assert original.filename == "slotcache_0123456789abcdef.bin"


def test_meta_entry_json_defaults_for_flags():
    data = entry(key="deadbeefdeadbeef").to_json()
    del data["pinned"], data["ineffective"]
    loaded = MetaEntry.from_json(data)
    assert not loaded.pinned and not loaded.ineffective


def test_meta_entry_empty_fingerprint_round_trip():
    original = entry(Fingerprint((), 0, 0))
    assert MetaEntry.from_json(original.to_json()) == original


@pytest.mark.parametrize(
    "change, message",
    [
        ({"version": META_VERSION + 1}, "version"),
        ({"version": None}, "version"),
        ({"key": "../../etc/passwd"}, "bad key"),
        ({"key": 1234567890}, "bad key"),
        ({"blocks": "abc"}, "multiple of 16"),
        ({"blocks": "zz" * 8}, "invalid literal"),
    ],
)
def test_meta_entry_from_json_rejects(change, message):
    data = entry().to_json()
    data.update(change)
    with pytest.raises(ValueError, match=message):
        MetaEntry.from_json(data)


def test_meta_entry_from_json_missing_field():
    data = entry().to_json()
    del data["model"]
    with pytest.raises(KeyError):
        MetaEntry.from_json(data)


# -- bin_name -------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["deadbeef", "0123456789abcdef", "a" * 64])
def test_bin_name_accepts_lowercase_hex(key):
    assert bin_name(key) == f"slotcache_{key}.bin"


@pytest.mark.parametrize(
    "key",
    [
        "../x",
        "../../deadbeef",
        "deadbeef/../../x",
        "/etc/passwd",
        "..",
        "",
        "deadbee",  # too short
        "a" * 65,  # too long
        "DEADBEEF",
        "deadbeeg",
        "dead beef",
        "deadbeef.bin",
        "deadbeef\x00",
        "deadbeef\\..",
    ],
)
def test_bin_name_rejects_anything_else(key):
    with pytest.raises(ValueError):
        bin_name(key)


def test_bin_name_rejects_trailing_newline():
    with pytest.raises(ValueError):
        bin_name("deadbeef\n")


# -- load_index / write_meta ----------------------------------------------------------


def dirs(tmp_path: Path) -> tuple[Path, Path]:
    meta, save = tmp_path / "meta", tmp_path / "save"
    meta.mkdir()
    save.mkdir()
    return meta, save


def saved(meta: Path, save: Path, e: MetaEntry) -> MetaEntry:
    write_meta(meta, e)
    (save / e.filename).write_bytes(b"kv")
    return e


def test_write_meta_then_load(tmp_path):
    meta, save = dirs(tmp_path)
    a = saved(meta, save, entry(key="aaaaaaaa"))
    b = saved(meta, save, entry(key="bbbbbbbb", pinned=True))
    assert sorted(p.name for p in meta.iterdir()) == ["aaaaaaaa.meta", "bbbbbbbb.meta"]
    loaded = load_index(meta, save)
    assert loaded.entries == [a, b]
    assert loaded.skipped == loaded.missing == loaded.stray == []


def test_write_meta_replaces_atomically_and_creates_directory(tmp_path):
    meta = tmp_path / "deep" / "meta"
    e = entry(key="cccccccc", last_used=1.0)
    write_meta(meta, e)
    newer = entry(key="cccccccc", last_used=2.0)
    write_meta(meta, newer)
    assert [p.name for p in meta.iterdir()] == ["cccccccc.meta"]
    assert load_index(meta, None).entries == [newer]


def test_load_index_creates_a_missing_meta_dir(tmp_path):
    loaded = load_index(tmp_path / "nope", None)
    assert loaded.entries == [] and (tmp_path / "nope").is_dir()


@pytest.mark.parametrize(
    "content, reason",
    [
        ('{"version": 99, "key": "dddddddd"}', "version"),
        ("{not json", "Expecting"),
        ("", "Expecting value"),
        ('{"version": 1}', "key"),
        (b"\xff\xfe\x00garbage", "decode"),
        ("[" * 20_000 + "]" * 20_000, "recursion"),  # Python's decoder runs out of stack, not of JSON
    ],
)
def test_bad_meta_is_skipped_with_a_reason(tmp_path, content, reason):
    meta, save = dirs(tmp_path)
    good = saved(meta, save, entry(key="aaaaaaaa"))
    bad = meta / "dddddddd.meta"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        bad.write_text(content)
    loaded = load_index(meta, save)
    assert loaded.entries == [good]
    (skipped,) = loaded.skipped
    assert skipped.startswith("dddddddd.meta: ") and reason in skipped
    assert bad.exists()  # left for a human to look at


def test_wrong_version_meta_is_skipped(tmp_path):
    meta, save = dirs(tmp_path)
    e = saved(meta, save, entry(key="eeeeeeee"))
    data = e.to_json()
    data["version"] = 0
    (meta / "eeeeeeee.meta").write_text(json.dumps(data))
    loaded = load_index(meta, save)
    assert loaded.entries == [] and len(loaded.skipped) == 1 and "version 0" in loaded.skipped[0]
    # its .bin has no readable meta now: reported, not deleted
    assert loaded.stray == ["slotcache_eeeeeeee.bin"]
    assert (save / "slotcache_eeeeeeee.bin").exists()


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "null", "3"])
def test_non_object_meta_is_skipped(tmp_path, content):
    meta, save = dirs(tmp_path)
    (meta / "ffffffff.meta").write_text(content)
    loaded = load_index(meta, save)
    assert loaded.entries == [] and len(loaded.skipped) == 1


def test_meta_without_bin_is_dropped_when_save_dir_given(tmp_path):
    meta, save = dirs(tmp_path)
    kept = saved(meta, save, entry(key="aaaaaaaa"))
    gone = entry(key="bbbbbbbb")
    write_meta(meta, gone)  # no .bin
    loaded = load_index(meta, save)
    assert loaded.entries == [kept]
    assert loaded.missing == ["bbbbbbbb"]
    assert not (meta / "bbbbbbbb.meta").exists()


def test_meta_without_bin_is_kept_when_save_dir_unknown(tmp_path):
    meta, _ = dirs(tmp_path)
    e = entry(key="bbbbbbbb")
    write_meta(meta, e)
    loaded = load_index(meta, None)
    assert loaded.entries == [e] and loaded.missing == [] and loaded.stray == []


def test_stray_bin_files_reported(tmp_path):
    meta, save = dirs(tmp_path)
    saved(meta, save, entry(key="aaaaaaaa"))
    (save / "slotcache_99999999.bin").write_bytes(b"kv")
    (save / "slotcache_0000000a.bin").write_bytes(b"kv")
    (save / "other.bin").write_bytes(b"not ours")
    loaded = load_index(meta, save)
    assert loaded.stray == ["slotcache_0000000a.bin", "slotcache_99999999.bin"]
    assert (save / "slotcache_99999999.bin").exists()  # only reported


def test_leftover_tmp_meta_removed(tmp_path):
    meta, save = dirs(tmp_path)
    e = saved(meta, save, entry(key="aaaaaaaa"))
    (meta / ".aaaaaaaa.meta.tmp").write_text('{"half": ')
    (meta / ".bbbbbbbb.meta.tmp").write_text("")
    (meta / "notes.txt").write_text("keep me")
    loaded = load_index(meta, save)
    assert loaded.entries == [e] and loaded.skipped == []
    assert sorted(p.name for p in meta.iterdir()) == ["aaaaaaaa.meta", "notes.txt"]


def test_remove_entry_files(tmp_path):
    meta, save = dirs(tmp_path)
    saved(meta, save, entry(key="aaaaaaaa"))
    remove_entry_files(meta, save, "aaaaaaaa")
    assert list(meta.iterdir()) == [] and list(save.iterdir()) == []
    remove_entry_files(meta, save, "aaaaaaaa")  # already gone: fine
    with pytest.raises(ValueError):
        remove_entry_files(meta, save, "../aaaaaaaa")


# -- Index.best -----------------------------------------------------------------------


def test_best_is_the_longest_common_prefix():
    short = entry(fp(2, 3, tag=1), last_used=9.0)
    long = entry(fp(9, 10, tag=2), last_used=1.0)
    other = entry(fp(5, base=2))
    index = index_of(short, long, other)
    assert index.best(fp(12), MODEL, ["a"], 0.0) == (long, 9, 0.9)


def test_best_respects_model_backend_and_ineffective():
    request = fp(12)
    wrong_model = entry(fp(11), model="other")
    wrong_backend = entry(fp(11), backend="b")
    broken = entry(fp(11), ineffective=True)
    fine = entry(fp(3))
    index = index_of(wrong_model, wrong_backend, broken, fine)
    assert index.best(request, MODEL, ["a"], 0.0) == (fine, 3, 1.0)
    assert index.best(request, MODEL, ["a", "b"], 0.0)[0] is wrong_backend
    assert index.best(request, "other", ["a"], 0.0)[0] is wrong_model
    assert index.best(request, MODEL, [], 0.0) is None
    assert index.best(request, "third", ["a", "b"], 0.0) is None


def test_best_respects_ratio():
    # 4 shared blocks of an 8-block entry: ratio 0.5 against the shorter (the entry)
    e = entry(fp(4, 8, tag=3))
    index = index_of(e)
    request = fp(4, 16, tag=4)
    assert index.best(request, MODEL, ["a"], 0.5) == (e, 4, 0.5)
    assert index.best(request, MODEL, ["a"], 0.51) is None


def test_best_needs_a_common_block():
    index = index_of(entry(fp(5, base=2)))
    assert index.best(fp(5), MODEL, ["a"], 0.0) is None
    assert Index().best(fp(5), MODEL, ["a"], 0.0) is None


def test_best_ties_go_to_the_most_recently_used():
    old = entry(fp(6, 7, tag=1), last_used=1.0)
    recent = entry(fp(6, 8, tag=2), last_used=5.0)
    assert index_of(old, recent).best(fp(10), MODEL, ["a"], 0.0)[0] is recent
    assert index_of(recent, old).best(fp(10), MODEL, ["a"], 0.0)[0] is recent


# -- Index.predecessor ------------------------------------------------------------------


def test_predecessor_is_the_entry_the_content_descends_from():
    turn1 = entry(fp(4))
    turn2 = entry(fp(8))
    branch = entry(fp(6, 9, tag=9))  # shares 6 blocks, but is not a prefix
    other = entry(fp(3, base=2))
    index = index_of(turn1, turn2, branch, other)
    assert index.predecessor(fp(12), "a", MODEL, turn2.key) is turn2
    assert index.predecessor(fp(12), "a", MODEL, turn1.key) is turn1  # restored from turn 1
    assert index.predecessor(fp(8), "a", MODEL, turn2.key) is turn2  # the same turn saved again
    assert index.predecessor(fp(3), "a", MODEL, turn2.key) is None  # shorter: it does not continue it
    assert index.predecessor(fp(12), "a", MODEL, branch.key) is None  # restored from a branch: a new entry
    assert index.predecessor(fp(12), "a", MODEL, None) is None
    assert index.predecessor(fp(12), "a", MODEL, "0123456789abcdef") is None  # dropped meanwhile


def test_predecessor_never_another_conversation_sharing_a_prefix():
    # another user's "system prompt + one short turn": all its blocks are a prefix of ours
    theirs = entry(fp(5))
    index = index_of(theirs)
    assert index.predecessor(fp(9, 12, tag=4), "a", MODEL, None) is None
    assert index.predecessor(fp(9, 12, tag=4), "a", MODEL, "00000000000000aa") is None


def test_predecessor_same_backend_and_model_only():
    on_b, other_model = entry(fp(4), backend="b"), entry(fp(4), model="other")
    index = index_of(on_b, other_model, entry(Fingerprint((), 0, 0)))
    assert index.predecessor(fp(12), "a", MODEL, on_b.key) is None
    assert index.predecessor(fp(12), "a", MODEL, other_model.key) is None
    assert index.predecessor(fp(12), "b", MODEL, on_b.key) is on_b


# -- Index.over_budget --------------------------------------------------------------------


def test_over_budget_evicts_least_recently_used_first():
    es = [entry(key=f"{i:08x}", bytes=100, last_used=t) for i, t in enumerate([5.0, 1.0, 3.0, 4.0, 2.0])]
    index = index_of(*es)
    assert index.total_bytes == 500 and len(index) == 5
    assert [e.last_used for e in index.over_budget(300, 0, frozenset())] == [1.0, 2.0]
    assert [e.last_used for e in index.over_budget(0, 2, frozenset())] == [1.0, 2.0, 3.0]
    assert [e.last_used for e in index.over_budget(250, 4, frozenset())] == [1.0, 2.0, 3.0]
    assert index.over_budget(500, 5, frozenset()) == []
    assert index.over_budget(0, 0, frozenset()) == []  # 0: no limit


def test_over_budget_by_bytes_counts_sizes():
    big = entry(bytes=1000, last_used=2.0)
    small_old = entry(bytes=10, last_used=1.0)
    index = index_of(big, small_old)
    assert index.over_budget(500, 0, frozenset()) == [small_old, big]
    assert index.over_budget(1000, 0, frozenset()) == [small_old]


def test_over_budget_keeps_pinned_entries():
    pinned_flag = entry(key="00000001", last_used=1.0, pinned=True)
    pinned_key = entry(key="00000002", last_used=2.0)
    plain = entry(key="00000003", last_used=3.0)
    newest = entry(key="00000004", last_used=4.0)
    index = index_of(pinned_flag, pinned_key, plain, newest)
    assert index.over_budget(0, 2, frozenset({"00000002"}), max_pinned_share=1.0) == [plain, newest]
    assert index.over_budget(0, 3, frozenset({"00000002"}), max_pinned_share=1.0) == [plain]
    # pins beyond the whole budget: the oldest go, the newest pin stays
    everything = frozenset({"00000002", "00000003", "00000004"})
    assert index.over_budget(0, 1, everything, max_pinned_share=1.0) == [pinned_flag, pinned_key, plain]


def test_over_budget_gives_pinned_entries_a_bounded_share():
    pins = [entry(key=f"0000000{i}", last_used=float(i), pinned=True, bytes=100) for i in range(1, 5)]
    plain = entry(key="0000000a", last_used=9.0, bytes=100)
    index = index_of(*pins, plain)
    # 4 entries allowed, pins may hold half: the two oldest pins go before the newer plain entry
    assert index.over_budget(0, 4, frozenset()) == [pins[0]]
    assert index.over_budget(0, 3, frozenset()) == [pins[0], pins[1]]
    assert index.over_budget(250, 0, frozenset()) == [pins[0], pins[1], pins[2]]  # by bytes: 1 pin of 100 fits 125
    assert index.over_budget(0, 3, frozenset(), max_pinned_share=1.0) == [pins[0], plain]
    assert index.over_budget(0, 4, frozenset(), max_pinned_share=1.0) == [plain]  # pins fit: the plain one goes
    # three pins and a budget of one entry: the tier still keeps what it saves last
    assert index.over_budget(0, 1, frozenset()) == [*pins, plain][:4]


def test_over_budget_drops_a_prefix_many_entries_share_last():
    system = entry(fp(6), last_used=1.0)  # the team's system prompt (+ a short turn): oldest
    users = [entry(fp(6, 9, tag=t), last_used=2.0 + t) for t in range(3)]
    lone = entry(fp(4, base=3), last_used=9.0)
    index = index_of(system, *users, lone)
    assert index.is_shared_prefix(system) and not any(index.is_shared_prefix(u) for u in users)
    assert index.over_budget(0, 4, frozenset()) == [users[0]]
    assert index.over_budget(0, 1, frozenset()) == [*users, lone]
    # shared by one other entry only: plain LRU
    assert index_of(system, users[0], lone).over_budget(0, 2, frozenset()) == [system]


# -- model_identity ---------------------------------------------------------------------------


def test_model_identity_depends_on_file_name_build_and_shape():
    props = {"model_path": "/models/x.gguf", "build_info": "b1", "total_slots": 2}
    models = {"data": [{"id": "x", "meta": {"n_vocab": 100, "n_embd": 64, "other": 1}}]}
    base = model_identity(props, models)
    assert base == model_identity({**props, "model_path": "/elsewhere/x.gguf", "total_slots": 4}, models)
    assert base != model_identity({**props, "build_info": "b2"}, models)
    assert base != model_identity({**props, "model_path": "/models/y.gguf"}, models)
    assert base != model_identity(props, {"data": [{"meta": {"n_vocab": 101, "n_embd": 64}}]})
    assert model_identity(props, None) == model_identity(props, {"data": "nonsense"})
    assert len(base) == 16 and int(base, 16) >= 0


def test_over_budget_retires_entries_no_backend_can_restore_first():
    def make(key, model, last_used, ineffective=False):
        fp = Fingerprint((int(key, 16),), 100, 16)
        return MetaEntry(key, "b", model, fp, 10, 100, 0.0, last_used, ineffective=ineffective)

    index = Index({e.key: e for e in (
        make("aaaaaaaaaaaaaaa1", "current", 1.0),
        make("aaaaaaaaaaaaaaa2", "old-build", 5.0),
        make("aaaaaaaaaaaaaaa3", "current", 3.0, ineffective=True),
        make("aaaaaaaaaaaaaaa4", "current", 4.0),
    )})
    victims = index.over_budget(0, 2, frozenset(), frozenset({"current"}))
    assert [v.key for v in victims] == ["aaaaaaaaaaaaaaa3", "aaaaaaaaaaaaaaa2"]


# -- concurrent writers, odd files ---------------------------------------------


def test_concurrent_writers_of_one_key_never_fail_or_leave_half_a_meta(tmp_path):
    import threading

    meta = tmp_path / "meta"
    meta.mkdir()
    key = "abcdef0123456789"
    failures: list[BaseException] = []
    unparsable: list[str] = []
    writers = 4

    def write(n: int) -> None:
        for i in range(300):
            try:
                write_meta(meta, entry(fp(40), key=key, last_used=float(n * 1000 + i)))
            except BaseException as e:  # noqa: BLE001 - counted, not raised
                failures.append(e)

    def read() -> None:
        for _ in range(300):
            try:
                MetaEntry.from_json(json.loads((meta / f"{key}.meta").read_text()))
            except FileNotFoundError:
                pass  # before the first write
            except ValueError as e:
                unparsable.append(str(e))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)] + [threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == [] and unparsable == []
    assert [p.name for p in meta.iterdir()] == [f"{key}.meta"]  # no temporary left behind
    (loaded,) = load_index(meta, None).entries
    assert loaded.key == key


def test_fifo_and_huge_metas_are_skipped_not_read(tmp_path):
    import os
    import threading

    meta, save = dirs(tmp_path)
    good = saved(meta, save, entry(key="aaaaaaaa"))
    fifo = meta / "bbbbbbbb.meta"
    os.mkfifo(fifo)  # reading it would block until a writer comes
    # A writer waiting for a reader: a loader that opens the FIFO gets EOF instead of hanging this test.
    writer = threading.Thread(target=lambda: open(fifo, "wb").close(), daemon=True)
    writer.start()
    huge = meta / "cccccccc.meta"
    with open(huge, "wb") as f:
        f.truncate(2 * 1024 * 1024)  # sparse: large, cheap
    (meta / "dddddddd.meta").mkdir()
    loaded = load_index(meta, save)
    assert loaded.entries == [good]
    reasons = dict(s.split(": ", 1) for s in loaded.skipped)
    assert set(reasons) == {"bbbbbbbb.meta", "cccccccc.meta", "dddddddd.meta"}
    assert "not a regular file" in reasons["bbbbbbbb.meta"]
    assert "bytes" in reasons["cccccccc.meta"]
    os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # let the writer go
    writer.join(5)


# -- the lookup maps agree with a scan of every entry ------------------------------------


def _scan_best(index: Index, request: Fingerprint, model: str, backends: list[str], min_ratio: float):
    """The lookup as it was: compare the request with every entry."""
    best = None
    for e in index.entries.values():
        if e.ineffective or e.model != model or e.backend not in backends:
            continue
        common = request.common_blocks(e.fingerprint)
        if common == 0:
            continue
        ratio = common / min(len(request.blocks), len(e.fingerprint.blocks))
        if ratio >= min_ratio and (best is None or (common, e.last_used) > (best[1], best[0].last_used)):
            best = (e, common, ratio)
    return best


def _chain(root: int, length: int, branch_at: int | None = None, branch: int = 0) -> tuple[int, ...]:
    """Blocks of a conversation rooted at C{root}, forking to C{branch} after C{branch_at} blocks."""
    return tuple(
        hash((root, i)) if branch_at is None or i < branch_at else hash((root, branch_at, branch, i))
        for i in range(length)
    )


def test_best_agrees_with_a_full_scan():
    import random

    rng = random.Random(7)
    index = Index()
    for i in range(400):
        root = rng.randrange(4)  # few roots: many entries share a system prompt
        length = rng.choice([1, 2, 3, 5, 8, 13, 40, 100, 300])
        branch_at = rng.choice([None, 0, 1, 2, 7, 30, 90])
        blocks = _chain(root, length, branch_at, rng.randrange(6))
        index.put(entry(Fingerprint(blocks, 1, 1), backend=rng.choice("ab"), model=rng.choice([MODEL, "old"]),
                        last_used=float(rng.randrange(50)), ineffective=rng.random() < 0.05))
    for key in rng.sample(sorted(index.entries), 50):  # removal keeps the maps in step
        index.remove(key)
    assert index.total_bytes == sum(e.bytes for e in index.entries.values())
    for _ in range(400):
        request = Fingerprint(
            _chain(rng.randrange(5), rng.choice([1, 3, 8, 50, 120, 400]), rng.choice([None, 1, 5, 60, 200]),
                   rng.randrange(6)), 1, 1)
        for min_ratio in (0.0, 0.3, 0.85, 1.0):
            expected = _scan_best(index, request, MODEL, ["a"], min_ratio)
            found = index.best(request, MODEL, ["a"], min_ratio)
            assert (found and found[1:], found and found[0].last_used) == (
                expected and expected[1:], expected and expected[0].last_used)


def test_a_lookup_touches_only_entries_that_can_match():
    index = Index()
    for i in range(1000):  # a thousand conversations behind one shared first block
        index.put(entry(Fingerprint((1,) + _chain(i, 200), 1, 1)))
    request = Fingerprint((1,) + _chain(5, 210), 1, 1)
    found = index.best(request, MODEL, ["a"], 0.85)
    assert found is not None and found[1] == 201
    assert index.touched <= 5


def test_model_identity_depends_on_the_weights():
    from proxycache.backend._identity import probe_answer

    props = {"model_path": "/models/x.gguf", "build_info": "b1"}
    models = {"data": [{"id": "x", "meta": {"n_vocab": 100, "n_embd": 64}}]}

    def reply(*pairs):
        top = [{"id": i, "token": "t", "logprob": lp} for i, lp in pairs]
        return {"completion_probabilities": [{"id": pairs[0][0], "logprob": pairs[0][1], "top_logprobs": top}]}

    a = probe_answer(reply((46, -5.0368), (82, -5.2163), (27, -5.2255)))
    # float noise and the order of near-ties do not change the answer; other weights do
    assert a == probe_answer(reply((82, -5.2161), (46, -5.0371), (27, -5.2249)))
    b = probe_answer(reply((46, -5.0368), (82, -5.2163), (28, -5.2255)))
    c = probe_answer(reply((46, -4.2), (82, -5.2163), (27, -5.2255)))
    assert len({str(a), str(b), str(c)}) == 3
    assert probe_answer({"error": "nope"}) is None and probe_answer(None) is None
    base = model_identity(props, models, a, "digest")
    noisy = probe_answer(reply((82, -5.2161), (46, -5.0371), (27, -5.2249)))
    assert base == model_identity(props, models, noisy, "digest")
    assert base != model_identity(props, models, b, "digest")
    assert base != model_identity(props, models, a, "other digest")
    assert base != model_identity(props, models, None, "digest")


def test_model_file_digest_sees_other_weights_of_the_same_size(tmp_path):
    import os

    from proxycache.backend._identity import FILE_SAMPLE_BYTES, file_digest

    big = FILE_SAMPLE_BYTES * 3
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"\0" * (big - 1) + b"A")  # differs only in its last byte
    b.write_bytes(b"\0" * (big - 1) + b"B")
    os.utime(b, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))
    assert a.stat().st_size == b.stat().st_size
    assert file_digest(str(a)) != file_digest(str(b))
    assert file_digest(str(a)) == file_digest(str(a))
    assert file_digest(str(tmp_path / "missing.gguf")) is None


def test_readers_are_backends_sharing_the_writers_storage_and_model():
    from proxycache.cache import Catalog

    catalog = Catalog(min_ratio=0.0, storage={"a": "/saves", "b": "/saves", "c": "/elsewhere"})
    for name in "abcd":
        catalog.backend_up(name, MODEL)
    catalog.backend_up("e", "other-model")
    catalog.storage["e"] = "/saves"
    assert catalog.readers("a", MODEL) == {"b"}
    assert catalog.readers("c", MODEL) == frozenset()
    assert catalog.readers("d", MODEL) == frozenset()  # its storage is unknown: its own files only


def test_a_save_must_be_worth_its_time_against_what_a_sibling_entry_holds():
    """
    Issue 24: a slot holding a 30k-token context and a short question, with a saved
    sibling entry holding the same context: not worth a save (the tail is computed
    again faster).  A conversation's own earlier entry does not count: what it added
    since is saved, so that its next turn computes only what is new.
    """
    from proxycache.cache import Catalog
    from proxycache.routing import SlotId, SlotView, SlotState

    from proxycache.routing import Speeds

    # a 7B-class model on a GPU: 3000 tokens/s; its 30k-token file 3.9 GB, saved in 3.3 s, read in 2 s
    catalog = Catalog(min_ratio=0.0, speeds=Speeds(write_bytes_per_second=1.2e9, read_bytes_per_second=2e9))
    catalog.backend_up("a", MODEL)
    speeds = catalog.speeds
    speeds.observe_save(131_072_000, 110.0, 1000, took=0.115)  # 128 KiB a token
    speeds.observe_prefill(30_000, 30_000 / 3000 * 1000)
    sibling = entry(fp(300, 302, tag=1), tokens=30_100)
    catalog.index.put(sibling)
    previous = fp(300, 301, tag=2)  # the same context, another question
    assert not catalog.save_pays("a", previous, 30_050)
    view = SlotView(SlotId("a", 0), SlotState.HOT, previous, tokens=30_050)
    assert not catalog.keep_pays(view, 0)
    # with no sibling on disk, all of it is its own: worth a save
    assert catalog.save_pays("a", fp(300, 301, tag=3, base=7), 30_050)
    # an earlier turn of the same conversation: the new turns are its own part
    earlier = entry(fp(280, base=8), tokens=28_000)
    catalog.index.put(earlier)
    assert catalog.save_pays("a", fp(280, 300, tag=4, base=8), 30_000)
    # the prefix a request keeps in place counts too
    assert not catalog.keep_pays(SlotView(SlotId("a", 0), SlotState.HOT, fp(300, 301, tag=5, base=9),
                                          tokens=30_050), 300)


def test_a_siblings_short_tail_is_never_saved_on_a_requests_path():
    """
    Issue 24, siblings back to back on 2 slots: the next sibling reuses the shared
    context in place on the previous sibling's slot, as llama-server alone does,
    neither forking it into the free slot nor taking it over with a save first,
    even before any save was measured.  A team member's longer own part is still
    kept.
    """
    from proxycache.cache import Catalog
    from proxycache.routing import Decision, Request, SlotId, SlotState, SlotView, plan

    catalog = Catalog(min_ratio=0.0)
    catalog.backend_up("a", MODEL)
    catalog.speeds.observe_prefill(6_000, 3_000.0)  # the context was computed; nothing saved yet

    def choose(*slots: SlotView, request: Fingerprint):
        return plan(Request(request, small=False), list(slots), min_ratio=0.0, fork_pays=catalog.fork_pays,
                    keep_pays=catalog.keep_pays, restore_beats=catalog.restore_beats)

    previous = SlotView(SlotId("a", 0), SlotState.HOT, fp(60, 61, tag=1), tokens=6_060)  # context, a question
    free = SlotView(SlotId("a", 1))
    other = SlotView(SlotId("a", 1), SlotState.HOT, fp(30, base=5), tokens=3_000, saved=True)
    for spare in (free, other):
        chosen = choose(previous, spare, request=fp(60, 61, tag=2))
        assert chosen is not None
        assert (chosen.decision, chosen.slot, chosen.fork, chosen.evicts) == (Decision.HIT, previous.id, None, False)
    # a team member's own part (a tenth of what is shared) is kept: forked into the free slot
    alice = SlotView(SlotId("a", 0), SlotState.HOT, fp(40, 44, tag=3, base=2), tokens=4_400)
    chosen = choose(alice, free, request=fp(40, 44, tag=4, base=2))
    assert chosen is not None and chosen.fork == alice.id
    # Speeds measured that call a tail worth keeping (a slow prefill, a fast disk) do not change it: a
    # short tail after a context a sibling's entry holds is not saved in the background either (the
    # save would hold the slot the next sibling reuses in place) ...
    catalog.speeds.observe_save(60_600_000, 10.0, 6_060, took=0.01)
    catalog.speeds.observe_prefill(6_000, 60_000.0)
    catalog.index.put(entry(fp(60, 61, tag=5), tokens=6_070))  # the first sibling's entry: the context
    assert not catalog.keep_pays(previous, 60)
    assert not catalog.save_pays("a", previous.fingerprint, 6_060)
    assert not catalog.save_pays("a", previous.fingerprint, 6_060, on_path=True)
    # ... while a longer own part after it is judged in time, and saved
    longer = fp(60, 66, tag=6)
    assert catalog.save_pays("a", longer, 6_600) and catalog.save_pays("a", longer, 6_600, on_path=True)
