"""Issue 10: the app offers multi-GPU training when it detects several CUDA GPUs (Plan page → Run page)."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from emloc_app.pages.plan_page import PARALLEL_KEY, default_gpu_count
from emloc_app.pages.run_page import RunPage
from emloc_app.state import WizardState
from emloc_engine.stages.training.distributed import ParallelConfig
from tests.app.fakes import GIB, FakeGpu, FakeMachine
from tests.app.fakes import open_plan_page as plan_page

TWO_GPUS = FakeMachine(gpus=(FakeGpu(0, "NVIDIA H200", 140 * GIB, 138 * GIB),
                             FakeGpu(1, "NVIDIA H200", 140 * GIB, 138 * GIB)))


def test_two_cuda_gpus_offer_the_control_and_plan_per_gpu(qtbot, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                          state: WizardState) -> None:
    state.machine = TWO_GPUS
    page, _, _, planned = plan_page(qtbot, tmp_path, state)
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
    # the stage configs: the emulator factorises on GPU 1, training runs on GPUs 0 and 1
    assert page.validatePage()
    emu, train = state.configs["emulator"], state.configs["train"]
    assert emu.device == "cuda:0" and emu.factor_devices == ("cuda:1",)
    assert train.device == "cuda"
    assert state.configs[PARALLEL_KEY] == {"processes": 2, "gpu_ids": (0, 1)}
    ParallelConfig(**state.configs[PARALLEL_KEY])  # the engine accepts them
    # coming back to the page keeps the user's choice
    page.gpus.setValue(1)
    assert page.validatePage()
    page.initializePage()
    assert page.gpus.value() == 1 and state.configs[PARALLEL_KEY]["processes"] == 1


def test_run_page_trains_data_parallel_with_the_chosen_gpus(qtbot, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                           state: WizardState) -> None:
    state.machine = TWO_GPUS
    page, engine, calls, _ = plan_page(qtbot, tmp_path, state)
    seen: dict[str, Any] = {}
    single = engine._objects["train_lora"]

    def train_lora_distributed(cfg: Any, parallel: Any, progress: Any) -> Any:
        seen["cfg"], seen["parallel"] = cfg, parallel
        return single(cfg, progress)

    engine._objects["train_lora_distributed"] = train_lora_distributed
    engine._objects["ParallelConfig"] = ParallelConfig
    assert page.validatePage()
    run = RunPage(state, engine)
    qtbot.addWidget(run)
    run.initializePage()
    run.start_button.click()
    qtbot.waitUntil(run.isComplete, timeout=60_000)
    assert seen["cfg"] is state.configs["train"]
    assert seen["parallel"] == ParallelConfig(processes=2, gpu_ids=(0, 1))
    assert calls.get("build_emulator").factor_devices == ("cuda:1",)
    studio = json.loads((state.run_dir / "manifest.json").read_text())["settings"]["studio"]
    assert studio["gpus"] == 2
    # reopening the run (emloc-studio --run-dir) offers the same GPU count again
    from emloc_app.main import state_from_run_dir

    reopened, _ = state_from_run_dir(state.run_dir)
    assert reopened.configs[PARALLEL_KEY] == {"processes": 2, "gpu_ids": (0, 1)}


@pytest.mark.parametrize("machine, gpu_index", [
    (FakeMachine(), 0),  # one CUDA GPU
    (FakeMachine(gpus=(), backend="cpu"), None),  # no GPU
    (FakeMachine(gpus=(FakeGpu(0, "Apple GPU (MPS, unified memory)", 48 * GIB, 40 * GIB),), backend="mps"), 0),
    (TWO_GPUS, None),  # two GPUs, but the user chose the CPU on the Machine page
], ids=["one-gpu", "cpu", "mps", "cpu-chosen"])
def test_no_control_without_several_cuda_gpus(qtbot, tmp_path: Path, state: WizardState,  # type: ignore[no-untyped-def]
                                              machine: FakeMachine, gpu_index: int | None) -> None:
    state.machine, state.gpu_index = machine, gpu_index
    page, engine, calls, planned = plan_page(qtbot, tmp_path, state)
    assert page.gpu_box.isHidden() and page.gpu_count() == 1
    assert planned[-1].num_gpus == 1
    assert "--gpus" not in shlex.split(page.command())
    assert page.validatePage()
    assert state.configs[PARALLEL_KEY]["processes"] == 1 and state.configs["emulator"].factor_devices == ()
    assert state.configs["train"].device == state.device
    run = RunPage(state, engine)
    qtbot.addWidget(run)
    run.initializePage()
    run.start_button.click()
    qtbot.waitUntil(run.isComplete, timeout=60_000)
    assert calls.names() == ["build_emulator", "train_lora", "correct_lora"]  # the ordinary trainer


def test_mixed_gpus_default_to_one(qtbot, tmp_path: Path, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    small = FakeGpu(1, "NVIDIA GeForce RTX 3060", 12 * GIB, 11 * GIB)
    state.machine = dataclasses.replace(TWO_GPUS, gpus=(TWO_GPUS.gpus[0], small))
    page, _, _, planned = plan_page(qtbot, tmp_path, state)
    assert not page.gpu_box.isHidden() and page.gpus.value() == 1
    page.gpus.setValue(2)  # the smaller card bounds each GPU's share
    assert planned[-1].num_gpus == 2 and planned[-1].gpu_total_bytes == 12 * GIB
    assert default_gpu_count(TWO_GPUS.gpus) == 2 and default_gpu_count(TWO_GPUS.gpus[:1]) == 1
