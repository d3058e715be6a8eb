"""
What a llama-server lacks of what proxycache relies on, said when it comes up:
in the log, in /status (backends[].warnings) and in /proxycache/health
(backend_warnings, informational).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from proxycache.backend import (
    OLDEST_SUPPORTED_BUILD, RAM_CACHE, Features, backend_warnings, build_notice, build_number,
)
from proxycache.backend._features import SAVES_OFF, SLOTS_OFF, saves_enabled
from proxycache.slots import Monitor, Scheduler
from proxycache.testing import ProxyProcess, http
from tests.fakes import FakeBackend

# /props as b11549 (xllamacpp) and b11434 (binary) answer it, trimmed.
PROPS = {
    "total_slots": 2, "build_info": "b0-unknown", "endpoint_slots": True, "endpoint_metrics": True,
    "default_generation_settings": {"n_ctx": 8192, "params": {}}, "model_path": "tiny.gguf",
}
NO_SLOTS = dict(PROPS, endpoint_slots=False)
ALL_THERE = Features(slots_endpoint=True, slot_saves=True)


def test_a_complete_server_gets_no_warnings():
    assert backend_warnings(PROPS, ALL_THERE, 2) == []
    assert backend_warnings(dict(PROPS, build_info="b11434-unknown"), ALL_THERE, None) == []
    assert backend_warnings(PROPS, Features(), None) == []  # could not tell: no warning


def test_slot_saves_off_is_told_by_the_restore_probe():
    # what llama-server answers a restore of a file that is not there
    assert saves_enabled(501) is False  # "This server does not support slots action. Start it with --slot-save-path"
    # 400 "Unable to restore slot: No available space in KV cache or invalid slot save file"
    assert saves_enabled(400) is True
    assert saves_enabled(401) is None and saves_enabled(0) is None
    assert backend_warnings(PROPS, Features(slots_endpoint=True, slot_saves=False), None) == [SAVES_OFF]


def test_no_slots_endpoint_from_props_or_from_slots():
    assert backend_warnings(NO_SLOTS, Features(slot_saves=True), None) == [SLOTS_OFF]
    assert backend_warnings(PROPS, Features(slots_endpoint=False, slot_saves=True), None) == [SLOTS_OFF]
    assert backend_warnings(NO_SLOTS, Features(slots_endpoint=False, slot_saves=False), 4) == [
        "--slots is 4 but llama-server has 2 slots; using 2", SLOTS_OFF, SAVES_OFF,
    ]


def test_builds_older_than_the_oldest_supported():
    assert build_number("b11434-unknown") == 11434
    assert build_number("b11549-6f1b2c3") == 11549
    assert build_number("b0-unknown") is None and build_number(None) is None and build_number("stub") is None
    old = backend_warnings(dict(PROPS, build_info="b9000-abc"), ALL_THERE, None)
    assert old == [f"build b9000 is older than b{OLDEST_SUPPORTED_BUILD}, the oldest supported"]
    # an unknown build is information, not a problem
    assert "build unknown (b0-unknown)" in (build_notice(PROPS) or "")
    assert build_notice(dict(PROPS, build_info="b11434-unknown")) is None


def described(features: Features) -> FakeBackend:
    """A backend of two served slots that says it lacks what C{features} says."""
    return FakeBackend(url="http://b", props=PROPS, model="model", features=features,
                       slot_list=[{"id": 0, "n_ctx": 8192, "id_task": 1}, {"id": 1, "n_ctx": 8192, "id_task": 2}])


def check(monitor: Monitor) -> None:
    d = monitor.check()
    assert isinstance(d, Deferred) and d.called


def test_the_monitor_keeps_the_warnings_of_the_last_start_and_those_seen_at_run_time():
    clock = Clock()
    backend = described(Features(slots_endpoint=True, slot_saves=False))
    monitor = Monitor(clock, Scheduler(clock, min_ratio=0.5, affinity_wait=1, max_queue=1), [backend], 1.0, None)
    check(monitor)
    health = monitor.health[backend.name]
    assert health.up and health.warnings == [SAVES_OFF]
    monitor.noticed_ram_cache(backend.name)  # the dispatcher saw llama.cpp reuse tokens the proxy did not place
    monitor.noticed_ram_cache(backend.name)
    assert health.warnings == [SAVES_OFF, RAM_CACHE]
    backend.features = ALL_THERE  # restarted with --slot-save-path
    health.up = False
    check(monitor)
    assert health.warnings == []


# -- against a real llama.cpp server --------------------------------------------------


def backend_warnings_of(proxy: ProxyProcess) -> tuple[list[str], dict[str, Any]]:
    status = proxy.status()
    health_status, _, health = http("GET", proxy.url + "/proxycache/health")
    assert health_status == 200, health  # warnings do not make the proxy unhealthy
    return status["backends"][0]["warnings"], health


def test_a_server_without_a_slot_save_path_is_reported(llama_factory, tmp_path):
    llama = llama_factory(save_dir=None)
    proxy = ProxyProcess(tmp_path, llama.url).start()
    try:
        warnings, health = backend_warnings_of(proxy)
        assert any("--slot-save-path" in w and "off" in w for w in warnings), warnings
        assert health["backend_warnings"] == {llama.url: warnings}
        assert any("--slot-save-path" in line for line in proxy.warnings())
        # the probe left the server as it was: it still serves, and its slots are empty
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert http("POST", proxy.url + "/v1/chat/completions", body)[0] == 200
    finally:
        proxy.stop()


def test_a_complete_server_is_not_reported(llama_factory, tmp_path):
    llama = llama_factory(cache_ram_mib=0)
    proxy = ProxyProcess(tmp_path, llama.url, slot_save_path=llama.spec.save_dir).start()
    try:
        warnings, health = backend_warnings_of(proxy)
        assert warnings == []
        assert health["backend_warnings"] == {}
        assert not any("--slot-save-path" in line for line in proxy.warnings())
        # the restore probe left no trace in the slots
        assert all(not s.get("n_prompt_tokens_cache") for s in llama.slots())
    finally:
        proxy.stop()


def test_llama_cpps_own_ram_cache_is_reported_once_it_moves_a_conversation(llama_factory, tmp_path):
    """--cache-ram shows neither in /props nor in /metrics: seen once llama.cpp reuses what the proxy did not place."""
    llama = llama_factory(slots=1, save_dir=None)  # llama.cpp's default RAM cache; no disk tier to restore from
    proxy = ProxyProcess(tmp_path, llama.url, min_prefix_chars=10, min_prefix_words=2, min_prefix_blocks=1).start()
    try:
        assert RAM_CACHE not in backend_warnings_of(proxy)[0]

        def ask(user: str) -> None:
            body = {"messages": [{"role": "user", "content": f"{user} " + "word " * 300}], "max_tokens": 2}
            assert http("POST", proxy.url + "/v1/chat/completions", body)[0] == 200

        ask("ana")
        ask("ben")  # evicts ana's prompt into llama.cpp's RAM cache
        ask("ana")  # the proxy plans a miss; llama.cpp loads ana's prompt back by itself
        warnings, health = backend_warnings_of(proxy)
        assert RAM_CACHE in warnings, warnings
        assert RAM_CACHE in health["backend_warnings"][llama.url]
    finally:
        proxy.stop()
