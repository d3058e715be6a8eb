"""
Several llama.cpp servers behind one proxy, changed at run time: added through
the admin route or SIGHUP, drained, and one killed under a running team.
"""

from __future__ import annotations

import json
import signal


from tests.conftest import SMALL_LIMITS as LIMITS
from tests.conversations import User
from proxycache.testing import ProxyProcess, http, wait_for

ADMIN = {"Authorization": "Bearer admin-key"}


def backends(proxy: ProxyProcess) -> dict[str, dict]:
    status, _, body = http("GET", proxy.url + "/proxycache/backends", headers=ADMIN)
    assert status == 200, body
    return {b["url"]: b for b in body["backends"]}


def wait_until(predicate, timeout: float = 30.0) -> None:
    wait_for(predicate, timeout)

def served_by(proxy: ProxyProcess, users: list[User]) -> list[str]:
    client = proxy.client()
    backends_seen = []
    for user in users:
        raw_client = client.chat.completions.with_raw_response
        user.messages.append({"role": "user", "content": "next"})
        raw = raw_client.create(model="any", messages=user.messages, max_tokens=2)
        user.messages.append({"role": "assistant", "content": raw.parse().choices[0].message.content or ""})
        backends_seen.append(raw.headers["x-proxycache-backend"])
    return backends_seen


def test_admin_routes_need_an_admin_key(llama, tmp_path):
    proxy = ProxyProcess(tmp_path, llama.url, api_keys="client-key", admin_keys="admin-key").start()
    try:
        client_key = {"Authorization": "Bearer client-key"}
        assert http("GET", proxy.url + "/proxycache/backends", headers=client_key)[0] == 401
        status = http("POST", proxy.url + "/proxycache/backends", {"url": "http://127.0.0.1:9"}, client_key)[0]
        assert status == 401
        admin = {"Authorization": "Bearer admin-key"}
        for url, complaint in [("http://[::1]:8080", "IPv6"), ("http://127.0.0.1:http", "port"), ("ftp://x", "http")]:
            status, _, body = http("POST", proxy.url + "/proxycache/backends", {"url": url}, admin)
            assert status == 400 and complaint in body["error"]["message"], body
        assert list(backends(proxy)) == [llama.url]
    finally:
        proxy.stop()


def test_add_drain_and_remove_at_run_time(llama_factory, tmp_path):
    first, second = llama_factory(), llama_factory()
    proxy = ProxyProcess(tmp_path, first.url, admin_keys="admin-key", **LIMITS).start()
    try:
        users = [User(f"u{i}", context_words=60) for i in range(4)]
        assert set(served_by(proxy, users)) == {"0"}
        status, _, listing = http("POST", proxy.url + "/proxycache/backends", {"url": second.url}, ADMIN)
        assert status == 200, listing
        wait_until(lambda: backends(proxy)[second.url]["up"] and backends(proxy)[second.url]["slots"] == 2)
        more = [User(f"v{i}", context_words=60) for i in range(4)]
        assert "1" in served_by(proxy, more)  # new conversations spread to the added backend

        saves_before = proxy.status()["disk"]["saves"]
        status, _, listing = http("POST", proxy.url + "/proxycache/backends/drain", {"url": first.url}, ADMIN)
        assert status == 200 and backends(proxy)[first.url]["draining"]
        assert proxy.status()["disk"]["saves"] > saves_before  # its hot slots were saved on the way out
        assert set(served_by(proxy, [User(f"w{i}", context_words=60) for i in range(3)])) == {"1"}

        status, _, _ = http("DELETE", proxy.url + "/proxycache/backends", {"url": first.url}, ADMIN)
        assert status == 200 and list(backends(proxy)) == [second.url]
    finally:
        proxy.stop()


def test_sighup_reloads_the_backend_list(llama_factory, tmp_path):
    first, second = llama_factory(), llama_factory()
    ini = tmp_path / "proxycache.ini"
    ini.write_text(f"[proxycache]\nllama_url = {first.url}\n")
    proxy = ProxyProcess(tmp_path, None, config=str(ini), admin_keys="admin-key").start()
    try:
        ini.write_text(f"[proxycache]\nllama_url = {first.url},{second.url}\n")
        proxy.process.send_signal(signal.SIGHUP)
        wait_until(lambda: second.url in backends(proxy) and backends(proxy)[second.url]["up"])
        ini.write_text(f"[proxycache]\nllama_url = {second.url}\n")
        proxy.process.send_signal(signal.SIGHUP)
        wait_until(lambda: list(backends(proxy)) == [second.url])
    finally:
        proxy.stop()


