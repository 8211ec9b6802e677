"""Issue 10: the app offers multi-GPU training when it detects several CUDA GPUs (Plan page → Run page)."""

from __future__ import annotations

import dataclasses
import shlex

import pytest

from emloc_app.pages.plan_page import default_gpu_count
from emloc_app.pages.run_page import RunPage
from emloc_app.state import WizardState
from emloc_engine.machine.hardware import MachineInfo
from emloc_engine.stages.training.distributed import ParallelConfig
from tests.app.fakes import GIB, FakeEngine, gpu, machine, manifest_json, reopen_plan_page
from tests.app.fakes import open_plan_page as plan_page

TWO_GPUS = machine(gpus=(gpu(0, "NVIDIA H200", 140, 138), gpu(1, "NVIDIA H200", 140, 138)))


def test_two_cuda_gpus_offer_the_control_and_plan_per_gpu(qtbot, fake: FakeEngine,  # type: ignore[no-untyped-def]
                                                          state: WizardState) -> None:
    state.machine = TWO_GPUS
    page = plan_page(qtbot, state)
    planned = fake.planned
    assert not page.gpu_box.isHidden()
    assert (page.gpus.minimum(), page.gpus.maximum(), page.gpus.value()) == (1, 2, 2)  # alike: all by default
    assert planned[-1].num_gpus == 2 and planned[-1].gpu_total_bytes == 140 * GIB
    assert "per GPU" in page.verdict.text()
    page.gpus.setValue(1)  # changing it re-plans
    assert planned[-1].num_gpus == 1 and "Memory per GPU" not in page.verdict.text()
    page.gpus.setValue(2)
    assert planned[-1].num_gpus == 2
    # the command line says the same
    args = shlex.split(page.command())
    assert args[args.index("--gpus") + 1] == "2" and args[args.index("--device") + 1] == "cuda"
    # the stage configs (plan_run's): the emulator factorises on GPU 1, training runs on both
    assert page.validatePage()
    assert state.config is not None and state.run_plan is not None
    emu, train = state.run_plan.emulator, state.run_plan.train
    assert emu.device == "cuda" and emu.factor_devices == ("cuda:1",)
    assert train.device == "cuda" and state.run_plan.parallel == ParallelConfig(processes=2)
    assert state.config.gpus == 2
    # coming back to the page keeps the user's choice
    page.gpus.setValue(1)
    assert page.validatePage()
    page.initializePage()
    assert page.gpus.value() == 1 and state.config.gpus == 1


def test_run_page_trains_data_parallel_with_the_chosen_gpus(qtbot, fake: FakeEngine,  # type: ignore[no-untyped-def]
                                                           state: WizardState) -> None:
    state.machine = TWO_GPUS
    page = plan_page(qtbot, state)
    assert page.validatePage()
    run = RunPage(state)
    qtbot.addWidget(run)
    run.initializePage()
    run.start_button.click()
    qtbot.waitUntil(run.isComplete, timeout=60_000)
    assert state.run_plan is not None
    assert fake.calls.get("train_lora") is state.run_plan.train
    assert fake.calls.get("parallel") == ParallelConfig(processes=2)
    assert fake.calls.get("build_emulator").factor_devices == ("cuda:1",)
    assert manifest_json(state)["config"]["gpus"] == 2
    # reopening the run (emloc-studio --run-dir) offers the same GPU count again
    reopened, page2 = reopen_plan_page(qtbot, state)
    assert reopened.config is not None and reopened.config.gpus == 2
    assert page2.gpus.value() == 2


@pytest.mark.parametrize("machine_, gpu_index", [
    (machine(), 0),  # one CUDA GPU
    (machine(gpus=(), backend="cpu"), None),  # no GPU
    (machine(gpus=(gpu(0, "Apple GPU (MPS, unified memory)", 48, 40),), backend="mps"), 0),
    (TWO_GPUS, None),  # two GPUs, but the user chose the CPU on the Machine page
], ids=["one-gpu", "cpu", "mps", "cpu-chosen"])
def test_no_control_without_several_cuda_gpus(qtbot, fake: FakeEngine, state: WizardState,  # type: ignore[no-untyped-def]
                                              machine_: MachineInfo, gpu_index: int | None) -> None:
    state.machine, state.gpu_index = machine_, gpu_index
    page = plan_page(qtbot, state)
    assert page.gpu_box.isHidden() and page.gpu_count() == 1
    assert fake.planned[-1].num_gpus == 1
    assert "--gpus" not in shlex.split(page.command())
    assert page.validatePage()
    assert state.config is not None and state.run_plan is not None
    assert state.config.gpus == 1 and state.run_plan.emulator.factor_devices == () and state.run_plan.parallel is None
    assert state.run_plan.train.device == state.device
    run = RunPage(state)
    qtbot.addWidget(run)
    run.initializePage()
    run.start_button.click()
    qtbot.waitUntil(run.isComplete, timeout=60_000)
    assert fake.calls.stages() == ["build_emulator", "train_lora", "correct_lora"]
    assert "parallel" not in fake.calls.names()  # the ordinary trainer


def test_mixed_gpus_default_to_one(qtbot, fake: FakeEngine, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    small = gpu(1, "NVIDIA GeForce RTX 3060", 12, 11)
    state.machine = dataclasses.replace(TWO_GPUS, gpus=(TWO_GPUS.gpus[0], small))
    page = plan_page(qtbot, state)
    assert not page.gpu_box.isHidden() and page.gpus.value() == 1
    page.gpus.setValue(2)  # the smaller card bounds each GPU's share
    assert fake.planned[-1].num_gpus == 2 and fake.planned[-1].gpu_total_bytes == 12 * GIB
    assert default_gpu_count(TWO_GPUS.gpus) == 2 and default_gpu_count(TWO_GPUS.gpus[:1]) == 1
