"""Where and in which precision the export verification runs: torch-free, shared with the planner.

The verification loads the original (+ adapter), then the merged folder, then the GGUF, one at a time.
In fp32 it is exact up to summation order; in the storage dtype (bf16/fp16) the tolerances widen to
the measured rounding floor (:mod:`emloc_engine.stages.export.exporter`). The rule:

* **No budget** (a per-stage command, the app's Try page): fp32 when one fp32 copy fits the device's
  free memory with room to spare (``1.3·P·4 + 2 GiB``) or is small (≤ 4 GiB), else the storage dtype
  on the same device.
* **With the run's budget** (``ExportConfig.memory_budget_bytes``, what the user gave or the planner's
  default): the GPU may hold at most ``min(free, budget)``. One model takes ``1.2·bytes + 0.5 GiB``
  (weights, the prompts' activations and logits, allocator rounding): fp32 on the GPU when that fits,
  else the storage dtype on the GPU, else the CPU (fp32 when the available RAM allows it, else the
  storage dtype). The GPU never needs more than the budget the user gave; before this rule, the
  verification of a 16 GiB-capped Llama-3-8B run loaded a 29.8 GiB fp32 copy and ran out of memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

GIB: Final = 1024**3


@dataclass(frozen=True)
class VerifyPlacement:
    """``device``: ``"gpu"`` or ``"cpu"``; ``fp32``: True = float32, False = the storage dtype."""

    device: str
    fp32: bool


def model_need_bytes(weight_bytes: int) -> int:
    """GPU memory one loaded model of ``weight_bytes`` takes during verification: ``1.2·bytes + 0.5 GiB``."""
    return int(1.2 * weight_bytes + GIB // 2)


def _fp32_fits_unbudgeted(fp32_bytes: int, free_bytes: int) -> bool:
    return fp32_bytes * 1.3 + 2 * GIB <= free_bytes or fp32_bytes <= 4 * GIB


def verify_placement(
    num_parameters: int,
    storage_bytes: int,
    *,
    on_gpu: bool,
    free_bytes: int,
    budget_bytes: int | None = None,
    ram_free_bytes: int | None = None,
) -> VerifyPlacement:
    """Where the verification runs and whether in fp32 (see the module docstring for the rule).

    Args:
        num_parameters: parameters of the model.
        storage_bytes: bytes per parameter as stored (2 for bf16/fp16, 4 for fp32).
        on_gpu: the run's device is a GPU.
        free_bytes: free memory of that device (the available RAM on the CPU).
        budget_bytes: the run's GPU budget; None = only the free memory counts.
        ram_free_bytes: available RAM, when the verification may move to the CPU.

    Returns:
        The placement.
    """
    fp32_bytes = num_parameters * 4
    if not on_gpu or budget_bytes is None:
        return VerifyPlacement("gpu" if on_gpu else "cpu", _fp32_fits_unbudgeted(fp32_bytes, free_bytes))
    room = min(free_bytes, budget_bytes)
    if model_need_bytes(fp32_bytes) <= room:
        return VerifyPlacement("gpu", True)
    if model_need_bytes(num_parameters * storage_bytes) <= room:
        return VerifyPlacement("gpu", False)
    ram = ram_free_bytes if ram_free_bytes is not None else 0
    return VerifyPlacement("cpu", _fp32_fits_unbudgeted(fp32_bytes, ram))
