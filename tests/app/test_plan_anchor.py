"""The Plan page's "Anchor training" checkbox: TrainConfig.anchor "auto" (checked) or "none" (emloc run --anchor none)."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

from emloc_app.pages.plan_page import ANCHOR_KEY, ANCHOR_ONE_GPU
from emloc_app.state import WizardState
from emloc_engine.stages.training.trainer import TrainConfig
from tests.app.fakes import GIB, FakeGpu, FakeMachine, Result, reopen_plan_page, run_all, studio_settings
from tests.app.fakes import open_plan_page as plan_page

TWO_GPUS = FakeMachine(gpus=(FakeGpu(0, "NVIDIA H200", 140 * GIB, 138 * GIB),
                             FakeGpu(1, "NVIDIA H200", 140 * GIB, 138 * GIB)))


@dataclasses.dataclass(frozen=True)
class AnchoredResult(Result):
    """A train result that says what anchoring did, as TrainResult does."""

    anchor: str = "blocks"
    anchor_note: str = "anchoring on: 12.0 MiB of offsets"


def test_checked_by_default_trains_auto(qtbot, tmp_path: Path, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    page, engine, calls, planned = plan_page(qtbot, tmp_path, state)
    assert page.anchor.isChecked() and page.anchor.isEnabled()
    assert page.anchor.toolTip() == TrainConfig.__dataclass_fields__["anchor"].metadata["help"]
    assert page.anchor_choice() == "auto"
    assert planned[-1].anchored is True
    assert "--anchor" not in shlex.split(page.command())  # auto is the CLI's default
    assert page.validatePage()
    assert state.configs["train"].anchor == "auto" and state.configs[ANCHOR_KEY] == "auto"
    train = engine._objects["train_lora"]

    def train_lora(cfg: Any, progress: Any) -> Any:
        return AnchoredResult(**dataclasses.asdict(train(cfg, progress)))

    engine._objects["train_lora"] = train_lora
    run = run_all(qtbot, state, engine)
    assert calls.get("train_lora").anchor == "auto"
    assert studio_settings(state)["anchor"] == "auto"
    assert "Anchoring: anchoring on: 12.0 MiB of offsets" in run.log_pane.toPlainText()
    manifest = json.loads((Path(state.run_dir) / "manifest.json").read_text())  # type: ignore[arg-type]
    assert manifest["stages"]["train"]["result"]["anchor_note"] == "anchoring on: 12.0 MiB of offsets"
    from emloc_app.main import state_from_run_dir

    reopened, _ = state_from_run_dir(Path(state.run_dir))  # type: ignore[arg-type]
    assert reopened.configs.get(ANCHOR_KEY) is None  # type: ignore[attr-defined]  # = checked


def test_unchecked_trains_none_and_replans(qtbot, tmp_path: Path, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    page, engine, calls, planned = plan_page(qtbot, tmp_path, state)
    before = len(planned)
    page.anchor.setChecked(False)
    assert len(planned) == before + 1 and planned[-1].anchored is False
    assert dataclasses.replace(planned[-1], anchored=True) == planned[-2]  # nothing else changed
    args = shlex.split(page.command())
    assert args[args.index("--anchor") + 1] == "none"
    assert page.validatePage()
    assert state.configs["train"].anchor == "none" and state.configs[ANCHOR_KEY] == "none"
    page.initializePage()  # coming back to the page keeps the choice
    assert not page.anchor.isChecked() and planned[-1].anchored is False
    run = run_all(qtbot, state, engine)
    assert calls.get("train_lora").anchor == "none"
    assert studio_settings(state)["anchor"] == "none"
    assert "Anchoring:" not in run.log_pane.toPlainText()  # the fake result has no note


def test_real_planner_puts_the_anchors_on_the_train_bar(qtbot, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                        state: WizardState) -> None:
    from emloc_engine.catalog.model_facts import reference_facts
    from emloc_engine.run.planning import plan_memory

    state.facts = reference_facts("Llama-3-8B")
    state.ratio = 0.5
    page, engine, _, _ = plan_page(qtbot, tmp_path, state)
    engine._objects["plan_memory"] = plan_memory
    page.replan()

    def train_parts() -> dict[str, int]:
        return dict(page.plan.stage("train").parts)

    assert "anchors of the micro-batch" in train_parts()
    peak_anchored = page.plan.stage("train").peak_bytes
    page.anchor.setChecked(False)
    assert "anchors of the micro-batch" not in train_parts()
    assert page.plan.stage("train").peak_bytes < peak_anchored


def test_several_gpus_disable_it(qtbot, tmp_path: Path, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    state.machine = TWO_GPUS
    page, _, _, planned = plan_page(qtbot, tmp_path, state)
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
    assert state.configs["train"].anchor == "auto"  # the trainer's auto turns it off on several GPUs


def test_reopen_restores_unchecked(qtbot, tmp_path: Path, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    page, engine, _, _ = plan_page(qtbot, tmp_path, state)
    page.anchor.setChecked(False)
    assert page.validatePage()
    run_all(qtbot, state, engine)
    reopened, page2, planned2 = reopen_plan_page(qtbot, tmp_path, state)
    assert reopened.configs[ANCHOR_KEY] == "none"
    assert not page2.anchor.isChecked()
    assert planned2[-1].anchored is False
    assert "--anchor" in shlex.split(page2.command())
