"""
Saved caches tied to the weights that wrote them, against real llama.cpp
servers: two models of one shape sharing a save directory, a llama-server
restarted with other weights between two looks of the monitor, one server
under two spellings, a key per backend (issue 20).

Every answer that went through a cache is compared with the one a reference
llama-server running the same weights computes from scratch (C{cache_prompt:
false}, greedy): llama.cpp on CPU answers a greedy request identically with
and without a cached prefix, so any difference is a wrong cache.
"""

from __future__ import annotations

import random

from tests.conftest import CONVERSATION_LIMITS
from tests.conversations import text
from tests.test_disk_tier import same_shape_models
from proxycache.testing import ProxyProcess, ReplyTap, http, wait_for

ADMIN = {"Authorization": "Bearer admin-key"}
ANSWER_TOKENS = 16


def system_prompt(seed: str = "team", words: int = 600) -> str:
    return "Team agent instructions. " + text(random.Random(seed), words)


def ask(proxy: ProxyProcess, messages: list[dict]) -> tuple[str, dict[str, str]]:
    """A greedy chat turn through the proxy: (answer, the proxy's headers)."""
    raw = proxy.client(timeout=300).chat.completions.with_raw_response.create(
        model="any", messages=messages, max_tokens=ANSWER_TOKENS, temperature=0,
    )
    return raw.parse().choices[0].message.content or "", dict(raw.headers)


def reference(server, messages: list[dict]) -> str:
    """What C{server}'s weights answer to C{messages} computed from scratch."""
    body = {"messages": messages, "max_tokens": ANSWER_TOKENS, "temperature": 0, "cache_prompt": False}
    return server.post_json("/v1/chat/completions", body)["choices"][0]["message"]["content"] or ""


def admin(proxy: ProxyProcess, method: str, path: str, body: dict) -> dict:
    status, _, reply = http(method, proxy.url + path, body, ADMIN)
    assert status == 200, reply
    return reply


def saves(proxy: ProxyProcess) -> int:
    return proxy.status()["disk"]["saves"]


def test_one_conversation_saved_by_two_models_in_one_directory_restores_only_its_own(
    llama_factory, models_dir, tmp_path
):
    a, b = same_shape_models(models_dir)
    shared = tmp_path / "shared-saves"
    shared.mkdir()
    on_a, on_b = llama_factory(model=a, save_dir=str(shared)), llama_factory(model=b, save_dir=str(shared))
    checker = llama_factory(model=a, save_dir=None)
    proxy = ProxyProcess(
        tmp_path / "proxy", f"{on_a.url},{on_b.url}", slot_save_path=str(shared), admin_keys="admin-key",
        write_behind=0.2, **CONVERSATION_LIMITS,
    ).start()
    try:
        wait_for(lambda: len(proxy.status()["slots"]) == 4, what="both backends up")
        system = system_prompt()
        first = [{"role": "system", "content": system}, {"role": "user", "content": "What is the plan?"}]
        # The same conversation on A, then on B (A drained), each saved by write-behind.
        admin(proxy, "POST", "/proxycache/backends/drain", {"url": on_b.url})
        assert ask(proxy, first)[1]["x-proxycache-backend"] == "0"
        wait_for(lambda: saves(proxy) == 1, what="A's save")
        admin(proxy, "POST", "/proxycache/backends", {"url": on_b.url})
        admin(proxy, "POST", "/proxycache/backends/drain", {"url": on_a.url})
        answer, headers = ask(proxy, first)
        assert headers["x-proxycache-backend"] == "1" and headers["x-proxycache-decision"] == "miss", headers
        wait_for(lambda: saves(proxy) == 2, what="B's save")
        assert len(list(shared.glob("slotcache_*.bin"))) == 2  # two models, two files
        # A branch of the conversation on A (B drained): a fork of A's slot holding it.
        admin(proxy, "POST", "/proxycache/backends", {"url": on_a.url})
        admin(proxy, "POST", "/proxycache/backends/drain", {"url": on_b.url})
        branch = [{"role": "system", "content": system}, {"role": "user", "content": "Who reviews the patch?"}]
        answer, headers = ask(proxy, branch)
        # Restored from A's own file, or (the slot's own part being saved already) its shared prefix reused in place.
        assert headers["x-proxycache-backend"] == "0" and headers["x-proxycache-decision"] in ("restore", "hit"), headers
        assert answer == reference(checker, branch)
    finally:
        proxy.stop()


def on_a_switchable_model(llama_factory, models_dir, tmp_path):
    """
    A server on a model path that is a symbolic link, and how to point it at other
    weights of the same shape, or back (the file's size and time follow the link).
    """
    a, b = same_shape_models(models_dir)
    link = tmp_path / "models" / "team.gguf"
    link.parent.mkdir()
    link.symlink_to(a)

    def point_at(target) -> None:
        link.unlink()
        link.symlink_to(target)

    return llama_factory(model=link), a, b, point_at


