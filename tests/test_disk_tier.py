"""
The disk tier against a real llama.cpp server: save before evict, restore on
demand, restarts of either process, model guard, budget, failures.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
from functools import partial

from tests import conftest
from tests.conftest import CONVERSATION_LIMITS
from tests.conversations import User, close_to_new
from proxycache.testing import ProxyProcess, ReplyTap, http, wait_for

# llama.cpp's save directory in sight, and quick write-behind saves.
start_proxy = partial(conftest.start_proxy, saves=True, write_behind=0.2)




def all_saved(proxy):
    return all(slot["saved"] or slot["state"] != "hot" for slot in proxy.status()["slots"])


def test_four_users_on_two_slots_restore_from_disk(llama, tmp_path):
    proxy = start_proxy(tmp_path, llama)
    try:
        client = proxy.client()
        users = [User(name) for name in ("ana", "ben", "cai", "dee")]
        for turn in range(4):
            for user in users:
                record = user.turn(client)
                if turn == 0:
                    assert record["decision"] == "miss"
                else:
                    assert record["decision"] in ("restore", "hit"), record
                    assert close_to_new(record), record
                    if record["decision"] == "restore":
                        assert record["restored_tokens"] >= record["cache_n"] > 1000
        assert sum(1 for u in users for r in u.turns[1:] if r["decision"] == "restore") >= 10
        status = proxy.status()
        assert status["disk"]["ineffective_restores"] == 0
        # one conversation, one entry: a file per user, not per turn
        wait_for(lambda: all_saved(proxy), what="write-behind")
        assert len(list(llama.save_dir.glob("slotcache_*.bin"))) == 4
        assert len(list((tmp_path / "meta").glob("*.meta"))) == 4
        log = proxy.log_text()
        assert "[proxycache.slots._dispatch#info] restore slot=" in log  # the log is there, and read
        assert "_HTTP11ClientFactory" not in log  # no two lines per connection to llama-server
    finally:
        proxy.stop()


def test_restart_of_the_proxy_between_turns(llama, tmp_path):
    users = [User(name) for name in ("ana", "ben", "cai")]
    proxy = start_proxy(tmp_path, llama)
    for user in users:
        user.turn(proxy.client())
    proxy.stop()  # SIGTERM: flushes the hot slots to disk

    proxy = start_proxy(tmp_path, llama)
    try:
        for user in users:
            record = user.turn(proxy.client())
            assert record["decision"] == "restore", record
            assert close_to_new(record), record
    finally:
        proxy.stop()


def test_restart_of_llama_server_between_turns(llama, tmp_path):
    proxy = start_proxy(tmp_path, llama)
    try:
        users = [User("ana"), User("ben")]
        for user in users:
            user.turn(proxy.client())
        wait_for(lambda: all_saved(proxy), what="write-behind")
        llama.restart()
        wait_for(lambda: proxy.status()["backends"][0]["restarts"] >= 1, what="restart noticed")
        wait_for(lambda: proxy.status()["backends"][0]["up"], what="backend up again")
        for user in users:
            record = user.turn(proxy.client())
            assert record["decision"] == "restore", record
            assert close_to_new(record), record
    finally:
        proxy.stop()


def test_cache_of_another_model_is_never_restored(llama_factory, other_model, tmp_path):
    llama = llama_factory()
    proxy = start_proxy(tmp_path, llama)
    try:
        user = User("ana")
        user.turn(proxy.client())
        wait_for(lambda: all_saved(proxy), what="write-behind")
        llama.stop()
        other = llama_factory(model=other_model, port=llama.spec.port, save_dir=str(llama.save_dir))
        wait_for(
            lambda: proxy.status()["backends"][0]["restarts"] >= 1 or not proxy.status()["backends"][0]["up"],
            what="restart noticed",
        )
        wait_for(lambda: proxy.status()["backends"][0]["up"], what="backend up again")
        record = user.turn(proxy.client())
        assert record["decision"] == "miss"
        disk = proxy.status()["disk"]
        assert disk["restores"] == 0 and disk["restore_failures"] == 0
        assert other.alive
    finally:
        proxy.stop()


def test_disk_budget_evicts_least_recently_used_and_keeps_pinned(llama, tmp_path):
    proxy = start_proxy(tmp_path, llama, max_cache_entries=2, env={"ALLOW_CLIENT_PINS": "1"})
    try:
        client = proxy.client()
        pinned_client = proxy.client(default_headers={"X-Proxycache-Pin": "1"})
        ana, ben, cai, dee = (User(n) for n in ("ana", "ben", "cai", "dee"))
        ana.turn(pinned_client)
        for user in (ben, cai, dee):
            user.turn(client)
            wait_for(lambda: all_saved(proxy), what="write-behind")
        metas = {p.stem for p in (tmp_path / "meta").glob("*.meta")}
        assert len(metas) == 2
        assert len(list(llama.save_dir.glob("slotcache_*.bin"))) == 2
        # ana (pinned, oldest) survived; ben and cai (least recently used) went
        assert ana.turn(pinned_client)["decision"] in ("restore", "hit")
        record = ben.turn(client)  # not restored: its entry went (llama.cpp's own RAM cache may still hold it)
        assert record["restored_tokens"] == 0 and record["decision"] in ("miss", "hit")
        assert proxy.status()["disk"]["evicted_entries"] >= 2
    finally:
        proxy.stop()


def test_save_failure_loses_no_request(llama_factory, tmp_path):
    llama = llama_factory(save_dir=None)  # llama-server answers 501 to saves
    proxy = start_proxy(tmp_path, llama)
    try:
        users = [User(n) for n in ("ana", "ben", "cai")]
        for turn in range(2):
            for user in users:
                record = user.turn(proxy.client())
                assert record["answer"] is not None
        disk = proxy.status()["disk"]
        assert disk["save_failures"] >= 1 and disk["saves"] == 0
        # Asked once (or as often as saves were under way at once), not at every eviction and release.
        assert disk["save_failures"] <= 2, disk
        assert proxy.log_text().count("runs without --slot-save-path") == 1
    finally:
        proxy.stop()


def test_restore_failure_recomputes(llama, tmp_path):
    proxy = start_proxy(tmp_path, llama)
    try:
        users = [User(n) for n in ("ana", "ben", "cai")]
        for user in users:
            user.turn(proxy.client())
        wait_for(lambda: all_saved(proxy), what="write-behind")
        for path in llama.save_dir.glob("slotcache_*.bin"):
            path.unlink()  # behind the proxy's back
        record = users[0].turn(proxy.client())  # ana was evicted: the plan is a restore
        # Not restored: recomputed, or (the missing file seen before llama.cpp is asked, so the slot is
        # not cleared by a failed restore) served from llama.cpp's own RAM cache (--cache-ram).
        assert record["decision"] in ("miss", "hit") and record["restored_tokens"] == 0, record
        assert record["answer"]
        assert proxy.status()["disk"]["restore_failures"] == 1
        assert users[0].turn(proxy.client())["decision"] == "hit"
    finally:
        proxy.stop()


def test_saved_caches_llama_refuses_for_good_are_dropped_not_tried_again(llama, tmp_path):
    # Files go missing or get damaged behind the proxy's back (an operator cleans up, another proxy's budget,
    # a save cut short by a full disk, a crash). llama.cpp answers 400 to all alike, and aborts on some
    # truncated files: the proxy tells by the file.
    users = [User(n) for n in ("ana", "ben", "cai", "dee")]
    proxy = start_proxy(tmp_path, llama)
    files = []
    try:
        for user in users:  # one at a time: each one's file is known
            before = set(llama.save_dir.glob("slotcache_*.bin"))
            user.turn(proxy.client())
            wait_for(lambda: all_saved(proxy), what="write-behind")
            (new,) = set(llama.save_dir.glob("slotcache_*.bin")) - before
            files.append(new)
    finally:
        proxy.stop()
    metas = [tmp_path / "meta" / (path.name[len("slotcache_"):-len(".bin")] + ".meta") for path in files]
    # No write-behind from here on: a file is saved again only when its slot is taken.
    proxy = start_proxy(tmp_path, llama, write_behind=600)
    try:
        files[0].unlink()  # ana's: gone
        files[1].write_bytes(files[1].read_bytes()[: files[1].stat().st_size // 2])  # ben's: cut short
        files[2].write_bytes(bytes(files[2].stat().st_size))  # cai's: zeros (a crash), llama.cpp asked
        for user, meta in zip(users[:3], metas):
            record = user.turn(proxy.client())  # served (200, the SDK's shape), not restored
            # Recomputed, or served from llama.cpp's own RAM cache (--cache-ram) when it was not asked.
            assert record["decision"] in ("miss", "hit") and record["restored_tokens"] == 0, record
            assert record["answer"], record
            assert not meta.exists(), record  # dropped at the first return
        assert llama.alive  # the truncated file never reached it (it aborts on some)
        assert not files[1].exists() and not files[2].exists()  # the damaged files are removed
        record = users[3].turn(proxy.client())  # an intact file still restores
        assert record["decision"] == "restore" and close_to_new(record), record
        disk = proxy.status()["disk"]
        assert (disk["restore_failures"], disk["dropped_unusable"], disk["restores"]) == (3, 3, 1), disk
        log = proxy.log_text()
        assert log.count("dropped, never tried again") == 3
        for why in ("its file is gone", "were saved (cut short)", "not a llama.cpp slot file"):
            assert why in log
        for user in users:  # back again: each one's current state, saved when its slot was taken
            record = user.turn(proxy.client())
            assert record["decision"] in ("restore", "hit") and record["answer"], record
        disk = proxy.status()["disk"]
        assert (disk["restore_failures"], disk["dropped_unusable"]) == (3, 3), disk  # no broken file tried again
    finally:
        proxy.stop()


def test_corrupt_meta_and_half_written_save_are_skipped(llama, tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "0123456789abcdef.meta").write_text("{not json")
    (meta / "fedcba9876543210.meta").write_text('{"version": 999}')
    (meta / ".0011223344556677.meta.tmp").write_text('{"version": 1, "ke')  # killed mid-write
    proxy = start_proxy(tmp_path, llama)
    try:
        assert http("GET", proxy.url + "/proxycache/health")[0] == 200
        assert User("ana").turn(proxy.client())["decision"] == "miss"
        log = proxy.log_text()
        assert "skipped 2 unreadable cache metas" in log
        assert "0123456789abcdef.meta" in log
        assert "fedcba9876543210.meta" in log
        assert not (meta / ".0011223344556677.meta.tmp").exists()
    finally:
        proxy.stop()


def test_kill_during_saves_leaves_an_index_that_loads(llama, tmp_path):
    proxy = start_proxy(tmp_path, llama, write_behind=0.05)
    users = [User(n) for n in ("ana", "ben", "cai")]
    for turn in range(2):
        for user in users:
            user.turn(proxy.client())
    proxy.stop(signal.SIGKILL)
    proxy = start_proxy(tmp_path, llama)
    try:
        assert proxy.status()["disk"]["entries"] >= 1
        record = users[0].turn(proxy.client())
        assert record["decision"] in ("restore", "miss")
    finally:
        proxy.stop()


def test_a_restore_that_does_not_take_is_detected_and_not_repeated(llama_factory, tmp_path):
    # without llama-server's own RAM cache, which would otherwise quietly repair the slot
    llama = llama_factory(cache_ram_mib=0)
    proxy = start_proxy(tmp_path, llama)
    try:
        ana, ben, cai, dee = (User(n) for n in ("ana", "ben", "cai", "dee"))
        for user in (ana, ben):
            user.turn(proxy.client())
        wait_for(lambda: all_saved(proxy), what="write-behind")
        proxy.stop()
        # Swap the two files behind the proxy's back: ana's entry now loads ben's KV,
        # as a restore into an SWA model without --swa-full "succeeds" and reuses nothing.
        files = sorted(llama.save_dir.glob("slotcache_*.bin"))
        assert len(files) == 2
        a, b = files
        swap = a.with_suffix(".swap")
        a.rename(swap), b.rename(a), swap.rename(b)
        # Each meta says its file's size as it is now: a file of another size than saved is not restored.
        for path in (a, b):
            meta = tmp_path / "meta" / (path.name[len("slotcache_"):-len(".bin")] + ".meta")
            meta.write_text(json.dumps({**json.loads(meta.read_text()), "bytes": path.stat().st_size}))
        proxy = start_proxy(tmp_path, llama)
        for user in (cai, dee):  # take the slots
            user.turn(proxy.client())
        record = ana.turn(proxy.client())
        assert record["restored_tokens"] > 0  # restored before the request was sent...
        assert record["cache_n"] < 100  # ...but llama.cpp found little of ana's prompt in ben's cache
        assert record["decision"] == "miss"  # what was done: the prompt computed
        assert record["answer"] is not None
        disk = proxy.status()["disk"]
        assert disk["ineffective_restores"] == 1
        assert "did not take" in proxy.log_text()
        # ben's entry (holding ana's KV) is restored once more and also fails; it is never retried
        record = ben.turn(proxy.client())
        assert record["restored_tokens"] > 0 and record["decision"] == "miss"
        assert proxy.status()["disk"]["ineffective_restores"] == 2
    finally:
        proxy.stop()


def test_no_empty_save_over_a_cache_after_an_unnoticed_restart(llama, tmp_path):
    # The monitor never looks on its own here: the background save meets the restarted server first.
    # Each step waits for a condition: the write-behind of the second turn cannot come before the
    # restart (it used to be due 1 s after the turn, a race with the restart; and a monitor look
    # every 30 s could notice the restart first, and then nothing was saved nor refused).
    proxy = start_proxy(tmp_path, llama, health_interval=3600, write_behind=1.0)
    try:
        ana = User("ana")
        ana.turn(proxy.client())
        wait_for(lambda: all_saved(proxy), what="write-behind")
        (saved,) = llama.save_dir.glob("slotcache_*.bin")
        size = saved.stat().st_size
        (slot,) = [s["slot"] for s in proxy.status()["slots"] if s["state"] == "hot"]
        before = llama.slots()[slot]["id_task"]
        # The second turn reaches a llama-server that stands still; the proxy, once it waits for the
        # answer, stands still too, while llama.cpp computes the turn and is restarted.
        llama.process.send_signal(signal.SIGSTOP)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            second = pool.submit(ana.turn, proxy.client(timeout=300))
            wait_for(lambda: any(s["busy"] for s in proxy.status()["slots"]), 60, "the second turn sent")
            proxy.process.send_signal(signal.SIGSTOP)
            llama.process.send_signal(signal.SIGCONT)
            wait_for(lambda: _done_after(llama, slot, before), 60, "the second turn computed")
            llama.restart()
            proxy.process.send_signal(signal.SIGCONT)  # the answer is relayed; a background save is due in 1 s
            assert second.result()["decision"] == "hit"
        wait_for(lambda: proxy.status()["disk"]["save_failures"] >= 1, 60, "the refused save")
        assert "is empty in llama.cpp (restarted?)" in proxy.log_text()  # refused by the restarted server
        assert saved.stat().st_size == size and proxy.status()["disk"]["saves"] == 1  # the first turn's cache is intact
        wait_for(lambda: proxy.status()["backends"][0]["restarts"] >= 1, 60, "restart noticed")
        record = ana.turn(proxy.client())
        assert record["decision"] == "restore" and record["cache_n"] > 1000
    finally:
        for process in (llama.process, proxy.process):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGCONT)
        proxy.stop()


def _done_after(llama, slot, task):
    """Has llama.cpp's C{slot} run a task after C{task}, and finished it?"""
    state = llama.slots()[slot]
    return state["id_task"] > task and not state["is_processing"]


