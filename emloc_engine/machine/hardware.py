"""What this machine has: GPUs (NVML first, torch as fallback), CPU cores and RAM.

NVIDIA GPUs are read through NVML (``pynvml`` from the ``nvidia-ml-py`` package): it needs no
CUDA context, so ``emloc gpu`` is instant and does not itself take GPU memory. When NVML is
missing or fails (no driver library, a container without it, an AMD machine) torch is asked:
``torch.cuda`` (CUDA or ROCm, told apart by ``torch.version.hip``), then Apple's MPS. With no GPU
the machine is reported as CPU-only and the planner plans for the CPU's RAM.

Both NVML and torch are injectable (``nvml=``, ``torch_module=``) so tests can pass fakes:
``None`` means "not installed"; the default :data:`AUTO` imports the real module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Final

log = logging.getLogger(__name__)

AUTO: Final = "auto"
"""Sentinel default of ``nvml=`` / ``torch_module=``: import the real module."""

GIB: Final = 1024**3


@dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on a GPU (as NVML reports it)."""

    pid: int
    name: str
    used_bytes: int | None


@dataclass(frozen=True)
class GpuInfo:
    """One accelerator and its memory right now.

    ``free_bytes`` is what other processes leave; ``total_bytes`` what the card has. For Apple MPS
    (unified memory) ``total_bytes`` is the recommended working-set size torch reports.
    """

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    driver_version: str | None = None
    cuda_version: str | None = None
    compute_capability: tuple[int, int] | None = None
    processes: tuple[GpuProcess, ...] = ()
    source: str = "nvml"  # "nvml" | "torch"
    vendor: str = "nvidia"  # "nvidia" | "amd" | "apple"

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    @property
    def free_gib(self) -> float:
        return self.free_bytes / GIB

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "name": self.name, "vendor": self.vendor, "source": self.source,
            "total_bytes": self.total_bytes, "free_bytes": self.free_bytes, "used_bytes": self.used_bytes,
            "driver_version": self.driver_version, "cuda_version": self.cuda_version,
            "compute_capability": list(self.compute_capability) if self.compute_capability else None,
            "processes": [{"pid": p.pid, "name": p.name, "used_bytes": p.used_bytes} for p in self.processes],
        }


@dataclass(frozen=True)
class MachineInfo:
    """GPUs, the backend the engine will use, and the CPU side.

    ``backend`` is ``"cuda"`` (NVIDIA), ``"rocm"`` (AMD through torch's HIP build), ``"mps"``
    (Apple) or ``"cpu"``. ``notes`` explain fallbacks (e.g. "NVML unavailable: ...").
    """

    gpus: tuple[GpuInfo, ...]
    backend: str
    cpu_cores: int
    ram_total_bytes: int
    ram_available_bytes: int
    notes: tuple[str, ...] = field(default=())

    @property
    def best_gpu(self) -> GpuInfo | None:
        """The GPU with the most total memory (the one a single-GPU run should use)."""
        return max(self.gpus, key=lambda g: g.total_bytes) if self.gpus else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend, "gpus": [g.to_dict() for g in self.gpus], "cpu_cores": self.cpu_cores,
            "ram_total_bytes": self.ram_total_bytes, "ram_available_bytes": self.ram_available_bytes,
            "notes": list(self.notes),
        }


