"""Shared fixtures: tiny local models in an HF-cache-shaped folder, an isolated app data folder.

The network is off for every test (pytest-socket, ``--disable-socket`` in pyproject); Unix
sockets stay allowed for Qt. Tests run on the CPU, single-threaded torch, offline.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.tiny_models import ARCHS, build_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
torch.set_num_threads(1)  # tiny models: threads only add contention on 2-core CI


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; GPU numbers are in benchmarks/RESULTS.md")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own EMLOC_HOME and HF cache, so nothing touches the user's files."""
    home = tmp_path_factory.mktemp("emloc_home")
    monkeypatch.setenv("EMLOC_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hf" / "hub"))
    yield home


@pytest.fixture(autouse=True)
def _plenty_of_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner sees 1 TiB free where a run folder goes: plans of real model shapes (Llama-3-8B facts need
    ~45 GiB for a run folder) must not depend on how full the test machine's disk is. Tests of the disk check
    give ``disk_free_bytes`` themselves."""
    from emloc_engine.run import plan

    monkeypatch.setattr(plan, "_disk_free", lambda run_dir: 2**40)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide HF-cache-shaped folder with one tiny model of each family (read-only by convention)."""
    cache = tmp_path_factory.mktemp("hf_cache") / "hub"
    for arch in ARCHS:
        build_tiny_model(arch, cache)
    return cache


def _snapshot(cache: Path, arch: str) -> Path:
    repo = cache / f"models--emloc-test--tiny-{arch}"
    rev = (repo / "refs" / "main").read_text().strip()
    return repo / "snapshots" / rev


@pytest.fixture(params=ARCHS)
def tiny_model_dir(request: pytest.FixtureRequest, tiny_cache: Path) -> Path:
    """The snapshot folder of a tiny model, parametrised over all five families."""
    return _snapshot(tiny_cache, str(request.param))


@pytest.fixture(scope="session")
def tiny_llama(tiny_cache: Path) -> Path:
    """The snapshot folder of the tiny Llama (session-wide, so module fixtures can build on it)."""
    return _snapshot(tiny_cache, "llama")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module, restored after it: tiny matrices run faster on one thread than
    on two, far faster on a busy machine.

    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