def test_no_save_over_a_cache_of_a_slot_llama_cleared_behind_the_proxys_back(llama, tmp_path):
    proxy = start_proxy(tmp_path, llama, write_behind=1.5)
    try:
        ana = User("ana")
        ana.turn(proxy.client())
        wait_for(lambda: all_saved(proxy), what="write-behind")
        (saved,) = llama.save_dir.glob("slotcache_*.bin")
        (meta,) = (tmp_path / "meta").glob("*.meta")
        size, described = saved.stat().st_size, meta.read_text()
        ana.turn(proxy.client())  # changes the slot: a background save is due in 1.5 s
        (slot,) = [s["slot"] for s in proxy.status()["slots"] if s["state"] == "hot"]
        status, reply = llama.call("POST", f"/slots/{slot}?action=erase", {})  # behind the proxy's back
        assert status == 200 and reply["n_erased"] > 1000
        wait_for(lambda: proxy.status()["disk"]["save_failures"] >= 1, what="the refused save")
        assert saved.stat().st_size == size and meta.read_text() == described  # the first turn's cache is intact
        assert proxy.status()["disk"]["saves"] == 1
        assert "holds 0 tokens in llama.cpp" in proxy.log_text()
    finally:
        proxy.stop()


def metas(tmp_path):
    return [json.loads(p.read_text()) for p in (tmp_path / "meta").glob("*.meta")]