def _text(value: Any) -> str:
    """NVML returns ``bytes`` in old bindings and ``str`` in new ones."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _import_nvml() -> Any | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _import_torch() -> Any | None:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    return torch


def _nvml_processes(nvml: Any, handle: Any) -> tuple[GpuProcess, ...]:
    procs: dict[int, GpuProcess] = {}
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        fn = getattr(nvml, getter, None)
        if fn is None:
            continue
        try:
            entries = fn(handle)
        except Exception as exc:  # a driver may refuse process queries (containers): not fatal
            log.debug("%s failed: %s", getter, exc)
            continue
        for e in entries:
            pid = int(e.pid)
            used = getattr(e, "usedGpuMemory", None)
            try:
                name = _text(nvml.nvmlSystemGetProcessName(pid))
            except Exception:
                name = "?"
            procs[pid] = GpuProcess(pid, name, int(used) if used is not None else None)
    return tuple(procs.values())


def _cuda_version_text(raw: int) -> str:
    """NVML encodes CUDA 12.4 as 12040."""
    return f"{raw // 1000}.{(raw % 1000) // 10}"


def gpus_from_nvml(nvml: Any) -> list[GpuInfo]:
    """Every NVIDIA GPU NVML sees.

    Args:
        nvml: the ``pynvml`` module, or a fake with the same functions.

    Returns:
        One :class:`GpuInfo` per device, in NVML index order.

    Raises:
        Exception: whatever NVML raises (``pynvml.NVMLError`` subclasses) when it cannot initialise;
            :func:`detect_gpus` catches it and falls back to torch.
    """
    nvml.nvmlInit()
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        try:
            getter = getattr(nvml, "nvmlSystemGetCudaDriverVersion_v2", None) or nvml.nvmlSystemGetCudaDriverVersion
            cuda: str | None = _cuda_version_text(int(getter()))
        except Exception:
            cuda = None
        gpus = []
        for i in range(int(nvml.nvmlDeviceGetCount())):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            try:
                cc: tuple[int, int] | None = tuple(int(x) for x in nvml.nvmlDeviceGetCudaComputeCapability(h))  # type: ignore[assignment]
            except Exception:
                cc = None
            gpus.append(GpuInfo(
                index=i, name=_text(nvml.nvmlDeviceGetName(h)), total_bytes=int(mem.total),
                free_bytes=int(mem.free), used_bytes=int(mem.used), driver_version=driver, cuda_version=cuda,
                compute_capability=cc, processes=_nvml_processes(nvml, h), source="nvml", vendor="nvidia",
            ))
        return gpus
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as exc:  # shutting down a half-initialised NVML must not hide the result
            log.debug("nvmlShutdown failed: %s", exc)


def gpus_from_torch(torch: Any) -> tuple[list[GpuInfo], str]:
    """GPUs torch can use, and the backend: ``"cuda"``, ``"rocm"``, ``"mps"`` or ``"cpu"``.

    Asking ``torch.cuda.mem_get_info`` creates a CUDA context (a few hundred MiB), which is why
    NVML is tried first.
    """
    hip = getattr(torch.version, "hip", None)
    if torch.cuda.is_available():
        backend = "rocm" if hip else "cuda"
        gpus = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            try:
                free, total = (int(x) for x in torch.cuda.mem_get_info(i))
            except Exception:
                free, total = int(props.total_memory), int(props.total_memory)
            gpus.append(GpuInfo(
                index=i, name=str(props.name), total_bytes=total, free_bytes=free, used_bytes=total - free,
                driver_version=None, cuda_version=str(hip) if hip else getattr(torch.version, "cuda", None),
                compute_capability=None if hip else (int(props.major), int(props.minor)),
                source="torch", vendor="amd" if hip else "nvidia",
            ))
        return gpus, backend
    mps = getattr(getattr(torch, "backends", None), "mps", None)
    if mps is not None and mps.is_available():
        total = int(torch.mps.recommended_max_memory()) if hasattr(torch.mps, "recommended_max_memory") else 0
        used = int(torch.mps.driver_allocated_memory()) if hasattr(torch.mps, "driver_allocated_memory") else 0
        if not total:
            total = _ram()[0]
        return [GpuInfo(index=0, name="Apple GPU (MPS, unified memory)", total_bytes=total,
                        free_bytes=max(0, total - used), used_bytes=used, source="torch", vendor="apple")], "mps"
    return [], "cpu"


def _ram() -> tuple[int, int]:
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available)


def _detect(nvml: Any, torch_module: Any) -> tuple[list[GpuInfo], str, list[str]]:
    notes: list[str] = []
    nv = _import_nvml() if nvml == AUTO else nvml
    if nv is None:
        notes.append("NVML (nvidia-ml-py) is not installed; asked torch instead.")
    else:
        try:
            gpus = gpus_from_nvml(nv)
        except Exception as exc:  # pynvml.NVMLError_LibraryNotFound, DriverNotLoaded, ...
            notes.append(f"NVML unavailable ({type(exc).__name__}: {exc}); asked torch instead.")
        else:
            if gpus:
                return gpus, "cuda", notes
            notes.append("NVML reports no NVIDIA GPU.")
    tm = _import_torch() if torch_module == AUTO else torch_module
    if tm is None:
        notes.append("torch is not importable; no GPU can be used.")
        return [], "cpu", notes
    try:
        gpus, backend = gpus_from_torch(tm)
    except Exception as exc:
        notes.append(f"torch could not query GPUs ({type(exc).__name__}: {exc}).")
        return [], "cpu", notes
    if backend == "rocm":
        notes.append("AMD GPU through ROCm (torch HIP build); memory from torch.cuda.mem_get_info.")
    elif backend == "mps":
        notes.append("Apple Silicon GPU (MPS): memory is shared with the CPU; total is torch's recommended working set.")
    elif backend == "cpu":
        notes.append("No GPU found: everything runs on the CPU and plans use system RAM.")
    return gpus, backend, notes


def detect_gpus(nvml: Any = AUTO, torch_module: Any = AUTO) -> list[GpuInfo]:
    """Every GPU the engine could use: NVML first, torch as fallback. Never raises.

    Args:
        nvml: the ``pynvml`` module (default: import it); ``None`` = not installed.
        torch_module: the ``torch`` module (default: import it when needed); ``None`` = absent.

    Returns:
        The GPUs found; empty when there is none.
    """
    return _detect(nvml, torch_module)[0]


def detect_machine(nvml: Any = AUTO, torch_module: Any = AUTO) -> MachineInfo:
    """GPUs, backend, CPU cores and RAM of this machine. Never raises.

    Args:
        nvml: as for :func:`detect_gpus`.
        torch_module: as for :func:`detect_gpus`.

    Returns:
        A :class:`MachineInfo`; ``backend == "cpu"`` and an explanatory note when no GPU is usable.
    """
    import os

    import psutil

    gpus, backend, notes = _detect(nvml, torch_module)
    total, available = _ram()
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return MachineInfo(gpus=tuple(gpus), backend=backend, cpu_cores=int(cores), ram_total_bytes=total,
                       ram_available_bytes=available, notes=tuple(notes))


def describe_machine(machine: MachineInfo) -> str:
    """A few human lines for ``emloc gpu`` and logs."""
    lines = []
    if not machine.gpus:
        lines.append("No GPU: EMLoC will run on the CPU (slow) and plan for system RAM.")
    for g in machine.gpus:
        extra = []
        if g.compute_capability:
            extra.append(f"compute {g.compute_capability[0]}.{g.compute_capability[1]}")
        if g.driver_version:
            extra.append(f"driver {g.driver_version}")
        if g.cuda_version:
            extra.append(f"{'ROCm/HIP' if g.vendor == 'amd' else 'CUDA'} {g.cuda_version}")
        lines.append(f"GPU {g.index}: {g.name}  {g.total_gib:.1f} GiB total, {g.free_gib:.1f} GiB free"
                     f"{'  (' + ', '.join(extra) + ')' if extra else ''}  [{g.source}]")
        for p in g.processes:
            used = f"{p.used_bytes / GIB:.2f} GiB" if p.used_bytes is not None else "? GiB"
            lines.append(f"    pid {p.pid} {p.name}: {used}")
    lines.append(f"Backend: {machine.backend}; CPU: {machine.cpu_cores} cores, "
                 f"RAM {machine.ram_total_bytes / GIB:.1f} GiB ({machine.ram_available_bytes / GIB:.1f} GiB available)")
    lines.extend(f"Note: {n}" for n in machine.notes)
    return "\n".join(lines)
