"""Run page (stages in order, cancel, failure, resume from the manifest) and Try & export page."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from PySide6.QtGui import QDesktopServices

from emloc_app.pages.plan_page import PlanPage
from emloc_app.pages.run_page import RunPage
from emloc_app.pages.try_page import TryPage
from emloc_app.state import WizardState
from emloc_engine.core.errors import InsufficientMemory
from emloc_engine.stages.training import trainer
from tests.app.fakes import FakeEngine


def planned(qtbot, tmp_path: Path, state: WizardState, monkeypatch, **kw: Any):  # type: ignore[no-untyped-def]
    fake = FakeEngine(tmp_path, **kw).install(monkeypatch.setattr)
    plan = PlanPage(state)
    qtbot.addWidget(plan)
    plan.initializePage()
    assert plan.validatePage()
    page = RunPage(state)
    qtbot.addWidget(page)
    page.initializePage()
    return page, fake


def manifest(state: WizardState) -> dict[str, Any]:
    return json.loads((state.run_dir / "manifest.json").read_text())


def test_run_page_runs_stages_in_order_with_plots(qtbot, tmp_path: Path, state: WizardState, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    page, fake = planned(qtbot, tmp_path, state, monkeypatch)
    calls = fake.calls
    assert not page.start_button.isHidden() and page.resume_button.isHidden() and not page.isComplete()
    page.start_button.click()
    qtbot.waitUntil(page.isComplete, timeout=60_000)
    assert calls.stages() == ["build_emulator", "train_lora", "correct_lora"]
    assert state.run_plan is not None and calls.get("train_lora") is state.run_plan.train  # run_stages ran the plan
    assert [page.stages.state(n) for n in ("emulator", "train", "correct")] == ["done"] * 3
    assert page.plot.points["train/loss"] == [(1, 2.0), (2, 1.7), (3, 1.4)]
    stages = manifest(state)["stages"]
    assert all(stages[n]["status"] == "done" for n in ("emulator", "train", "correct"))
    assert stages["emulator"]["predicted_peak_gib"] == 15.0  # the plan's peak, kept beside the measured one
    assert stages["train"]["predicted_peak_gib"] == state.run_plan.memory.stage("train").peak_bytes / 2**30
    assert type(state.results["train"]).__name__ == "TrainResult" and state.done == {"emulator", "train", "correct"}
    assert manifest(state)["config"]["train"]["rank"] == 16  # the orchestrator recorded the RunConfig
    assert "All stages done" in page.log_pane.toPlainText()


def test_run_page_cancel_then_resume(qtbot, tmp_path: Path, state: WizardState, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    page, fake = planned(qtbot, tmp_path, state, monkeypatch)
    calls = fake.calls
    gate = threading.Event()

    def slow_train(cfg: Any, progress: Any) -> Any:
        gate.set()
        for _ in range(400):
            progress.check_cancelled()
            time.sleep(0.01)
        return fake.train_lora(cfg, progress)

    monkeypatch.setattr(trainer, "train_lora", slow_train)
    page.start()
    qtbot.waitUntil(gate.is_set, timeout=60_000)
    page.cancel_button.click()
    qtbot.waitUntil(lambda: page.current is None and not page.busy(), timeout=60_000)
    assert page.stages.state("train") == "cancelled" and not page.isComplete()
    assert manifest(state)["stages"]["train"]["status"] == "cancelled"
    assert not page.resume_button.isHidden()
    # a new page on the same run folder (app restarted) offers Resume and skips the emulator
    monkeypatch.setattr(trainer, "train_lora", fake.train_lora)
    state.results.clear()
    state.done.clear()
    again = RunPage(state)
    qtbot.addWidget(again)
    again.initializePage()
    assert not again.resume_button.isHidden() and again.start_button.isHidden()
    assert again.stages.state("emulator") == "skipped"
    again.resume_button.click()
    qtbot.waitUntil(again.isComplete, timeout=60_000)
    assert calls.stages() == ["build_emulator", "train_lora", "correct_lora"]  # the emulator once: resumed
    assert again.stages.state("emulator") == "skipped" and again.stages.state("train") == "done"


def test_run_page_failure_shows_inline_and_retry_resumes(qtbot, tmp_path: Path, state: WizardState,  # type: ignore[no-untyped-def]
                                                          monkeypatch) -> None:
    page, fake = planned(qtbot, tmp_path, state, monkeypatch,
                         fail={"correct_lora": InsufficientMemory("Correction needs 30 GiB.", hint="Set λ.")})
    calls = fake.calls
    page.start()
    qtbot.waitUntil(lambda: not page.banner.isHidden() and not page.busy(), timeout=60_000)
    assert page.banner.title.text() == "Correction needs 30 GiB."
    assert page.stages.state("correct") == "failed" and manifest(state)["stages"]["correct"]["status"] == "failed"
    del fake.fail["correct_lora"]
    page.banner.retry.click()
    qtbot.waitUntil(page.isComplete, timeout=60_000)
    assert calls.stages() == ["build_emulator", "train_lora", "correct_lora", "correct_lora"]


def try_page(qtbot, state: WizardState) -> TryPage:  # type: ignore[no-untyped-def]
    assert state.run_dir is not None
    (state.run_dir / "adapter-corrected").mkdir(parents=True)
    page = TryPage(state)
    qtbot.addWidget(page)
    page.initializePage()
    return page


def test_try_page_streams_both_sides(qtbot, fake: FakeEngine, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    page = try_page(qtbot, state)
    req = page.chat_request("Hi")
    assert req.adapter_dir == state.run_dir / "adapter-corrected" and req.model_dir == state.model_dir
    page.adapter_choice.setCurrentIndex(1)
    assert page.chat_request("Hi").adapter_dir == state.run_dir / "adapter"
    page.adapter_choice.setCurrentIndex(0)
    page.generate.click()
    qtbot.waitUntil(lambda: not page.busy() and page.generate.isEnabled(), timeout=60_000)
    assert page.outputs["base"].toPlainText().endswith("Base: Hello from base #1")
    assert page.outputs["tuned"].toPlainText().endswith("Fine-tuned: Hello from tuned #1")


def test_try_page_exports_with_progress_and_opens_folder(qtbot, fake: FakeEngine, state: WizardState,  # type: ignore[no-untyped-def]
                                                         monkeypatch) -> None:
    page, calls = try_page(qtbot, state), fake.calls
    page.gguf_type.setCurrentText("q8_0")
    page.export_buttons["gguf"].click()
    assert not page.export_buttons["merged"].isEnabled()  # one export at a time
    qtbot.waitUntil(lambda: not page.busy(), timeout=60_000)
    cfg = calls.get("merge_and_export")
    assert cfg.formats == ("gguf",) and cfg.gguf_type == "q8_0" and cfg.run_dir == state.run_dir
    assert cfg.run_facts is not None  # the model card's facts, from the manifest (as emloc export)
    assert manifest(state)["stages"]["export"]["status"] == "done"  # recorded by the orchestrator's run_stage
    assert "gguf" in state.exports
    assert page.export_bars["gguf"].value() == 1000 and "verified" in page.export_status["gguf"].text()
    assert page.gguf_type.toolTip()  # the engine's help of ExportConfig.gguf_type
    assert page.export_buttons["merged"].isEnabled()
    opened: list[str] = []
    monkeypatch.setattr(QDesktopServices, "openUrl", lambda url: opened.append(url.toLocalFile()))
    page.open_folder.click()
    assert opened == [str(state.run_dir)]