def test_a_client_pin_is_ignored_unless_the_operator_allows_it(llama, tmp_path):
    proxy = start_proxy(tmp_path, llama)
    try:
        User("ana").turn(proxy.client(default_headers={"X-Proxycache-Pin": "1"}))
        wait_for(lambda: all_saved(proxy), what="write-behind")
        assert [m["pinned"] for m in metas(tmp_path)] == [False]
    finally:
        proxy.stop()


def test_pins_beyond_their_share_do_not_stop_the_tier(llama, tmp_path):
    proxy = start_proxy(tmp_path, llama, max_cache_entries=1, env={"ALLOW_CLIENT_PINS": "1"})
    try:
        pinned_client = proxy.client(default_headers={"X-Proxycache-Pin": "1"})
        dee = User("dee")
        for user in (User("ana"), User("ben"), User("cai")):
            user.turn(pinned_client)
            wait_for(lambda: all_saved(proxy), what="write-behind")
        dee.turn(proxy.client())
        wait_for(lambda: all_saved(proxy), what="write-behind")
        # the newest save is kept; the pins, beyond their share of a one-entry budget, went
        (kept,) = metas(tmp_path)
        assert kept["pinned"] is False
        assert proxy.status()["disk"]["entries"] == 1
    finally:
        proxy.stop()


