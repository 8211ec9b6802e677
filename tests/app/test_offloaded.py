"""Bigger than the GPU, in the app: the Model page says "runs offloaded here" with ρ, time and RAM instead of
"too large"; the Machine page's process cap reaches the run's settings; the Plan page shows time and RAM."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from emloc_app.pages.machine_page import MachinePage
from emloc_app.pages.model_page import ModelPage, judge
from emloc_app.state import WizardState
from emloc_engine.run.planning import plan_memory as real_plan_memory  # before the fixtures replace it
from tests.app.fakes import GIB, FakeEngine, gpu, machine, model_info, open_try_page, reference_model_info
from tests.app.fakes import open_plan_page as plan_page


def test_model_page_says_a_model_bigger_than_the_gpu_runs_offloaded(
    qtbot,
    tmp_path: Path,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    models = [
        model_info("org/offload-32B", tmp_path / "o", num_parameters=32_000_000_000, size_gib=61),
        model_info("org/big-70B", tmp_path / "big", num_parameters=70_000_000_000),
    ]
    FakeEngine(tmp_path, models=models).install(monkeypatch.setattr)
    page = ModelPage(WizardState(machine=machine(), gpu_index=0, budget_bytes=20 * GIB))
    qtbot.addWidget(page)
    page.initializePage()
    qtbot.waitUntil(lambda: page.table_model.rowCount() == 3, timeout=60_000)
    rows = {r.name: r for r in page.table_model.rows}
    offloaded = rows["org/offload-32B"]
    assert (
        offloaded.badge
        == "runs offloaded here; EMLoC trains it at ρ = 0.45 in about 1 h 0 min (needs 37 GiB of RAM)"
    )
    assert offloaded.kind == "trainable" and offloaded.usable and "does not fit" not in offloaded.badge
    assert rows["org/big-70B"].badge == "too large"  # the fake plan of this one truly does not fit


def test_judge_with_the_real_planner_offloaded_and_truly_too_small(tmp_path: Path) -> None:
    """The engine's own planner: 14B on a 24 GB card trains offloaded; a 70B with 8 GiB of RAM says RAM is short."""
    card = machine(gpus=(gpu(0, "NVIDIA GeForce RTX 4090", 24, 23),))
    row = judge(reference_model_info("Qwen2.5-14B", tmp_path / "Qwen2.5-14B"), card, 512)
    assert row.kind == "trainable" and row.badge.startswith("runs offloaded here; EMLoC trains it at ρ = ")
    assert "in about" in row.badge and "GiB of RAM" in row.badge
    assert row.plan is not None and row.plan.stream_original and row.plan.fits
    small_ram = machine(gpus=(gpu(0, "NVIDIA GeForce RTX 4090", 48, 47),))
    small_ram = type(small_ram)(
        gpus=small_ram.gpus, backend="cuda", cpu_cores=8, ram_total_bytes=8 * GIB, ram_available_bytes=6 * GIB
    )
    row = judge(reference_model_info("Llama-3-70B", tmp_path / "Llama-3-70B"), small_ram, 512)
    assert row.badge.startswith("cannot train here: RAM short by") and not row.usable
    assert "RAM" in row.reason and "short by" in row.reason


def test_machine_page_cap_reaches_the_runs_settings_and_command(
    qtbot,
    tmp_path: Path,  # type: ignore[no-untyped-def]
    fake: FakeEngine,
    state: WizardState,
) -> None:
    state.budget_bytes = None  # untouched: the default follows the cap
    page = MachinePage(state)
    qtbot.addWidget(page)
    page.initializePage()
    page.gpu_memory.setValue(16.0)
    assert page.budget.value() == pytest.approx(15.2)  # min(cap, 22 GiB free) − max(0.5 GiB, 5%)
    assert page.validatePage() and state.gpu_memory_bytes == 16 * GIB
    plan = plan_page(qtbot, state)
    plan.auto_ratio.setChecked(False)
    plan.slider.setValue(20)  # the fake plan's training (8 GiB + 20 GiB·ρ) fits 15.2 GiB
    assert plan.validatePage() and state.config is not None and state.config.gpu_memory_bytes == 16 * GIB
    args = shlex.split(plan.command())
    assert args[args.index("--gpu-memory") + 1] == "16"


def test_plan_page_shows_time_ram_and_that_the_original_streams(
    qtbot,
    tmp_path: Path,  # type: ignore[no-untyped-def]
    fake: FakeEngine,
    state: WizardState,
) -> None:
    state.model_dir = tmp_path / "offload-model"  # the fake plan streams a model of that name
    page = plan_page(qtbot, state)
    text = page.duration.text()
    assert "Takes <b>" in text and "<b>37.0 GiB</b> of RAM" in text
    labels = [r.label for r in page.bars.rows]
    assert labels[0] == "Inference, whole model on the GPU" and "Train on emulator (original streamed)" in labels
    assert "Build emulator" in labels  # the build streams anyway: no mark
    assert "anchors 4.0 GiB, 3 chunks" in text and "runs offloaded" in text
    state.model_dir = tmp_path / "model"
    page = plan_page(qtbot, state)
    assert "RAM" in page.duration.text() and "runs offloaded" not in page.duration.text()
    assert real_plan_memory is not None


def test_try_page_export_keeps_to_the_runs_budget_and_streams_as_the_run_did(  # type: ignore[no-untyped-def]
    qtbot, tmp_path: Path, fake: FakeEngine, state: WizardState
) -> None:
    import json

    from emloc_engine.run.config import RunConfig

    assert state.run_dir is not None and state.model_dir is not None and state.data_config is not None
    (state.run_dir / "adapter-corrected").mkdir(parents=True)
    state.config = RunConfig(model_dir=state.model_dir, data=state.data_config, run_dir=state.run_dir, device="cuda:0")
    # A reopened run (no plan in memory): the manifest's plan says what the run did.
    (state.run_dir / "manifest.json").write_text(json.dumps({
        "schema": 2, "stages": {}, "inputs": {}, "config": None,
        "plan": {"budget_gib": 15.5, "device": "cuda", "stream_original": True}}))
    page = open_try_page(qtbot, state)
    cfg = page.export_config("merged")
    assert cfg.memory_budget_bytes == int(15.5 * GIB) and cfg.stream_original


def test_plan_page_plans_the_lambda_search_for_the_datas_held_out_sequences(
    qtbot,  # type: ignore[no-untyped-def]
    fake: FakeEngine,
    state: WizardState,
) -> None:
    """The Data page's report knows the held-out count: every plan the page makes (its own and the three
    presets') uses it instead of the worst case, so a streamed λ search is not over-priced."""
    assert state.data_report is not None and state.data_report.n_eval == 12
    plan_page(qtbot, state)
    assert fake.planned and {cfg.eval_sequences for cfg in fake.planned} == {12}
    assert {cfg.eval_batches for cfg in fake.planned} == {64}  # the correction's own default, not a planner copy
    fake.planned.clear()
    state.data_report = None  # not inspected: the planner takes the worst case
    plan_page(qtbot, state)
    assert fake.planned and {cfg.eval_sequences for cfg in fake.planned} == {None}
