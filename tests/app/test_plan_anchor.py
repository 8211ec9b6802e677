"""The Plan page's "Anchor training" checkbox: TrainConfig.anchor "auto" (checked) or "none" (emloc run --anchor none)."""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any

import pytest

from emloc_app.state import WizardState
from emloc_engine.run import planning
from emloc_engine.run.planning import plan_memory as real_plan_memory  # before the fixtures replace it
from emloc_engine.run.presets import PRESETS
from emloc_engine.stages.training import trainer
from emloc_engine.stages.training.trainer import TrainConfig
from tests.app.fakes import FakeEngine, gpu, machine, manifest_json, reopen_plan_page, run_all
from tests.app.fakes import open_plan_page as plan_page

TWO_GPUS = machine(gpus=(gpu(0, "NVIDIA H200", 140, 138), gpu(1, "NVIDIA H200", 140, 138)))


def test_checked_by_default_trains_auto(qtbot, fake: FakeEngine, state: WizardState,  # type: ignore[no-untyped-def]
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    page = plan_page(qtbot, state)
    assert page.anchor.isChecked() and page.anchor.isEnabled()
    assert page.anchor.toolTip() == TrainConfig.__dataclass_fields__["anchor"].metadata["help"]
    assert page.anchor_choice() == "auto"
    assert fake.planned[-1].anchored is True
    assert "--anchor" not in shlex.split(page.command())  # auto is the CLI's default
    assert page.validatePage()
    assert state.run_plan is not None and state.run_plan.train.anchor == "auto"

    def train_lora(cfg: Any, progress: Any) -> Any:  # a train result that says what anchoring did
        return dataclasses.replace(fake.train_lora(cfg, progress), anchor="blocks",
                                   anchor_note="anchoring on: 12.0 MiB of offsets")

    monkeypatch.setattr(trainer, "train_lora", train_lora)
    run = run_all(qtbot, state)
    assert fake.calls.get("train_lora").anchor == "auto"
    manifest = manifest_json(state)
    assert manifest["config"]["train"]["anchor"] == "auto"
    assert "Anchoring: anchoring on: 12.0 MiB of offsets" in run.log_pane.toPlainText()
    assert manifest["stages"]["train"]["result"]["anchor_note"] == "anchoring on: 12.0 MiB of offsets"
    reopened, page2 = reopen_plan_page(qtbot, state)
    assert reopened.config is not None and reopened.config.train.anchor == "auto" and page2.anchor.isChecked()


def test_unchecked_trains_none_and_replans(qtbot, fake: FakeEngine, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    page = plan_page(qtbot, state)
    planned = fake.planned
    before = len(planned)
    page.anchor.setChecked(False)
    mine = planned[before]  # the page's own plan; then each preset's, re-estimated (anchoring is in none)
    assert mine.anchored is False and len(planned) == before + 1 + len(PRESETS)
    assert dataclasses.replace(mine, anchored=True) == planned[before - 1 - len(PRESETS)]  # nothing else changed
    args = shlex.split(page.command())
    assert args[args.index("--anchor") + 1] == "none"
    assert page.validatePage()
    assert state.run_plan is not None and state.run_plan.train.anchor == "none"
    page.initializePage()  # coming back to the page keeps the choice
    assert not page.anchor.isChecked() and planned[-1].anchored is False
    run = run_all(qtbot, state)
    assert fake.calls.get("train_lora").anchor == "none"
    assert manifest_json(state)["config"]["train"]["anchor"] == "none"
    assert "Anchoring:" not in run.log_pane.toPlainText()  # the fake result has no note


def test_real_planner_puts_the_anchors_on_the_train_bar(qtbot, fake: FakeEngine, state: WizardState,  # type: ignore[no-untyped-def]
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planning, "plan_memory", real_plan_memory)  # on the fake's Llama-3-8B facts
    page = plan_page(qtbot, state)
    page.auto_ratio.setChecked(False)
    page.slider.setValue(50)

    def train_stage() -> Any:
        assert page.run_plan is not None
        return page.run_plan.memory.stage("train")

    assert "anchors of the micro-batch" in dict(train_stage().parts)
    peak_anchored = train_stage().peak_bytes
    page.anchor.setChecked(False)
    assert "anchors of the micro-batch" not in dict(train_stage().parts)
    assert train_stage().peak_bytes < peak_anchored


def test_several_gpus_anchor_too(qtbot, fake: FakeEngine, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    state.machine = TWO_GPUS
    page = plan_page(qtbot, state)
    planned = fake.planned
    assert page.gpus.value() == 2
    assert page.anchor.isEnabled() and page.anchor.isChecked()  # each GPU anchors its own examples
    assert planned[-1].num_gpus == 2
    page.gpus.setValue(1)
    assert page.anchor.isEnabled()
    assert planned[-1].num_gpus == 1 and planned[-1].anchored is True
    page.gpus.setValue(2)
    assert page.validatePage()
    assert state.config is not None and state.run_plan is not None
    assert state.config.train.anchor == "auto"
    assert state.run_plan.train.anchor == "auto"  # plan_run keeps it on several GPUs


def test_reopen_restores_unchecked(qtbot, fake: FakeEngine, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    page = plan_page(qtbot, state)
    page.anchor.setChecked(False)
    assert page.validatePage()
    run_all(qtbot, state)
    reopened, page2 = reopen_plan_page(qtbot, state)
    assert reopened.config is not None and reopened.config.train.anchor == "none"
    assert not page2.anchor.isChecked()
    assert fake.planned[-1].anchored is False
    assert "--anchor" in shlex.split(page2.command())