def test_the_daemon_chooses_and_tells_a_disk_budget_by_default(llama, tmp_path):
    proxy = start_proxy(tmp_path, llama)
    try:
        max_bytes = wait_for(lambda: proxy.status()["disk"]["max_bytes"], what="a budget")
        assert max_bytes > 0
        assert f"disk budget: {max_bytes / 1e9:.2f} GB, chosen at start" in proxy.log_text()
    finally:
        proxy.stop()


def same_shape_models(models_dir):
    """Two generated models of one shape and file size, different weights."""
    from proxycache.tinymodel import TINY, ensure_model

    import attrs

    a = ensure_model(models_dir, TINY)
    b = ensure_model(models_dir, attrs.evolve(TINY, seed=TINY.seed + 100))
    assert a.stat().st_size == b.stat().st_size
    return a, b


def test_the_identity_probe_tells_weights_of_one_shape_apart(llama_factory, models_dir):
    from proxycache.backend._identity import PROBE_BODY, probe_answer

    a, b = same_shape_models(models_dir)
    on_a, on_b = llama_factory(model=a), llama_factory(model=b)
    answer_a = probe_answer(on_a.post_json("/completion", PROBE_BODY))
    assert answer_a is not None and len(answer_a) == PROBE_BODY["n_probs"]
    assert answer_a != probe_answer(on_b.post_json("/completion", PROBE_BODY))
    on_a.chat("something else " * 50)  # what the slots held before does not matter
    on_a.restart()
    assert probe_answer(on_a.post_json("/completion", PROBE_BODY)) == answer_a


