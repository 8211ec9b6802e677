"""Where a stage computes and in which dtype: one rule, used by every stage.

A device is named ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (the ``--device`` option).

* ``auto`` is the first CUDA GPU when torch sees one (NVIDIA, or AMD through ROCm, which torch
  also calls ``cuda``), else Apple's GPU (MPS) when Metal is available, else the CPU. Until this
  module, training already chose MPS while the emulator build, the correction and the export
  verification fell back to the CPU on a Mac; someone with an Apple GPU expects ``auto`` to use it,
  and ``auto`` now means the same device in every stage.
* A named device that is not there is a :class:`ConfigError` naming it, with the hint to use the CPU.

The compute dtype (``auto``) of models, on that device:

* CUDA: bfloat16 where the GPU supports it, else float16.
* MPS: float32. The old rules disagreed (the emulator build used bfloat16 there, the λ evaluation
  float16, training float32). float32 is the one every MPS kernel supports (bfloat16 needs macOS 14,
  float16 overflows the activations of models trained in bfloat16), it is what training already
  used, and MPS is detected but not tested: correct beats fast.
* CPU: float32 (half-precision matrix products are slow or missing on CPUs).

Linear algebra that needs float64 (the emulator's factorisation and spectra, the correction's
solves) runs on :func:`linalg_device`: the CPU when the device is MPS, which has no float64.
"""

from __future__ import annotations

import torch

from emloc_engine.core.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                                  "float64": torch.float64}
"""The dtypes a stage may be told to compute in, by name."""


def mps_available() -> bool:
    """Whether torch can use Apple's GPU (False on builds without the MPS backend)."""
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and bool(mps.is_available())


def resolve_device(name: str) -> torch.device:
    """The device for ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``).

    Args:
        name: the device setting; ``auto`` picks CUDA, then MPS, then the CPU.

    Returns:
        The device.

    Raises:
        ConfigError: a CUDA device was named but no CUDA GPU is visible, or ``mps`` was named but
            Metal is not available.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device {name} was requested but no CUDA GPU is visible.", hint="Use --device cpu.")
    if dev.type == "mps" and not mps_available():
        raise ConfigError("Device mps was requested but Metal is not available.", hint="Use --device cpu.")
    return dev


def compute_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """The dtype models run in on ``device``: ``name`` itself, or for ``auto`` the rule above.

    Raises:
        ConfigError: ``name`` is neither ``auto`` nor one of :data:`DTYPES`.
    """
    if name != "auto":
        if name not in DTYPES:
            raise ConfigError(f"Unknown dtype {name!r}.", hint=f"Use auto or one of {', '.join(DTYPES)}.")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def linalg_device(device: torch.device) -> torch.device:
    """Where float64 linear algebra for ``device`` runs: the CPU instead of MPS, else ``device`` itself."""
    return torch.device("cpu") if device.type == "mps" else device


def parallel_devices(device: str, processes: int, *, gpu_ids: tuple[int, ...] = (),
                     backend: str = "auto") -> tuple[str, ...]:
    """The device of each data-parallel process: ``cuda:i`` for the chosen GPUs, or ``cpu`` for all.

    Args:
        device: the device setting; ``auto`` and ``cuda`` mean "the GPUs", ``cpu`` runs every process
            on the CPU.
        processes: how many processes.
        gpu_ids: the visible CUDA devices to use, one per process (default ``0 … processes-1``).
        backend: the collective backend (``nccl`` needs GPUs).

    Raises:
        ConfigError: a single device (``cuda:N``, ``mps``) was named, nccl was asked for on the CPU,
            or fewer CUDA GPUs are visible than asked for.
    """
    if device.startswith("cuda:") or device == "mps":
        raise ConfigError(f"--gpus {processes} cannot run on the single device {device}.",
                          hint="Use --device cuda (pick GPUs with --gpu-ids or CUDA_VISIBLE_DEVICES), or --gpus 1.")
    if device == "cpu":
        if backend == "nccl":
            raise ConfigError("The nccl backend needs CUDA GPUs; the CPU uses gloo.", hint="Use --backend gloo.")
        return ("cpu",) * processes
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ids = gpu_ids or tuple(range(processes))
    if visible == 0 or max(ids) >= visible:
        raise ConfigError(f"--gpus {processes} needs {processes} CUDA GPUs (ids {list(ids)}), but {visible} are visible.",
                          hint=f"Use --gpus {max(1, visible)}" + (" or --device cpu." if not visible else "."))
    return tuple(f"cuda:{i}" for i in ids)


__all__ = ["DTYPES", "compute_dtype", "linalg_device", "mps_available", "parallel_devices", "resolve_device"]
