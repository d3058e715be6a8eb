"""
Shared fixtures: generated models and real llama.cpp servers (synchronous, so
that pytest-twisted tests can use them too).

Which llama.cpp serves the C{llama*} fixtures: C{--llama-engine=xllamacpp}
(default; the C{xllamacpp} wheel in a child process) or C{--llama-engine=binary}
(a C{llama-server} built once from source by L{proxycache.testing.llamabin}),
also set by C{PROXYCACHE_LLAMA_ENGINE}. C{LLAMA_SERVER_BIN=path} means "the
binary engine, with this binary". Tests that use a llama.cpp server through
these fixtures are marked C{llama}: C{pytest -m llama --llama-engine=binary}.

C{PROXYCACHE_TEST_MODELS}: where generated models are kept between runs
(default C{~/.cache/proxycache/test-models}).
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # "from tests.x import" also under a bare `pytest`
    sys.path.insert(0, str(ROOT))

from proxycache.embedded import LlamaServerSpec  # noqa: E402
from proxycache.testing import LlamaProcess, ProxyProcess, free_port  # noqa: E402

ENGINES = ("xllamacpp", "binary")
# The daemon's prefix thresholds in the end-to-end tests (not an IDE's defaults): CONVERSATION_LIMITS
# fit tests/conversations.py's conversations (~3-4k tokens); with SMALL_LIMITS a prompt of a few words
# is worth a slot of its own.
CONVERSATION_LIMITS = dict(min_prefix_chars=1000, min_prefix_words=150, min_prefix_blocks=8)
SMALL_LIMITS = dict(min_prefix_chars=10, min_prefix_words=5, min_prefix_blocks=1)
# Tests using any of these (directly or through another fixture) exercise llama.cpp.
LLAMA_FIXTURES = frozenset({"llama", "llama_factory", "module_llama", "llama_binary"})


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--llama-engine", choices=ENGINES, default=None,
        help="llama.cpp for the llama fixtures: the xllamacpp wheel (default) or a llama-server binary "
        "built from source (env PROXYCACHE_LLAMA_ENGINE; LLAMA_SERVER_BIN=path names a binary)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "llama: runs a real llama.cpp server (the --llama-engine one)")
    llama_engine_of(config)  # a bad PROXYCACHE_LLAMA_ENGINE stops the run here


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if LLAMA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.llama)


def llama_engine_of(config: pytest.Config) -> str:
    """The option, else C{binary} if C{LLAMA_SERVER_BIN} names one, else C{PROXYCACHE_LLAMA_ENGINE}."""
    engine = (
        config.getoption("--llama-engine")
        or ("binary" if os.environ.get("LLAMA_SERVER_BIN") else None)
        or os.environ.get("PROXYCACHE_LLAMA_ENGINE")
        or "xllamacpp"
    )
    if engine not in ENGINES:
        raise pytest.UsageError(f"PROXYCACHE_LLAMA_ENGINE={engine!r}: not one of {', '.join(ENGINES)}")
    return engine


def pytest_report_header(config: pytest.Config) -> str:
    engine = llama_engine_of(config)
    binary = os.environ.get("LLAMA_SERVER_BIN") if engine == "binary" else None
    return f"llama engine: {engine}" + (f" ({binary})" if binary else "")


@pytest.fixture(scope="session")
def llama_engine(pytestconfig: pytest.Config) -> str:
    """C{"xllamacpp"} or C{"binary"}: which llama.cpp the llama fixtures start."""
    return llama_engine_of(pytestconfig)


@pytest.fixture(scope="session")
def llama_binary(llama_engine: str) -> str | None:
    """The llama-server binary the fixtures start, or C{None} for xllamacpp."""
    if llama_engine == "xllamacpp":
        return None
    named = os.environ.get("LLAMA_SERVER_BIN")
    if named:
        return named
    from proxycache.testing.llamabin import ensure_llama_server

    return str(ensure_llama_server())  # built once, then cached under ~/.cache


@pytest.fixture(scope="session")
def models_dir() -> Path:
    default = Path.home() / ".cache" / "proxycache" / "test-models"
    path = Path(os.environ.get("PROXYCACHE_TEST_MODELS") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_model(models_dir: Path) -> Path:
    from proxycache.tinymodel import TINY, ensure_model

    return ensure_model(models_dir, TINY)


@pytest.fixture(scope="session")
def other_model(models_dir: Path) -> Path:
    from proxycache.tinymodel import OTHER, ensure_model

    return ensure_model(models_dir, OTHER)


@pytest.fixture
def llama_factory(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, llama_binary: str | None
) -> Iterator[Callable[..., LlamaProcess]]:
    """
    C{llama_factory(**spec_overrides) -> LlamaProcess}: a started server on the
    tiny model, 2 slots of 8192, a fresh save_dir and a free port by default.
    """
    started: list[LlamaProcess] = []
    count = itertools.count()

    def make(**overrides: Any) -> LlamaProcess:
        workdir = tmp_path_factory.mktemp("llama")
        fields: dict[str, Any] = dict(
            model=str(tiny_model),
            slots=2,
            ctx_per_slot=8192,
            save_dir=str(workdir / "saves"),
            port=free_port(),
            threads=2,
            binary=llama_binary,
        )
        fields.update(overrides)
        fields["model"] = str(fields["model"])
        if fields["save_dir"] is not None:
            Path(fields["save_dir"]).mkdir(parents=True, exist_ok=True)
        process = LlamaProcess(LlamaServerSpec(**fields), workdir / f"llama-{next(count)}.log")
        started.append(process)
        return process.start()

    yield make
    for process in started:
        process.stop()


@pytest.fixture
def llama(llama_factory: Callable[..., LlamaProcess]) -> LlamaProcess:
    """A 2-slot server on the tiny model (8192 tokens a slot)."""
    return llama_factory()


@pytest.fixture(scope="module")
def module_llama(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, llama_binary: str | None
) -> Iterator[LlamaProcess]:
    """One 2-slot tiny-model server shared by a module's tests (for tests that change nothing)."""
    workdir = tmp_path_factory.mktemp("llama-module")
    process = LlamaProcess(
        LlamaServerSpec(
            model=str(tiny_model), slots=2, ctx_per_slot=4096, save_dir=str(workdir / "saves"),
            port=free_port(), threads=2, binary=llama_binary,
        ),
        workdir / "llama.log",
    ).start()
    yield process
    process.stop()


def start_proxy(
    workdir: Path, llama: LlamaProcess, *, limits: dict[str, int] = CONVERSATION_LIMITS, saves: bool = False,
    **options: Any,
) -> ProxyProcess:
    """
    The daemon (C{twistd -n proxycache}) in front of C{llama}, started, with
    the prefix thresholds C{limits} and C{options}.  C{saves}: it sees
    llama.cpp's save directory (C{--slot-save-path}), so its disk tier works.
    """
    if saves and llama.save_dir is not None:
        options.setdefault("slot_save_path", str(llama.save_dir))
    return ProxyProcess(workdir, llama.url, **{**limits, **options}).start()


@pytest.fixture
def proxy(llama: LlamaProcess, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProxyProcess]:
    """C{start_proxy} in front of C{llama} with the test module's C{PROXY_OPTIONS}; stopped after the test."""
    process = start_proxy(tmp_path, llama, **getattr(request.module, "PROXY_OPTIONS", {}))
    yield process
    process.stop()