def on_a_model_to_replace(llama_factory, models_dir, tmp_path):
    """A server on a model file, and how to put other weights of the same shape in its place."""
    import shutil

    a, b = same_shape_models(models_dir)
    model = tmp_path / "models" / "team.gguf"
    model.parent.mkdir()
    shutil.copyfile(a, model)
    return llama_factory(model=model), lambda: shutil.copyfile(b, model)  # same name, same size


def test_weights_replaced_in_place_are_not_restored(llama_factory, models_dir, tmp_path):
    llama, replace_weights = on_a_model_to_replace(llama_factory, models_dir, tmp_path)
    proxy = start_proxy(tmp_path, llama)
    try:
        ana = User("ana")
        ana.turn(proxy.client())
        wait_for(lambda: all_saved(proxy), what="write-behind")
        llama.stop()
        replace_weights()
        llama.start()
        wait_for(
            lambda: proxy.status()["backends"][0]["restarts"] >= 1 or not proxy.status()["backends"][0]["up"],
            what="restart noticed",
        )
        wait_for(lambda: proxy.status()["backends"][0]["up"], what="backend up again")
        record = ana.turn(proxy.client())
        assert record["decision"] == "miss", record
        disk = proxy.status()["disk"]
        assert disk["restores"] == 0 and disk["model_changes"] == 1
        assert "1 saved caches of" in proxy.log_text()
    finally:
        proxy.stop()


