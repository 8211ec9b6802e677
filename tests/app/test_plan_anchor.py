"""The Plan page's "Anchor training" checkbox: TrainConfig.anchor "auto" (checked) or "none" (emloc run --anchor none)."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from emloc_app.pages import plan_page as plan_module
from emloc_app.pages.plan_page import ANCHOR_ONE_GPU
from emloc_app.state import WizardState
from emloc_engine.run.planning import plan_memory as real_plan_memory  # before the fixtures replace it
from emloc_engine.stages.training import trainer
from emloc_engine.stages.training.trainer import TrainConfig
from tests.app.fakes import FakeEngine, gpu, machine, reopen_plan_page, run_all, studio_settings
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
    assert state.configs is not None and state.configs.train.anchor == "auto" and state.anchor == "auto"

    def train_lora(cfg: Any, progress: Any) -> Any:  # a train result that says what anchoring did
        return dataclasses.replace(fake.train_lora(cfg, progress), anchor="blocks",
                                   anchor_note="anchoring on: 12.0 MiB of offsets")

    monkeypatch.setattr(trainer, "train_lora", train_lora)
    run = run_all(qtbot, state)
    assert fake.calls.get("train_lora").anchor == "auto"
    assert studio_settings(state)["anchor"] == "auto"
    assert "Anchoring: anchoring on: 12.0 MiB of offsets" in run.log_pane.toPlainText()
    manifest = json.loads((Path(state.run_dir) / "manifest.json").read_text())  # type: ignore[arg-type]
    assert manifest["stages"]["train"]["result"]["anchor_note"] == "anchoring on: 12.0 MiB of offsets"
    from emloc_app.main import state_from_run_dir

    reopened, _ = state_from_run_dir(Path(state.run_dir))  # type: ignore[arg-type]
    assert reopened.anchor == "auto"  # = checked


def test_unchecked_trains_none_and_replans(qtbot, fake: FakeEngine, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    page = plan_page(qtbot, state)
    planned = fake.planned
    before = len(planned)
    page.anchor.setChecked(False)
    assert len(planned) == before + 1 and planned[-1].anchored is False
    assert dataclasses.replace(planned[-1], anchored=True) == planned[-2]  # nothing else changed
    args = shlex.split(page.command())
    assert args[args.index("--anchor") + 1] == "none"
    assert page.validatePage()
    assert state.configs is not None and state.configs.train.anchor == "none" and state.anchor == "none"
    page.initializePage()  # coming back to the page keeps the choice
    assert not page.anchor.isChecked() and planned[-1].anchored is False
    run = run_all(qtbot, state)
    assert fake.calls.get("train_lora").anchor == "none"
    assert studio_settings(state)["anchor"] == "none"
    assert "Anchoring:" not in run.log_pane.toPlainText()  # the fake result has no note


def test_real_planner_puts_the_anchors_on_the_train_bar(qtbot, fake: FakeEngine, state: WizardState,  # type: ignore[no-untyped-def]
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from emloc_engine.catalog.model_facts import reference_facts

    state.facts = reference_facts("Llama-3-8B")
    state.ratio = 0.5
    page = plan_page(qtbot, state)
    monkeypatch.setattr(plan_module, "plan_memory", real_plan_memory)
    page.replan()
    assert page.plan is not None

    def train_parts() -> dict[str, int]:
        assert page.plan is not None
        return dict(page.plan.stage("train").parts)

    assert "anchors of the micro-batch" in train_parts()
    peak_anchored = page.plan.stage("train").peak_bytes
    page.anchor.setChecked(False)
    assert "anchors of the micro-batch" not in train_parts()
    assert page.plan.stage("train").peak_bytes < peak_anchored


def test_several_gpus_disable_it(qtbot, fake: FakeEngine, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    state.machine = TWO_GPUS
    page = plan_page(qtbot, state)
    planned = fake.planned
    assert page.gpus.value() == 2
    assert not page.anchor.isEnabled() and page.anchor.isChecked()  # the choice is kept for 1 GPU
    assert page.anchor.toolTip().startswith(ANCHOR_ONE_GPU)
    assert planned[-1].num_gpus == 2
    page.gpus.setValue(1)
    assert page.anchor.isEnabled() and ANCHOR_ONE_GPU not in page.anchor.toolTip()
    assert planned[-1].num_gpus == 1 and planned[-1].anchored is True
    page.gpus.setValue(2)
    assert not page.anchor.isEnabled()
    assert page.validatePage()
    assert state.configs is not None
    assert state.configs.train.anchor == "auto"  # the trainer's auto turns it off on several GPUs


def test_reopen_restores_unchecked(qtbot, fake: FakeEngine, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    page = plan_page(qtbot, state)
    page.anchor.setChecked(False)
    assert page.validatePage()
    run_all(qtbot, state)
    reopened, page2 = reopen_plan_page(qtbot, state)
    assert reopened.anchor == "none"
    assert not page2.anchor.isChecked()
    assert fake.planned[-1].anchored is False
    assert "--anchor" in shlex.split(page2.command())
