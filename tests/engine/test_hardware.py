"""Hardware detection with fake NVML and fake torch modules: present, absent, failing."""

from __future__ import annotations

import types
from typing import Any

import pynvml
import pytest

from emloc_engine.machine.hardware import GIB, describe_machine, detect_gpus, detect_machine


class FakeNvml:
    """The few pynvml functions the engine calls, over a list of fake devices."""

    NVMLError = pynvml.NVMLError

    def __init__(self, devices: list[dict[str, Any]], *, fail_init: bool = False, bytes_names: bool = False,
                 fail_processes: bool = False) -> None:
        self.devices = devices
        self.fail_init = fail_init
        self.bytes_names = bytes_names
        self.fail_processes = fail_processes
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> Any:
        return b"550.54.15" if self.bytes_names else "550.54.15"

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        return 12040

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> dict[str, Any]:
        return self.devices[i]

    def nvmlDeviceGetName(self, h: dict[str, Any]) -> Any:
        return h["name"].encode() if self.bytes_names else h["name"]

    def nvmlDeviceGetMemoryInfo(self, h: dict[str, Any]) -> Any:
        return types.SimpleNamespace(total=h["total"], free=h["total"] - h["used"], used=h["used"])

    def nvmlDeviceGetCudaComputeCapability(self, h: dict[str, Any]) -> tuple[int, int]:
        return h["cc"]

    def nvmlDeviceGetComputeRunningProcesses(self, h: dict[str, Any]) -> list[Any]:
        if self.fail_processes:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
        return [types.SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in h.get("procs", [])]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h: dict[str, Any]) -> list[Any]:
        return []

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        return f"python-{pid}"


def _fake_torch(*, cuda: bool = False, hip: str | None = None, mps: bool = False) -> Any:
    props = types.SimpleNamespace(name="Fake GPU", total_memory=24 * GIB, major=8, minor=9)
    return types.SimpleNamespace(
        version=types.SimpleNamespace(cuda=None if hip else "12.4", hip=hip),
        cuda=types.SimpleNamespace(is_available=lambda: cuda, device_count=lambda: 1,
                                   get_device_properties=lambda i: props,
                                   mem_get_info=lambda i: (20 * GIB, 24 * GIB)),
        backends=types.SimpleNamespace(mps=types.SimpleNamespace(is_available=lambda: mps)),
        mps=types.SimpleNamespace(recommended_max_memory=lambda: 48 * GIB, driver_allocated_memory=lambda: 2 * GIB),
    )


H200 = {"name": "NVIDIA H200", "total": 141 * GIB, "used": 5 * GIB, "cc": (9, 0), "procs": [(4242, 5 * GIB)]}
L4 = {"name": "NVIDIA L4", "total": 24 * GIB, "used": 0, "cc": (8, 9)}


def test_nvml_present_reports_every_gpu_with_details() -> None:
    nvml = FakeNvml([H200, L4], bytes_names=True)
    machine = detect_machine(nvml=nvml, torch_module=None)
    assert machine.backend == "cuda"
    assert [g.name for g in machine.gpus] == ["NVIDIA H200", "NVIDIA L4"]
    h = machine.gpus[0]
    assert (h.total_bytes, h.used_bytes, h.free_bytes) == (141 * GIB, 5 * GIB, 136 * GIB)
    assert h.driver_version == "550.54.15" and h.cuda_version == "12.4" and h.compute_capability == (9, 0)
    assert h.processes[0].pid == 4242 and h.processes[0].used_bytes == 5 * GIB and h.source == "nvml"
    assert machine.best_gpu is not None and machine.best_gpu.name == "NVIDIA H200"
    assert nvml.shutdowns == 1
    assert machine.cpu_cores >= 1 and machine.ram_total_bytes > 0
    assert "NVIDIA H200" in describe_machine(machine) and "pid 4242" in describe_machine(machine)


def test_nvml_process_query_refused_is_not_fatal() -> None:
    gpus = detect_gpus(nvml=FakeNvml([H200], fail_processes=True), torch_module=None)
    assert len(gpus) == 1 and gpus[0].processes == ()


def test_nvml_absent_falls_back_to_torch_cuda() -> None:
    machine = detect_machine(nvml=None, torch_module=_fake_torch(cuda=True))
    assert machine.backend == "cuda"
    g = machine.gpus[0]
    assert g.source == "torch" and g.total_bytes == 24 * GIB and g.free_bytes == 20 * GIB
    assert g.compute_capability == (8, 9)
    assert any("not installed" in n for n in machine.notes)


def test_nvml_failing_falls_back_and_says_why() -> None:
    machine = detect_machine(nvml=FakeNvml([H200], fail_init=True), torch_module=_fake_torch(cuda=True))
    assert machine.backend == "cuda" and machine.gpus[0].source == "torch"
    assert any("NVMLError" in n for n in machine.notes)


def test_rocm_is_reported_as_rocm() -> None:
    machine = detect_machine(nvml=FakeNvml([], fail_init=True), torch_module=_fake_torch(cuda=True, hip="6.1"))
    assert machine.backend == "rocm"
    assert machine.gpus[0].vendor == "amd" and machine.gpus[0].cuda_version == "6.1"
    assert machine.gpus[0].compute_capability is None


def test_mps_is_reported_as_unified_memory() -> None:
    machine = detect_machine(nvml=None, torch_module=_fake_torch(mps=True))
    assert machine.backend == "mps"
    g = machine.gpus[0]
    assert g.vendor == "apple" and g.total_bytes == 48 * GIB and g.used_bytes == 2 * GIB


def test_no_gpu_says_so_and_plans_for_cpu() -> None:
    machine = detect_machine(nvml=FakeNvml([]), torch_module=_fake_torch())
    assert machine.backend == "cpu" and machine.gpus == () and machine.best_gpu is None
    assert "No GPU" in describe_machine(machine)
    assert any("CPU" in n for n in machine.notes)


@pytest.mark.parametrize("torch_module", [None, "broken"])
def test_torch_absent_or_broken_never_raises(torch_module: Any) -> None:
    broken = types.SimpleNamespace(version=types.SimpleNamespace(hip=None))  # no .cuda: AttributeError
    machine = detect_machine(nvml=None, torch_module=broken if torch_module == "broken" else None)
    assert machine.backend == "cpu" and machine.gpus == ()
    assert machine.to_dict()["backend"] == "cpu"
