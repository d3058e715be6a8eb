"""
Shared fixtures: generated models and real llama.cpp servers (synchronous, so
that pytest-twisted tests can use them too).

C{LLAMA_SERVER_BIN}: path of a real C{llama-server} to test against instead of
the embedded xllamacpp one. C{PROXYCACHE_TEST_MODELS}: where generated models
are kept between runs (default C{~/.cache/proxycache/test-models}).
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

from proxycache.embedded import LlamaServerSpec, free_port  # noqa: E402
from tests.llama import LlamaProcess  # noqa: E402


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
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
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
            binary=os.environ.get("LLAMA_SERVER_BIN") or None,
        )
        fields.update(overrides)
        fields["model"] = str(fields["model"])
        if fields["save_dir"] is not None:
            Path(fields["save_dir"]).mkdir(parents=True, exist_ok=True)
        process = LlamaProcess(LlamaServerSpec(**fields), workdir / f"llama-{next(count)}.log")
        started.append(process)
        return process

    yield make
    for process in started:
        process.stop()


@pytest.fixture
def llama(llama_factory: Callable[..., LlamaProcess]) -> LlamaProcess:
    """A 2-slot server on the tiny model (8192 tokens a slot)."""
    return llama_factory()


@pytest.fixture(scope="module")
def module_llama(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaProcess]:
    """One 2-slot tiny-model server shared by a module's tests (for tests that change nothing)."""
    workdir = tmp_path_factory.mktemp("llama-module")
    process = LlamaProcess(
        LlamaServerSpec(
            model=str(tiny_model), slots=2, ctx_per_slot=4096, save_dir=str(workdir / "saves"),
            port=free_port(), threads=2, binary=os.environ.get("LLAMA_SERVER_BIN") or None,
        ),
        workdir / "llama.log",
    )
    yield process
    process.stop()