def test_a_killed_backend_leaves_the_team_served(llama_factory, tmp_path):
    first, second = llama_factory(), llama_factory()
    proxy = ProxyProcess(tmp_path, f"{first.url},{second.url}", **LIMITS).start()
    try:
        wait_until(lambda: len(proxy.status()["slots"]) == 4)
        users = [User(f"u{i}", context_words=60) for i in range(4)]
        assert set(served_by(proxy, users)) == {"0", "1"}
        second.kill()
        for _ in range(2):  # every turn answered, the first ones after the kill included
            assert set(served_by(proxy, users)) == {"0"}
        status = {b["url"]: b for b in proxy.status()["backends"]}
        assert status[second.url]["up"] is False and status[second.url]["slots"] == 0
        assert status[first.url]["requests"] > status[second.url]["requests"] > 0
        metrics = http("GET", proxy.url + "/metrics")[2].decode()
        assert f'proxycache_backend_up{{backend="{second.url}"}} 0.0' in metrics
    finally:
        proxy.stop()


def test_a_conversation_continues_on_another_backend_from_its_saved_file(llama_factory, tmp_path):
    shared = tmp_path / "shared-saves"
    shared.mkdir()
    first = llama_factory(save_dir=str(shared))
    second = llama_factory(save_dir=str(shared))
    proxy = ProxyProcess(tmp_path / "proxy", f"{first.url},{second.url}", slot_save_path=str(shared),
                         write_behind=0.5, **LIMITS).start()
    try:
        wait_until(lambda: len(proxy.status()["slots"]) == 4)
        ana = User("ana", context_words=600)
        record = ana.turn(proxy.client())
        wait_until(lambda: proxy.status()["disk"]["saves"] >= 1)  # write-behind kept it on disk
        home = first if any(s["backend"] == first.url and s["state"] == "hot" for s in proxy.status()["slots"]) \
            else second
        home.kill()
        record = ana.turn(proxy.client())
        assert record["decision"] == "restore", record
        assert record["cache_n"] > 1000  # the context came from the file, not recomputed
        assert proxy.status()["disk"]["cross_backend_restores"] == 1
    finally:
        proxy.stop()


def _files(directory) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.glob("slotcache_*.bin")}


def test_each_backends_save_directory_is_kept_within_the_budget_and_across_a_restart(llama_factory, tmp_path):
    """
    --backend-save-dirs: files are deleted from, counted in and reconciled with
    the directory of the backend that wrote them (they stayed past the budget,
    and a restart dropped the other backend's metas).
    """
    first, second = llama_factory(), llama_factory()  # each its own save directory
    dirs = {first.url: first.save_dir, second.url: second.save_dir}
    options = dict(backend_save_dirs=f"{first.save_dir},{second.save_dir}", slot_save_path=str(first.save_dir),
                   write_behind=0.3, **LIMITS)
    # one conversation's file, measured, sets a budget of about three
    proxy = ProxyProcess(tmp_path / "measure", f"{first.url},{second.url}", **options).start()
    try:
        User("probe", context_words=300).turn(proxy.client())
        wait_until(lambda: proxy.status()["disk"]["saves"] >= 1)
        size = proxy.status()["disk"]["bytes"]
    finally:
        proxy.stop()
    for directory in dirs.values():
        for path in directory.iterdir():
            path.unlink()
    budget = int(size * 3.5)
    proxy = ProxyProcess(tmp_path / "proxy", f"{first.url},{second.url}", max_cache_bytes=budget, **options).start()
    try:
        wait_until(lambda: len(proxy.status()["slots"]) == 4)
        users = [User(f"user{i}", context_words=300) for i in range(8)]
        for user in users:
            user.turn(proxy.client())
            saves = proxy.status()["disk"]["saves"]
            wait_until(lambda: proxy.status()["disk"]["saves"] > saves)  # written behind, budget enforced
        status = proxy.status()
        assert status["disk"]["evicted_entries"] >= 4
        files = {url: _files(directory) for url, directory in dirs.items()}
        assert all(files.values()), files  # both backends saved
        assert sum(sum(f.values()) for f in files.values()) <= budget, files
        metas = {p.stem: json.loads(p.read_text())["backend"] for p in (tmp_path / "proxy" / "meta").glob("*.meta")}
        assert {f"slotcache_{key}.bin" for key, url in metas.items() if url == second.url} == set(files[second.url])
        assert {f"slotcache_{key}.bin" for key, url in metas.items() if url == first.url} == set(files[first.url])
    finally:
        proxy.stop()
    saved = len(list((tmp_path / "proxy" / "meta").glob("*.meta")))  # the stop may have saved a slot more
    restarted = ProxyProcess(tmp_path / "proxy", f"{first.url},{second.url}", max_cache_bytes=budget, **options)
    restarted.start()
    try:
        assert restarted.status()["disk"]["entries"] == saved  # no backend's metas were dropped
        assert "whose .bin is gone" not in restarted.log_text()
    finally:
        restarted.stop()
