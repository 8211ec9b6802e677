"""The Runs page: the start page when runs exist; open, resume, compare and delete runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtWidgets import QMessageBox

from emloc_app.pages import runs_page
from emloc_app.settings import Settings
from emloc_app.state import WizardState
from emloc_app.wizard import EmlocWizard, Page
from emloc_engine.core import paths
from emloc_engine.core.errors import InsufficientMemory
from emloc_engine.data.config import DataConfig
from emloc_engine.machine import hardware
from emloc_engine.run.config import RunConfig
from emloc_engine.run.manifest import Manifest, StageRecord, write_manifest
from emloc_engine.run.metrics_log import MetricsWriter
from tests.app.fakes import FakeEngine, machine
from tests.app.test_run_try import planned


def make_run(root: Path, *, finished: bool, losses: list[float], created: str) -> Path:
    """A run folder as the orchestrator leaves it (manifest + metrics.jsonl)."""
    cfg = RunConfig(
        model_dir=root.parent / "SmolLM2", data=DataConfig(path=root.parent / "chat.jsonl"), run_dir=root
    )
    done = StageRecord(status="done")
    stages = {"emulator": done, "train": done if finished else StageRecord(status="cancelled")}
    if finished:
        stages["correct"] = done
    root.mkdir(parents=True)
    write_manifest(Manifest(root=root, config=cfg, stages=stages, created=created))
    writer = MetricsWriter(root / "tensorboard", tensorboard=False)
    for step, loss in enumerate(losses, start=1):
        writer.log("train", "train/loss", loss, step)
    writer.close()
    return root


def wizard_on(qtbot: Any, settings: Settings | None = None) -> EmlocWizard:
    wizard = EmlocWizard(settings=settings)
    qtbot.addWidget(wizard)
    wizard.show()
    return wizard


def select(page: runs_page.RunsPage, *names: str) -> None:
    page.table.clearSelection()
    for row, run in enumerate(page.runs):
        if run.run_dir.name in names:
            page.table.setRangeSelected(_row_range(page, row), True)


def _row_range(page: runs_page.RunsPage, row: int) -> Any:
    from PySide6.QtWidgets import QTableWidgetSelectionRange

    return QTableWidgetSelectionRange(row, 0, row, page.table.columnCount() - 1)


def test_start_page_is_runs_only_when_runs_exist_and_rows_say_what_each_run_is(
    qtbot,
    tmp_path: Path,  # type: ignore[no-untyped-def]
    fake: FakeEngine,
) -> None:
    first = wizard_on(qtbot)
    assert first.currentId() == Page.Machine  # a first start: no runs yet
    qtbot.waitUntil(lambda: not first.machine_page.busy(), timeout=60_000)
    runs = paths.runs_dir()
    make_run(runs / "old", finished=True, losses=[2.0, 1.5], created="2026-11-01T10:00:00+00:00")
    make_run(runs / "new", finished=False, losses=[3.0], created="2026-12-01T10:00:00+00:00")
    (runs / "old" / "model.gguf").write_bytes(b"GGUF")
    wizard = wizard_on(qtbot)
    assert wizard.currentId() == Page.Runs
    page = wizard.runs_page
    cells = [[page.table.item(r, c).text() for c in range(page.table.columnCount())] for r in range(2)]
    assert cells[0][0] == "SmolLM2" and cells[0][1] == "chat.jsonl" and cells[0][3] == "stopped at training"
    assert cells[0][4] == "3.000" and cells[0][6] == "–"
    assert cells[1][3] == "finished" and cells[1][4] == "1.500" and cells[1][6] == "gguf"
    assert [r.run_dir.name for r in page.selected()] == ["new"]  # the newest is selected: Open works at once
    assert page.open_button.isEnabled()
    select(page, "new")
    assert (
        page.resume_button.isEnabled()
        and page.open_button.isEnabled()
        and not page.compare_button.isEnabled()
    )
    select(page, "old")
    assert not page.resume_button.isEnabled()  # finished: nothing to resume
    wizard.next()  # "New run >"
    assert wizard.currentId() == Page.Machine and wizard.state.run_dir is None
    qtbot.waitUntil(lambda: not wizard.machine_page.busy(), timeout=60_000)


def test_open_a_finished_run_goes_to_try_and_back_returns(qtbot, tmp_path: Path, fake: FakeEngine) -> None:  # type: ignore[no-untyped-def]
    run = make_run(
        paths.runs_dir() / "done", finished=True, losses=[2.0], created="2026-12-01T10:00:00+00:00"
    )
    settings = Settings(tmp_path / "s.ini")
    wizard = wizard_on(qtbot, settings)
    page = wizard.runs_page
    select(page, "done")
    page.open_button.click()
    assert wizard.currentId() == Page.Try
    assert wizard.state.run_dir == run and wizard.state.model_dir == run.parent / "SmolLM2"
    assert wizard.state.all_stages_done() and settings.recent_runs() == [run]
    wizard.back()
    assert wizard.currentId() == Page.Runs


def test_resume_a_failed_run_from_the_runs_page(
    qtbot, tmp_path: Path, state: WizardState, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(hardware, "detect_machine", lambda: machine())
    fail = {"correct_lora": InsufficientMemory("Correction needs 30 GiB.")}
    first, fake = planned(qtbot, tmp_path, state, monkeypatch, fail=fail)
    first.start()
    qtbot.waitUntil(lambda: not first.busy() and first.stages.state("correct") == "failed", timeout=60_000)
    assert state.run_dir is not None
    settings = Settings(tmp_path / "s.ini")
    settings.add_recent_run(state.run_dir)  # a run folder outside the runs folder: found through the settings
    del fake.fail["correct_lora"]
    wizard = wizard_on(qtbot, settings)
    page = wizard.runs_page
    assert [r.status_text() for r in page.runs] == ["failed at correction"]
    assert "30 GiB" in page.runs[0].message
    select(page, state.run_dir.name)
    page.resume_button.click()
    qtbot.waitUntil(lambda: wizard.currentId() == Page.Run, timeout=60_000)
    run = wizard.run_page
    qtbot.waitUntil(run.isComplete, timeout=60_000)
    assert fake.calls.stages() == ["build_emulator", "train_lora", "correct_lora", "correct_lora"]  # resumed
    assert run.stages.state("emulator") == "skipped" and run.stages.state("correct") == "done"
    assert wizard.state.run_dir == state.run_dir


def test_compare_two_runs_on_one_chart(qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    runs = paths.runs_dir()
    make_run(runs / "a", finished=True, losses=[2.0, 1.5, 1.2], created="2026-11-01T10:00:00+00:00")
    make_run(runs / "b", finished=True, losses=[2.2, 1.9], created="2026-11-02T10:00:00+00:00")
    wizard = wizard_on(qtbot)
    page = wizard.runs_page
    select(page, "a", "b")
    assert page.compare_button.isEnabled() and not page.open_button.isEnabled()
    page.compare_button.click()
    assert page.compare.isVisible() and len(page.compare.labels) == 2
    assert all(label.endswith("· train") for label in page.compare.labels)
    counts = sorted(s.count() for s in page.compare.chart().series())
    assert counts == [2, 3]
    assert page.compare.ax.tickInterval() == 1.0 and page.compare.ax.max() == 3.0  # whole steps, none clipped


def test_delete_asks_then_trashes_or_deletes_only_run_folders(qtbot, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    runs = paths.runs_dir()
    keep = make_run(runs / "keep", finished=True, losses=[1.0], created="2026-11-01T10:00:00+00:00")
    gone = make_run(runs / "gone", finished=True, losses=[1.0], created="2026-11-02T10:00:00+00:00")
    wizard = wizard_on(qtbot)
    page = wizard.runs_page
    answers = [QMessageBox.StandardButton.Cancel]
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: answers.pop(0))
    monkeypatch.setattr(QMessageBox, "warning", lambda *a, **k: QMessageBox.StandardButton.Yes)
    trashed: list[Path] = []
    monkeypatch.setattr(runs_page, "move_to_trash", lambda p: trashed.append(p) or False)  # no trash here
    select(page, "gone")
    page.delete_button.click()  # Cancel: nothing happens
    assert gone.exists() and not trashed
    answers.append(QMessageBox.StandardButton.Yes)
    page.delete_button.click()
    assert (
        trashed == [gone.resolve()] and not gone.exists() and keep.exists()
    )  # no trash: deleted after asking
    assert [r.run_dir.name for r in page.runs] == ["keep"]
    (keep / "manifest.json").write_text(
        '{"not": "ours"}'
    )  # a folder that is not an EMLoC run folder any more
    page.refresh()
    select(page, "keep")
    answers.append(QMessageBox.StandardButton.Yes)
    page.delete_button.click()
    assert keep.exists() and "not an EMLoC manifest" in page.banner.title.text()


def test_a_text_run_recorded_on_a_gpu_this_machine_lacks_is_planned_for_one_it_has(
    tiny_llama: Path, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from emloc_engine.core.progress import RecordingProgress
    from tests.app.fakes import gpu

    here = machine((gpu(0, free_gib=3), gpu(1, name="NVIDIA RTX A6000", total_gib=48, free_gib=40)))
    monkeypatch.setattr(hardware, "detect_machine", lambda: here)
    cfg = RunConfig(model_dir=tiny_llama, data=DataConfig(path=tmp_path / "chat.jsonl"), run_dir=tmp_path / "run",
                    device="cuda:4")
    planned = runs_page.plan_again(cfg, RecordingProgress())
    assert planned.plan.config.device == "cuda:1" and planned.machine == here
    assert "GPU 4" in planned.device_note and "GPU 1 (NVIDIA RTX A6000)" in planned.device_note
    kept = runs_page.plan_again(planned.plan.config, RecordingProgress())
    assert kept.plan.config.device == "cuda:1" and kept.device_note == ""


def test_a_second_run_opened_on_the_run_page_shows_its_own_stages_log_and_curves(qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Reopening another run in one session: the Run page forgets the last run's stages, log and plots and draws
    the run's recorded curves; a resumed run's repeated steps replace the later points (no line going back)."""
    from emloc_app.pages.run_page import RunPage

    a = make_run(tmp_path / "a", finished=False, losses=[2.0, 1.5, 1.2], created="2026-11-01T10:00:00+00:00")
    b = make_run(tmp_path / "b", finished=True, losses=[2.2, 1.9], created="2026-11-02T10:00:00+00:00")
    state = WizardState(run_dir=a)
    page = RunPage(state)
    qtbot.addWidget(page)
    page.initializePage()
    assert page.plot.points["train/loss"] == [(1, 2.0), (2, 1.5), (3, 1.2)]
    assert page.stages.state("emulator") == "skipped" and page.resume_button.isVisibleTo(page)
    page.stages.finish("train", "failed")
    page.append_log("a line of run a")
    state.run_dir, state.done = b, set()
    page.initializePage()
    assert page.plot.points["train/loss"] == [(1, 2.2), (2, 1.9)]
    assert page.plot.series["train loss"].count() == 2
    assert page.stages.state("train") == "skipped" and page.log_pane.toPlainText() == ""
    assert not page.resume_button.isVisibleTo(page)  # b is finished; a's failed stage is gone
    page.plot.on_metric("train/loss", 1.7, 2)  # resumed from step 1's checkpoint: step 2 logged again
    assert page.plot.points["train/loss"] == [(1, 2.2), (2, 1.7)] and page.plot.series["train loss"].count() == 2
    page.initializePage()  # the same run again (back from the Try page): nothing is redrawn
    assert page.plot.points["train/loss"] == [(1, 2.2), (2, 1.7)]