def test_a_save_made_before_the_monitor_saw_a_restart_with_other_weights_is_not_restored_after_a_roll_back(
    llama_factory, models_dir, tmp_path
):
    llama, a, b, point_at = on_a_switchable_model(llama_factory, models_dir, tmp_path)
    checker = llama_factory(model=a, save_dir=None)
    options = dict(slot_save_path=str(llama.save_dir), health_interval=60, write_behind=0.2, **CONVERSATION_LIMITS)
    proxy = ProxyProcess(tmp_path / "proxy", llama.url, **options).start()
    try:
        # An upgrade to other weights at the same path; the monitor does not look again for a minute.
        llama.stop()
        point_at(b)
        llama.start()
        ben = [{"role": "system", "content": system_prompt("ben")}, {"role": "user", "content": "First question?"}]
        answer, headers = ask(proxy, ben)  # computed by the new weights
        assert headers["x-proxycache-decision"] == "miss"
        ben += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the second?"}]
        wait_for(lambda: proxy.status()["disk"]["saves"] + proxy.status()["disk"]["save_failures"] >= 1,
                 what="the write-behind save")
    finally:
        proxy.stop()
    # Rolled back to the old weights; the proxy restarts too.
    llama.stop()
    point_at(a)
    llama.start()
    proxy = ProxyProcess(tmp_path / "proxy", llama.url, **options).start()
    try:
        answer, headers = ask(proxy, ben)
        assert answer == reference(checker, ben), headers
    finally:
        proxy.stop()


def backends_listed(proxy: ProxyProcess) -> dict[str, dict]:
    status, _, body = http("GET", proxy.url + "/proxycache/backends", headers=ADMIN)
    assert status == 200, body
    return {b["url"]: b for b in body["backends"]}


def test_a_backend_added_at_run_time_gets_its_own_key_or_none(llama_factory, tmp_path):

    keyed = llama_factory(api_key="first-secret")
    other = llama_factory(api_key="second-secret")
    open_one = llama_factory()
    tap = ReplyTap(open_one.url)  # sees what the proxy sends the backend that has no key
    proxy = ProxyProcess(tmp_path, keyed.url, upstream_api_key="first-secret", admin_keys="admin-key").start()
    try:
        admin(proxy, "POST", "/proxycache/backends", {"url": tap.url})
        admin(proxy, "POST", "/proxycache/backends", {"url": other.url, "api_key": "second-secret"})
        wait_for(lambda: all(b["up"] for b in backends_listed(proxy).values()), timeout=60, what="all three up")
        assert len(proxy.status()["slots"]) == 6
        sent = tap.sent().lower()
        assert b"get /props" in sent and b"authorization" not in sent and b"secret" not in sent
        status, _, reply = http("POST", proxy.url + "/proxycache/backends", {"url": "http://127.0.0.1:9", "api_key": 7},
                                ADMIN)
        assert status == 400 and "api_key" in reply["error"]["message"]
    finally:
        proxy.stop()
        tap.close()


def test_each_configured_backend_gets_its_own_key_and_sighup_adds_one_with_its_key(llama_factory, tmp_path):
    import signal

    first, second = llama_factory(api_key="first-secret"), llama_factory(api_key="second-secret")
    third = llama_factory()
    tap = ReplyTap(third.url)
    ini = tmp_path / "proxycache.ini"
    ini.write_text(
        f"[proxycache]\nllama_url = {first.url},{second.url}\nupstream_api_key = first-secret\n"
        f"backend_api_keys = {second.url}=second-secret\n"
    )
    proxy = ProxyProcess(tmp_path, None, config=str(ini), admin_keys="admin-key").start()
    try:
        wait_for(lambda: len(proxy.status()["slots"]) == 4, timeout=60, what="both configured backends up")
        # A third, added by SIGHUP, named with no key.
        ini.write_text(
            f"[proxycache]\nllama_url = {first.url},{second.url},{tap.url}\nupstream_api_key = first-secret\n"
            f"backend_api_keys = {second.url}=second-secret {tap.url}=\n"
        )
        proxy.process.send_signal(signal.SIGHUP)
        wait_for(lambda: backends_listed(proxy).get(tap.url, {}).get("up"), timeout=60, what="the third up")
        sent = tap.sent().lower()
        assert b"get /props" in sent and b"authorization" not in sent
    finally:
        proxy.stop()
        tap.close()


def test_one_llama_server_added_under_a_second_spelling_is_not_counted_twice_nor_probed(llama, tmp_path):
    proxy = ProxyProcess(
        tmp_path, llama.url, admin_keys="admin-key", slot_save_path=str(llama.save_dir), write_behind=60,
        **CONVERSATION_LIMITS,
    ).start()
    try:
        ana = [{"role": "system", "content": system_prompt("ana")}, {"role": "user", "content": "First question?"}]
        answer, _ = ask(proxy, ana)
        ana += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the second?"}]
        other_spelling = llama.url.replace("127.0.0.1", "localhost")
        admin(proxy, "POST", "/proxycache/backends", {"url": other_spelling})
        wait_for(lambda: backends_listed(proxy)[other_spelling]["duplicate_of"] == llama.url, timeout=30,
                 what="the second spelling seen as the same process")
        assert len(proxy.status()["slots"]) == 2
        # The hot slot was not overwritten by an identity probe: the conversation continues in it.
        answer, headers = ask(proxy, ana)
        assert headers["x-proxycache-decision"] == "hit", headers
        assert int(headers["x-proxycache-cached-tokens"]) > 1000, headers
    finally:
        proxy.stop()
