"""App test fixtures: a fake engine, a filled-in state, and no thread left running after a test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from emloc_app.state import WizardState
from emloc_app.worker import running_workers, shutdown_workers
from emloc_engine.data import DataConfig
from tests.app.fakes import GIB, FakeEngine, machine, model_info, report


@pytest.fixture(autouse=True)
def _no_threads_left(qapp: object) -> Iterator[None]:
    """After each test (and after qtbot has closed its widgets): no stage thread running, and every object the
    test scheduled for deletion deleted now, so none is destroyed or delivered to in a later test's event loop
    (a rare segfault in a later Model-page test came from such leftovers)."""
    yield
    assert shutdown_workers(10000), "a stage thread did not finish"
    assert not running_workers()
    import gc

    from PySide6.QtCore import QCoreApplication, QEvent

    for _ in range(3):
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
        QCoreApplication.processEvents()
        gc.collect()


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeEngine:
    """The default fake engine functions, installed for this test."""
    return FakeEngine(tmp_path).install(monkeypatch.setattr)


@pytest.fixture
def state(tmp_path: Path) -> WizardState:
    """The state as it is after the Data page: machine, model and data."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"messages": []}\n')
    model_dir = tmp_path / "model"
    model = model_info("meta-llama/Llama-3.1-8B-Instruct", model_dir)
    return WizardState(
        machine=machine(), gpu_index=0, budget_bytes=20 * GIB, model=model, model_dir=model_dir,
        data_path=data, data_config=DataConfig(path=data), data_report=report(), run_dir=tmp_path / "run",
    )