def test_weights_replaced_behind_a_port_that_stays_open_are_not_restored(llama_factory, models_dir, tmp_path):
    # The port stays open while llama-server restarts (a container's published port): the proxy sees
    # a check cut short, like a blip on a live server, and the next one answered by the new process.
    llama, replace_weights = on_a_model_to_replace(llama_factory, models_dir, tmp_path)
    tap = ReplyTap(llama.url)
    proxy = ProxyProcess(
        tmp_path, tap.url, **{**CONVERSATION_LIMITS, "write_behind": 0.2, "slot_save_path": str(llama.save_dir)}
    ).start()
    try:
        ana = User("ana")
        ana.turn(proxy.client())
        wait_for(lambda: all_saved(proxy), what="write-behind")
        cut = tap.hold()
        llama.stop()
        wait_for(cut.is_set, what="a check cut short")
        replace_weights()
        llama.start()
        tap.release()
        wait_for(lambda: proxy.status()["backends"][0]["restarts"] >= 1, what="restart noticed")
        wait_for(lambda: proxy.status()["backends"][0]["up"], what="backend up again")
        record = ana.turn(proxy.client())
        assert record["decision"] == "miss", record
        disk = proxy.status()["disk"]
        assert disk["restores"] == 0 and disk["model_changes"] == 1, proxy.log_text()
    finally:
        proxy.stop()
        tap.close()


def test_a_contended_backend_saves_the_next_slot_to_take_while_a_stream_decodes(llama, tmp_path):
    # Write-behind far off: only the spare rule saves an idle slot before it is needed.
    proxy = start_proxy(tmp_path, llama, write_behind=300)
    try:
        client = proxy.client()
        ana, ben = User("ana"), User("ben")
        ana.turn(client)
        ben.turn(client)  # both slots hold a conversation, neither saved
        assert proxy.status()["disk"]["saves"] == 0
        cai = User("cai").messages + [{"role": "user", "content": "A question of a third user."}]
        # cai takes ana's slot (ana saved on cai's way: the backend is contended now); while cai's
        # answer streams, ben's slot, the one the next request would take, is saved.
        assert list(client.chat.completions.create(model="any", messages=cai, max_tokens=8, stream=True))
        wait_for(lambda: proxy.status()["disk"]["saves"] == 2, what="the spare's save")
        record = User("dee").turn(client)
        assert record["decision"] == "miss"
        assert proxy.status()["disk"]["saves"] == 2  # dee took ben's saved slot: no save on its way
        assert ben.turn(client)["decision"] == "restore"
    finally:
        proxy.stop()
