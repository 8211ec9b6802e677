"""``--gpu-memory``: cap this process's CUDA memory (``torch.cuda.set_per_process_memory_fraction``).

People who share the card with a running chat server, and the benchmarks standing in for consumer
cards (16 GB, 24 GB) on a large GPU, cap the process itself: past the cap the caching allocator
raises an out-of-memory error, exactly as a smaller card would. The cap is set at the start of every
stage (:func:`emloc_engine.run.orchestrator.run_stage`) on each CUDA device the run uses; it counts
what PyTorch's allocator holds (the CUDA context itself, ~0.5 GiB, is outside it). On the CPU or
MPS the setting is recorded and ignored, with a note.
"""

from __future__ import annotations

import logging
from typing import Any

from emloc_engine.machine.budget import GIB, memory_fraction

log = logging.getLogger(__name__)


def cap_devices(device: str, gpus: int) -> tuple[int, ...]:
    """CUDA device indices a run uses: ``cuda:N`` → (N,), ``cuda``/``auto`` → 0..gpus−1, others → ()."""
    if device.startswith("cuda:"):
        return (int(device.split(":", 1)[1]),)
    if device in ("cuda", "auto"):
        return tuple(range(max(1, gpus)))
    return ()


def apply_gpu_memory_cap(
    cap_bytes: int | None, device: str = "auto", gpus: int = 1, cuda: Any = None
) -> list[str]:
    """Cap this process at ``cap_bytes`` on every CUDA device the run uses.

    Args:
        cap_bytes: the cap (``RunConfig.gpu_memory_bytes``); None = no cap, nothing is done.
        device: the run's device setting.
        gpus: the run's GPU count.
        cuda: the ``torch.cuda`` module (injectable for tests); default: the real one.

    Returns:
        Notes for the log: the fraction set per device, or why the cap is ignored (no CUDA).
    """
    if cap_bytes is None:
        return []
    if cuda is None:
        import torch

        cuda = torch.cuda
    indices = cap_devices(device, gpus)
    if not indices or not cuda.is_available():
        note = (
            f"--gpu-memory {cap_bytes / GIB:.2f} GiB is recorded but ignored: the run does not use a CUDA GPU "
            f"(device {device})."
        )
        log.info(note)
        return [note]
    notes = []
    for index in indices:
        if index >= cuda.device_count():
            continue
        total = int(cuda.get_device_properties(index).total_memory)
        fraction = memory_fraction(cap_bytes, total)
        cuda.set_per_process_memory_fraction(fraction, index)
        if cap_bytes >= total:
            notes.append(
                f"GPU {index}: --gpu-memory {cap_bytes / GIB:.2f} GiB is not less than the card's "
                f"{total / GIB:.1f} GiB, so it caps nothing; give a smaller value to cap this process."
            )
            log.warning(notes[-1])
            continue
        notes.append(
            f"GPU {index}: this process is capped at {cap_bytes / GIB:.2f} GiB "
            f"({fraction:.4f} of {total / GIB:.1f} GiB)."
        )
        log.info(notes[-1])
    return notes
