"""What this process's memory peaks at: on a CUDA GPU (torch's allocator) over a block of work.

Every stage reports ``peak_vram_gib`` as ``torch.cuda.max_memory_allocated`` after
``torch.cuda.reset_peak_memory_stats`` at its start (the orchestrator stores it as the stage's
``measured_peak_gib``, beside the planner's prediction); :class:`GpuPeak` is that measurement for a
stage whose work may or may not touch a GPU.
"""

from __future__ import annotations

import torch


class GpuPeak:
    """The peak memory torch allocates on ``device`` during a ``with`` block, in GiB (``gib``).

    The device's peak statistics are reset on entry and read on exit. On any device that is not CUDA
    (or ``None``: the work runs on no GPU) nothing is touched and ``gib`` stays 0.0.
    """

    def __init__(self, device: torch.device | None) -> None:
        self.device = device if device is not None and device.type == "cuda" else None
        self.gib = 0.0

    def __enter__(self) -> GpuPeak:
        if self.device is not None:
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device is not None:
            self.gib = torch.cuda.max_memory_allocated(self.device) / 2**30


__all__ = ["GpuPeak"]
