"""Every page: state in -> widgets, widgets -> state and engine configs (fake engine functions)."""

from __future__ import annotations

import dataclasses
import math
import shlex
from pathlib import Path
from typing import Any

import pytest

from emloc_app.pages.data_page import DataPage
from emloc_app.pages.machine_page import MachinePage
from emloc_app.pages.model_page import ModelPage
from emloc_app.pages.plan_page import DEMO_PRESET
from emloc_app.state import WizardState
from emloc_engine.run.config import RunConfig
from emloc_engine.stages.correction.corrector import CorrectionConfig
from emloc_engine.stages.emulator.builder import EmulatorConfig
from emloc_engine.stages.training.options import TrainOptions
from emloc_engine.stages.training.trainer import TrainConfig
from tests.app.fakes import GIB, FakeEngine, gpu, machine, model_info, open_plan_page, problem, report


def open_model_page(qtbot, state: WizardState, until: Any) -> ModelPage:  # type: ignore[no-untyped-def]
    """A Model page shown and initialised; waits (5 s at most) until ``until(page)`` holds."""
    page = ModelPage(state)
    qtbot.addWidget(page)
    page.initializePage()
    qtbot.waitUntil(lambda: until(page), timeout=60_000)
    return page


def test_machine_page_defaults_budget_to_free_memory_of_selected_gpu(qtbot, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    two = machine(gpus=(gpu(0, "A", 24, 20), gpu(1, "B", 48, 40)))
    calls = FakeEngine(tmp_path, machine=two).install(monkeypatch.setattr).calls
    state = WizardState()
    page = MachinePage(state)
    qtbot.addWidget(page)
    page.initializePage()
    qtbot.waitUntil(page.isComplete, timeout=60_000)
    assert page.device.count() == 3  # two GPUs and the CPU
    # The engine's default, as `emloc run` computes it: free memory less max(0.5 GiB, 5%)
    assert page.budget.value() == pytest.approx(19.0)  # 20 GiB free
    page.device.setCurrentIndex(1)
    assert page.budget.value() == pytest.approx(38.0)  # 40 GiB free
    assert page.cpu_note.isHidden() and page.gpu_memory.isEnabled()
    page.gpu_memory.setValue(16.0)  # the process cap: the default follows it
    assert page.budget.value() == pytest.approx(15.2)
    page.gpu_memory.setValue(0.0)
    assert page.budget.value() == pytest.approx(38.0)
    page.device.setCurrentIndex(2)  # CPU: budget from available RAM, explanation shown
    assert not page.cpu_note.isHidden() and not page.gpu_memory.isEnabled()
    assert page.budget.value() == pytest.approx(45.6)  # 48 GiB of available RAM of the fake machine, less 5%
    page.device.setCurrentIndex(1)
    page.budget.setValue(30.0)
    assert page.validatePage()
    assert state.gpu_index == 1 and state.budget_bytes == 30 * GIB and state.gpu_memory_bytes is None
    assert state.device == "cuda:1"
    assert calls.names() == ["detect_machine"]


def test_machine_page_restores_state(qtbot, fake: FakeEngine) -> None:  # type: ignore[no-untyped-def]
    calls = fake.calls
    state = WizardState(machine=machine(), gpu_index=None, budget_bytes=6 * GIB)
    page = MachinePage(state)
    qtbot.addWidget(page)
    page.initializePage()
    assert page.device.currentData() is None and page.budget.value() == pytest.approx(6.0)
    assert page.validatePage() and state.device == "cpu"
    assert calls.names() == []  # already detected: no second detection


def test_model_page_badges_search_and_selection(qtbot, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    models = [model_info("org/big-70B", tmp_path / "big", num_parameters=70_000_000_000),  # the fake plan: too big
              model_info("org/gguf-model", tmp_path / "g", needs_conversion=True),
              model_info("org/weird", tmp_path / "w", supported=False, problem="architecture Mamba is not supported"),
              model_info("meta-llama/Llama-3.1-8B-Instruct", tmp_path / "llama")]
    fake = FakeEngine(tmp_path, models=models).install(monkeypatch.setattr)
    state = WizardState(machine=machine(), gpu_index=0, budget_bytes=20 * GIB)
    page = open_model_page(qtbot, state, until=lambda page: page.table_model.rowCount() == 5)
    badges = {r.name: r.badge for r in page.table_model.rows}
    assert badges["org/big-70B"] == "too large"
    assert badges["org/gguf-model"] == "needs conversion"
    assert badges["org/weird"] == "unsupported"
    assert badges["meta-llama/Llama-3.1-8B-Instruct"].startswith("trainable with EMLoC at ρ = 0.45")
    # judged by the engine's assess_fit on the chosen GPU, within the budget (20 of its 24 GiB)
    assert {(c.budget_bytes, c.gpu_total_bytes, c.device) for c in fake.planned} == {(20 * GIB, 24 * GIB, "cuda")}
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
    assert state.model_dir == tmp_path / "llama" and state.model is models[3]


def test_model_page_prepares_demo_when_nothing_else(qtbot, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    fake = FakeEngine(tmp_path, models=[]).install(monkeypatch.setattr)
    state = WizardState(machine=machine(), gpu_index=None, budget_bytes=24 * GIB)
    # demo preselected, prepared in a worker, judged
    page = open_model_page(qtbot, state, until=ModelPage.isComplete)
    row = page.selected()
    assert row.is_demo and row.path == tmp_path / "demo-model"
    assert page.validatePage() and state.model_dir == tmp_path / "demo-model"
    assert state.model is not None and state.model.source == "demo"
    assert fake.planned[-1].device == "cpu"  # the CPU was chosen: judged against RAM


def test_model_page_add_folder_rescans(qtbot, tmp_path: Path, fake: FakeEngine) -> None:  # type: ignore[no-untyped-def]
    calls = fake.calls
    state = WizardState(machine=machine(), gpu_index=0, budget_bytes=24 * GIB)
    page = open_model_page(qtbot, state, until=lambda page: page.table_model.rowCount() == 2)
    qtbot.waitUntil(lambda: not page.busy(), timeout=60_000)
    page.add_model_folder(tmp_path / "more")
    qtbot.waitUntil(lambda: calls.names().count("find_models") == 2 and not page.busy(), timeout=60_000)
    assert ("add_model_folder", tmp_path / "more") in calls.items


def test_data_page_report_preview_and_config(qtbot, tmp_path: Path, state: WizardState, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    found = report(problems=(problem(str(tmp_path / "data.jsonl"), 7, "no assistant turn", False),))
    FakeEngine(tmp_path, report=found).install(monkeypatch.setattr)
    state.data_report = None
    state.data_config = None
    page = DataPage(state)
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
    assert state.max_length == 256


def test_data_page_blocks_on_fatal_problems_and_uses_demo_data(qtbot, tmp_path: Path, state: WizardState,  # type: ignore[no-untyped-def]
                                                               monkeypatch) -> None:
    found = report(problems=(problem("d.jsonl", 3, "bad JSON: Expecting ',' (col 17)", True),
                             problem("d.jsonl", None, "no chat template", True)))
    FakeEngine(tmp_path, report=found).install(monkeypatch.setattr)
    state.data_report = state.data_config = state.data_path = None
    page = DataPage(state)
    qtbot.addWidget(page)
    page.initializePage()
    qtbot.waitUntil(lambda: page.inspection is not None, timeout=60_000)
    assert page.path.text() == str(tmp_path / "demo.jsonl")  # demo dataset preselected
    assert not page.isComplete()
    assert [page.problems.item(i, 0).text() for i in range(2)] == ["d.jsonl:3", "d.jsonl"]
    assert "must be fixed" in page.summary.text()


def test_plan_page_ratio_bars_and_configs(qtbot, fake: FakeEngine, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    page = open_plan_page(qtbot, state)
    assert page.isComplete()
    assert page.ratio_label.text() == "0.45" and page.slider.value() == 45 and not page.slider.isEnabled()
    assert page.bars.rows[0].label.startswith("Inference")
    assert len(page.bars.rows) == 5  # inference, 3 stages, full LoRA reference
    assert "Takes <b>about" in page.duration.text() and "GiB free" in page.duration.text()
    # defaults and tooltips come from the engine's option fields
    fields = TrainOptions.__dataclass_fields__
    assert page.settings["rank"].toolTip() == fields["rank"].metadata["help"]
    assert page.settings["steps"].value() == fields["steps"].default
    assert page.settings["lr"].value() == pytest.approx(fields["lr"].default)
    assert page.seed.toolTip() == RunConfig.__dataclass_fields__["seed"].metadata["help"]
    assert page.lambda_.toolTip() == CorrectionConfig.__dataclass_fields__["lambda_"].metadata["help"]
    page.auto_ratio.setChecked(False)
    page.slider.setValue(30)
    assert page.run_plan is not None and page.run_plan.ratio == pytest.approx(0.30)
    page.settings["rank"].setValue(8)
    page.settings["steps"].setValue(50)
    page.lambda_.setCurrentIndex(2)  # exact
    assert page.validatePage()
    # one RunConfig; the engine's plan_run built every stage's config from it
    assert state.config is not None and state.run_plan is not None and state.run_plan.config is state.config
    emu, train, corr = state.run_plan.emulator, state.run_plan.train, state.run_plan.correct
    assert isinstance(emu, EmulatorConfig) and emu.ratio == pytest.approx(0.30) and emu.device == "cuda:0"
    assert emu.out_dir == state.run_dir / "emulator"
    assert isinstance(train, TrainConfig) and (train.rank, train.steps) == (8, 50) and train.data == state.data_config
    assert isinstance(corr, CorrectionConfig) and corr.lambda_ is not None and math.isinf(corr.lambda_)
    assert state.config.ratio == pytest.approx(0.30) and state.config.budget_bytes == state.budget_bytes
    assert state.config.train.rank == 8


def test_plan_page_bad_setting_stays_on_the_page(qtbot, fake: FakeEngine, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    page = open_plan_page(qtbot, state)
    state.data_config = None  # the widgets cannot hold a value the engine refuses; a missing input is refused too
    assert not page.validatePage()
    assert "not chosen" in page.banner.title.text()
    assert not page.banner.isHidden() and page.banner.retry.isHidden()


def test_plan_page_show_command(qtbot, fake: FakeEngine, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    page = open_plan_page(qtbot, state)
    args = shlex.split(page.command())  # the engine's command_line: only what differs from the defaults
    assert args[:4] == ["emloc", "run", str(state.model_dir), str(state.data_path)]
    assert args[args.index("--budget-gib") + 1] == "20" and args[args.index("--device") + 1] == "cuda:0"
    assert "--lambda" not in args and "--rank" not in args
    page.auto_ratio.setChecked(False)
    page.slider.setValue(60)
    page.settings["rank"].setValue(8)
    args = shlex.split(page.command())
    assert args[args.index("--ratio") + 1] == "0.6" and args[args.index("--budget-gib") + 1] == "20"  # ρ checked against it
    assert args[args.index("--rank") + 1] == "8"
    page.show_command.click()
    assert page._command_dialog.isVisible()
    page._command_dialog.close()


def test_plan_page_uses_quick_settings_for_the_demo_until_changed(qtbot, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                  fake: FakeEngine, state: WizardState) -> None:
    from emloc_engine.run.presets import get_preset

    state.model = model_info("demo: SmolLM2-135M-Instruct", tmp_path / "demo", source="demo")
    page = open_plan_page(qtbot, state)
    quick = get_preset(DEMO_PRESET).overrides
    assert page.settings["steps"].value() == quick["train.steps"] != TrainOptions().steps
    assert page.settings["lr"].value() == pytest.approx(quick["train.lr"])
    assert page.presets.current() == DEMO_PRESET
    assert page.validatePage() and state.config is not None and state.config.train.steps == quick["train.steps"]
    state.config = dataclasses.replace(state.config, train=TrainOptions(steps=7))  # the user's choice is kept
    page.initializePage()
    assert page.settings["steps"].value() == 7


def test_model_page_converts_a_gguf_and_selects_the_result(qtbot, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from emloc_app.pages import model_page

    gguf = model_info("lmstudio: tiny.gguf", tmp_path / "tiny.gguf", needs_conversion=True, dtype="Q8_0")
    converted = model_info("converted: tiny", tmp_path / "converted" / "tiny")
    models = [gguf, model_info("meta-llama/Llama-3.1-8B-Instruct", tmp_path / "llama")]
    FakeEngine(tmp_path, models=models).install(monkeypatch.setattr)
    seen: list[Path] = []

    def convert(path: Path, progress: Any) -> Path:
        seen.append(Path(path))
        progress.update(0.5, "Dequantising")
        models.append(converted)  # the engine adds the folder to the catalog
        return converted.path

    monkeypatch.setattr(model_page, "convert_for_catalog", convert)
    state = WizardState(machine=machine(), gpu_index=0, budget_bytes=20 * GIB)
    page = open_model_page(qtbot, state, until=lambda page: page.table_model.rowCount() == 3)
    page.select_row(next(i for i, r in enumerate(page.table_model.rows) if r.name == gguf.name))
    assert page.convert.isEnabled() and not page.isComplete()
    page.convert.click()
    qtbot.waitUntil(lambda: page.selected() is not None and page.selected().name == converted.name, timeout=60_000)
    assert seen == [gguf.path]
    assert page.isComplete() and not page.convert.isEnabled()


def test_the_app_and_the_cli_build_the_same_run_config(qtbot, fake: FakeEngine, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    """What the Plan page runs is exactly what its "Show command…" line gives `emloc run`: the app and the CLI
    hand the orchestrator the same RunConfig, so the manifest they write records the same settings."""
    from emloc_engine.cli.main import build_parser
    from emloc_engine.run.options import build_config, typed_values

    page = open_plan_page(qtbot, state)
    page.auto_ratio.setChecked(False)
    page.slider.setValue(35)
    page.settings["rank"].setValue(8)
    page.lambda_.setCurrentIndex(2)
    assert page.validatePage() and state.config is not None
    args = shlex.split(page.command())
    parsed = build_parser().parse_args(args[1:])
    cli = build_config(None, typed_values(parsed), model_dir=Path(parsed.model), data_path=Path(parsed.data),
                       run_dir=Path(parsed.out))
    assert cli == state.config


def test_plan_page_on_the_cpu_gives_one_ram_figure(qtbot, fake: FakeEngine, state: WizardState, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """On the CPU the device is the RAM: the page says what the whole run holds (the original, the anchors),
    not one stage's tensors next to a larger "It needs … of RAM"."""
    from tests.app import fakes

    real = fakes.fake_plan

    def with_ram(facts, cfg):  # type: ignore[no-untyped-def]
        plan = real(facts, cfg)  # training holds 30 GiB of RAM in all, more than any stage's tensors
        stages = tuple(dataclasses.replace(s, ram_bytes=30 * GIB) if s.name == "train" else s for s in plan.stages)
        return dataclasses.replace(plan, stages=stages, anchor_ram_bytes=4 * GIB, anchor_chunks=2)

    monkeypatch.setattr(fakes, "fake_plan", with_ram)
    state.machine = dataclasses.replace(machine(gpus=(), backend="cpu"), ram_available_bytes=64 * GIB)
    state.gpu_index = None
    page = open_plan_page(qtbot, state)
    plan = page.run_plan
    assert plan is not None and plan.record.device == "cpu"
    ram = 30 * GIB
    assert max(s.peak_bytes for s in plan.memory.stages) < ram
    est = page.estimate(plan)
    assert est.memory_word == "RAM" and est.peak_bytes == ram and est.left_free_bytes == 64 * GIB - ram
    text = page.duration.text()
    assert "at most <b>30.0 GiB</b> of RAM, leaving 34.0 GiB free." in text and "It needs" not in text
    assert "The anchors take 4.0 GiB of it (2 chunks)." in text
