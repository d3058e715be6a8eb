"""
The llama.cpp child process: fixtures, slot save/restore, the Twisted service,
and the argv for a real llama-server binary.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

import attrs
import pytest
import pytest_twisted

from proxycache.embedded import API_KEY_ENV, EmbeddedLlamaService, LlamaServerSpec, child_env, command, free_port

PROMPT = "The quick brown fox jumps over the lazy dog. " * 8


def test_repeated_prompt_on_pinned_slot_reuses_cache(llama):
    first = llama.chat(PROMPT, id_slot=1)
    second = llama.chat(PROMPT, id_slot=1)
    assert first["timings"]["cache_n"] == 0
    assert second["timings"]["cache_n"] > len(PROMPT) // 2
    assert second["timings"]["prompt_n"] < first["timings"]["prompt_n"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == second["timings"]["cache_n"]
    assert [slot["id"] for slot in llama.slots()] == [0, 1]
    assert llama.metrics()["llamacpp:prompt_tokens_total"] >= first["timings"]["prompt_n"]


def test_slot_save_and_restore_round_trip(llama):
    prefill = llama.chat(PROMPT, id_slot=0)["timings"]["prompt_n"]
    saved = llama.post_json("/slots/0?action=save", {"filename": "conv.bin"})
    assert saved["n_saved"] >= prefill
    assert (llama.save_dir / "conv.bin").stat().st_size == saved["n_written"]

    restored = llama.post_json("/slots/1?action=restore", {"filename": "conv.bin"})
    assert restored["n_restored"] == saved["n_saved"]
    again = llama.chat(PROMPT, id_slot=1)
    assert again["timings"]["cache_n"] >= prefill - 1

    # and the file outlives the server
    llama.restart()
    assert llama.post_json("/slots/0?action=restore", {"filename": "conv.bin"})["n_restored"]
    assert llama.chat(PROMPT, id_slot=0)["timings"]["cache_n"] >= prefill - 1


def test_restore_of_another_models_file_is_refused(llama_factory, other_model):
    llama = llama_factory()
    llama.chat(PROMPT, id_slot=0)
    llama.post_json("/slots/0?action=save", {"filename": "tiny.bin"})
    other = llama_factory(model=other_model, save_dir=llama.spec.save_dir)
    status, _ = other.call("POST", "/slots/0?action=restore", {"filename": "tiny.bin"})
    assert status == 400


def test_embedded_child_exits_when_its_parent_goes(llama_factory, llama_engine):
    if llama_engine == "binary":
        pytest.skip("proxycache.embedded's xllamacpp child watches its stdin; llama-server does not")
    llama = llama_factory()
    llama.process.stdin.close()  # what the OS does when the parent dies
    assert llama.process.wait(10) == 0


@pytest_twisted.ensureDeferred
async def test_service_starts_and_stops(tiny_model, tmp_path):
    spec = LlamaServerSpec(
        model=str(tiny_model), slots=1, ctx_per_slot=2048, save_dir=str(tmp_path / "saves"),
        port=free_port(), threads=1,
    )
    service = EmbeddedLlamaService(spec)
    service.startService()
    try:
        await service.whenReady(timeout=30)
        import treq

        response = await treq.get(service.url + "/props", persistent=False)
        props = await response.json()
        assert props["total_slots"] == 1
        assert (tmp_path / "saves").is_dir()
    finally:
        pid = service.pid
        await service.stopService()
    assert service.exit is not None and service.exit.value.exitCode == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", spec.port), timeout=1).close()


@pytest_twisted.ensureDeferred
async def test_service_reports_a_child_that_cannot_start(tmp_path):
    from proxycache.embedded import LlamaServerError

    spec = LlamaServerSpec(model=str(tmp_path / "missing.gguf"), slots=1, port=free_port())
    service = EmbeddedLlamaService(spec)
    service.startService()
    with pytest.raises(LlamaServerError, match="exited"):
        await service.whenReady(timeout=30)
    await service.stopService()


def test_command_for_a_binary():
    spec = LlamaServerSpec(
        model="/m.gguf", slots=3, ctx_per_slot=1000, save_dir="/saves", port=8081, threads=2,
        cache_ram_mib=0, cache_idle_slots=False, kv_unified=True, slot_prompt_similarity=0.5,
        api_key="k", binary="/bin/llama-server",
    )
    argv = command(spec)
    assert argv[0] == "/bin/llama-server"
    pairs = dict(zip(argv[1:], argv[2:]))
    assert pairs["-m"] == "/m.gguf"
    assert pairs["-np"] == "3"
    assert pairs["-c"] == "3000"
    assert pairs["--host"] == "127.0.0.1"
    assert pairs["--port"] == "8081"
    assert pairs["-t"] == "2"
    assert pairs["--slot-save-path"] == "/saves/"
    assert pairs["--cache-ram"] == "0"
    assert pairs["--slot-prompt-similarity"] == "0.5"
    for flag in ("--metrics", "--slots", "--no-cache-idle-slots", "--kv-unified"):
        assert flag in argv


def test_command_leaves_llama_cpp_defaults_alone():
    argv = command(LlamaServerSpec(model="m", slots=1, port=1, metrics=False, binary="llama-server"))
    assert "--metrics" not in argv
    for flag in ("--slot-save-path", "--cache-ram", "--api-key", "--slot-prompt-similarity"):
        assert flag not in argv
    assert not [a for a in argv if "kv-unified" in a or "idle-slots" in a]
    assert int(argv[argv.index("-t") + 1]) == min(os.cpu_count() or 1, 4)


def test_command_without_binary_runs_this_module():
    spec = LlamaServerSpec(model="m", slots=1, port=1, api_key="k")
    argv = command(spec)
    assert argv[:3] == [sys.executable, "-m", "proxycache.embedded"]
    import json

    assert LlamaServerSpec(**json.loads(argv[3])) == attrs.evolve(spec, api_key=None)


@pytest.mark.parametrize("binary", [None, "/bin/llama-server"])
def test_api_key_goes_in_the_environment_not_the_command_line(binary):
    # any local user can read a command line (ps, /proc/PID/cmdline); only we can read our child's environment
    spec = LlamaServerSpec(model="m", slots=1, port=1, api_key="secret-key", binary=binary)
    assert "secret-key" not in " ".join(command(spec))
    assert child_env(spec)[API_KEY_ENV] == "secret-key"
    assert API_KEY_ENV not in child_env(attrs.evolve(spec, api_key=None))


def test_embedded_child_stops_on_sigterm(llama):
    llama.process.send_signal(signal.SIGTERM)
    assert llama.process.wait(10) == 0
