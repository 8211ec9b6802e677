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
from emloc_app.state import WizardState
from emloc_engine.core.errors import InsufficientMemory
from emloc_engine.stages.training import trainer
from tests.app.fakes import FakeEngine, open_try_page


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


def test_try_page_streams_both_sides(qtbot, fake: FakeEngine, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    page = open_try_page(qtbot, state)
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
    page, calls = open_try_page(qtbot, state), fake.calls
    page.set_gguf_type("q8_0")
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


def _fake_ollama(tmp_path: Path, monkeypatch) -> Path:  # type: ignore[no-untyped-def]
    """An `ollama` on PATH that records its arguments."""
    import os
    import stat

    bindir, log = tmp_path / "bin", tmp_path / "ollama-args.txt"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "ollama"
    fake.write_text(f'#!/bin/sh\necho "$@" > {log}\necho success\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_add_to_ollama_runs_the_offered_command_only_on_click(qtbot, fake: FakeEngine, state: WizardState,  # type: ignore[no-untyped-def]
                                                              tmp_path: Path, monkeypatch) -> None:
    log = _fake_ollama(tmp_path, monkeypatch)
    page = open_try_page(qtbot, state)
    assert page.export_buttons["ollama"].text() == "Add to Ollama"
    page.export_buttons["gguf"].click()  # another export never runs ollama
    qtbot.waitUntil(lambda: not page.busy(), timeout=60_000)
    assert not log.exists()
    page.export_buttons["ollama"].click()
    qtbot.waitUntil(lambda: not page.busy() and "Added to Ollama" in page.export_status["ollama"].text(),
                    timeout=60_000)
    assert fake.calls.get("merge_and_export").formats == ("gguf",)
    cfgs = [a for n, a in fake.calls.items if n == "merge_and_export"]
    assert cfgs[-1].formats == ("ollama",)
    assert log.read_text().split() == ["create", "tiny-emloc", "-f", str(state.run_dir / "Modelfile")]


def test_without_ollama_the_row_writes_the_modelfile_and_says_how(qtbot, fake: FakeEngine, state: WizardState,  # type: ignore[no-untyped-def]
                                                                  tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    page = open_try_page(qtbot, state)
    assert page.export_buttons["ollama"].text() == "Ollama Modelfile"
    page.export_buttons["ollama"].click()
    qtbot.waitUntil(lambda: not page.busy() and "not found" in page.export_status["ollama"].text(), timeout=60_000)
    assert "ollama create NAME -f" in page.export_status["ollama"].text()


def test_export_rows_are_plain_choices_with_predicted_sizes(qtbot, fake: FakeEngine, state: WizardState,  # type: ignore[no-untyped-def]
                                                            tiny_llama: Path, monkeypatch) -> None:
    from emloc_engine.stages.export.sizes import gguf_bytes, human_bytes

    monkeypatch.setenv("PATH", "/nonexistent")  # no llama-quantize: 4-bit is q4_0
    state.model_dir = tiny_llama
    page = open_try_page(qtbot, state)
    titles = [page.export_buttons[k].text() for k in page.choices]
    assert {"Adapter for llama.cpp/Ollama", "Single GGUF file, 4-bit", "Add to LM Studio"} <= set(titles)
    assert page.export_sizes["gguf4"].text() == human_bytes(gguf_bytes(tiny_llama, "q4_0"))
    page.set_gguf_type("f32")
    assert page.export_sizes["gguf"].text() == human_bytes(gguf_bytes(tiny_llama, "f32"))
    page.set_gguf_type("f16")
    assert page.export_sizes["gguf"].text() == human_bytes(gguf_bytes(tiny_llama, "f16"))
    page.export_buttons["gguf4"].click()
    qtbot.waitUntil(lambda: not page.busy(), timeout=60_000)
    cfg = fake.calls.get("merge_and_export")
    assert cfg.formats == ("gguf",) and cfg.gguf_type == "q4_0"
