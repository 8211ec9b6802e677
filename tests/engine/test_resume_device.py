"""A resumed run's device: the recorded one when this machine has it, else the best one here, with a note."""

from __future__ import annotations

import pytest

from emloc_engine.machine.hardware import GpuInfo, MachineInfo
from emloc_engine.machine.resume_device import resume_device

GIB = 2**30


def _gpu(index: int, free_gib: float, name: str = "RTX 4090") -> GpuInfo:
    return GpuInfo(index=index, name=name, total_bytes=24 * GIB, free_bytes=int(free_gib * GIB),
                   used_bytes=int((24 - free_gib) * GIB))


def _machine(*gpus: GpuInfo, backend: str = "cuda") -> MachineInfo:
    return MachineInfo(gpus=gpus, backend=backend if gpus else "cpu", cpu_cores=8,
                       ram_total_bytes=64 * GIB, ram_available_bytes=48 * GIB)


@pytest.mark.parametrize("recorded", ["cpu", "auto", "cuda", "cuda:1"])
def test_a_device_this_machine_has_is_kept_without_a_note(recorded: str) -> None:
    where = resume_device(recorded, _machine(_gpu(0, 20), _gpu(1, 10)))
    assert (where.device, where.note) == (recorded, "")


def test_a_missing_gpu_is_replaced_by_the_gpu_with_the_most_free_memory() -> None:
    where = resume_device("cuda:3", _machine(_gpu(0, 4), _gpu(1, 18, "RTX A6000"), _gpu(2, 18)))
    assert where.device == "cuda:1"  # the most free memory; the lower index on a tie
    assert "GPU 3" in where.note and "GPU 1 (RTX A6000)" in where.note


@pytest.mark.parametrize("recorded", ["cuda:0", "cuda"])
def test_without_a_cuda_gpu_the_run_continues_on_the_cpu(recorded: str) -> None:
    where = resume_device(recorded, _machine())
    assert where.device == "cpu" and "CPU" in where.note


def test_a_cuda_run_on_a_mac_continues_on_apples_gpu_and_an_mps_run_elsewhere_on_the_best_device() -> None:
    mac = MachineInfo(gpus=(_gpu(0, 20, "Apple M3"),), backend="mps", cpu_cores=8,
                      ram_total_bytes=64 * GIB, ram_available_bytes=48 * GIB)
    on_mac = resume_device("cuda:0", mac)
    assert on_mac.device == "auto" and "MPS" in on_mac.note
    assert (resume_device("mps", mac).device, resume_device("mps", mac).note) == ("mps", "")
    moved = resume_device("mps", _machine(_gpu(0, 20)))
    assert moved.device == "auto" and "MPS" in moved.note


def test_an_unreadable_recorded_device_is_named_as_recorded_and_replaced() -> None:
    where = resume_device("cuda:x", _machine(_gpu(0, 20)))
    assert where.device == "cuda:0" and "device 'cuda:x'" in where.note
