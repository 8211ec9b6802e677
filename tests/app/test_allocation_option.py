"""The Plan page's "Per-module ranks" checkbox: EmulatorConfig.allocation="spectral" (emloc run --allocation spectral)."""

from __future__ import annotations

import shlex

import pytest

from emloc_app.pages.plan_page import SPECTRAL_BUILD_FACTOR, estimated_seconds
from emloc_app.state import WizardState
from emloc_engine.run.planning import PlanConfig
from emloc_engine.run.presets import PRESETS
from emloc_engine.stages.emulator.builder import EmulatorConfig
from tests.app.fakes import FakeEngine, fake_plan, manifest_json, reopen_plan_page, run_all
from tests.app.fakes import open_plan_page as plan_page


def test_unchecked_by_default_builds_uniform(qtbot, fake: FakeEngine, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    page = plan_page(qtbot, state)
    assert not page.allocation.isChecked()
    assert page.allocation_choice() == "uniform"
    assert "--allocation" not in shlex.split(page.command())
    assert "per-module" not in page.duration.text()
    assert page.validatePage()
    assert state.run_plan is not None and state.run_plan.emulator.allocation == "uniform"
    run_all(qtbot, state)
    assert fake.calls.get("build_emulator").allocation == "uniform"
    assert manifest_json(state)["config"]["emulator"]["allocation"] == "uniform"
    reopened, page2 = reopen_plan_page(qtbot, state)
    assert reopened.config is not None and reopened.config.emulator.allocation == "uniform"
    assert not page2.allocation.isChecked()


def test_checked_builds_spectral_and_is_restored(qtbot, fake: FakeEngine, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    page = plan_page(qtbot, state)
    planned = fake.planned
    help_text = EmulatorConfig.__dataclass_fields__["allocation"].metadata["help"]
    assert page.allocation.toolTip() == help_text  # the engine's field help on hover
    before = len(planned)
    assert page.run_plan is not None
    uniform_seconds = page.estimate(page.run_plan).seconds
    page.allocation.setChecked(True)
    # re-planned (the presets' estimates are kept: each sets the allocation itself): the duration changes,
    # the plan does not
    assert len(planned) == before + 1
    assert planned[-1] == planned[before - 1 - len(PRESETS)]
    assert page.estimate(page.run_plan).seconds > uniform_seconds
    args = shlex.split(page.command())
    assert args[args.index("--allocation") + 1] == "spectral"
    assert page.validatePage()
    assert state.run_plan is not None and state.run_plan.emulator.allocation == "spectral"
    # coming back to the page keeps the choice
    page.initializePage()
    assert page.allocation.isChecked()
    run_all(qtbot, state)
    assert fake.calls.get("build_emulator").allocation == "spectral"
    assert manifest_json(state)["config"]["emulator"]["allocation"] == "spectral"
    # reopening the run (emloc-studio --run-dir) shows the same choice on a fresh Plan page
    reopened, page2 = reopen_plan_page(qtbot, state)
    assert reopened.config is not None and reopened.config.emulator.allocation == "spectral"
    assert page2.allocation.isChecked()
    assert "--allocation" in shlex.split(page2.command())


def test_estimate_doubles_only_the_emulator_stage(state: WizardState) -> None:
    assert state.model is not None and state.model.facts is not None
    plan = fake_plan(state.model.facts, PlanConfig(budget_bytes=state.budget_bytes, ratio=0.4))
    est = plan.est_seconds
    uniform = estimated_seconds(plan)
    assert uniform == pytest.approx(sum(v for k, v in est.items() if k != "export"))
    assert estimated_seconds(plan, emulator_factor=SPECTRAL_BUILD_FACTOR) == pytest.approx(
        uniform + (SPECTRAL_BUILD_FACTOR - 1) * est["emulator"])
