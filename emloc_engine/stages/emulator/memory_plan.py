"""How the emulator build fits its memory budget: tokens per forward chunk, and where hidden states live.

The build keeps the hidden states of every calibration sample, the statistics of one block, the
block itself and the factorisation temporaries resident, and pushes the samples through a block in
chunks sized to what is left of the budget (:func:`plan_build_memory`). The layout depends only on
the settings and the checkpoint, never on the memory free right now, so a resumed build chunks
exactly like the interrupted one (the chunking is part of the build's fingerprint).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from emloc_engine.core.architectures import num_blocks
from emloc_engine.core.calibration_chunks import calibration_chunking, default_build_budget
from emloc_engine.weights.checkpoint import Checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryLayout:
    """How the build fits its budget: tokens per forward chunk and where hidden states live."""

    budget_bytes: int
    chunk_tokens: int
    offload_hidden: bool


def plan_build_memory(hf_config: Any, ckpt: Checkpoint, device: torch.device, lengths: list[int], elem: int, *,
                      budget_bytes: int | None = None, chunk_tokens: int | None = None) -> MemoryLayout:
    """Chunking from the memory budget (:func:`~emloc_engine.core.calibration_chunks.calibration_chunking`,
    the rule the planner predicts with).

    Budget (default): 40% of the checkpoint's bytes, at least 2 GiB, at most the device's total,
    so construction peaks well under half of the model's inference peak.

    Args:
        hf_config: the model's transformers config (``hidden_size``, ``intermediate_size``).
        ckpt: the source checkpoint (only its headers are read).
        device: the compute device.
        lengths: token count of every calibration sample.
        elem: bytes per element of the compute dtype.
        budget_bytes: device memory the build may use (default: from the checkpoint, above).
        chunk_tokens: padded tokens per chunk, overriding the budget's choice (at least one sample).

    Returns:
        The :class:`MemoryLayout`.
    """
    if budget_bytes is not None:
        budget = budget_bytes
    else:
        total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        budget = default_build_budget(sum(i.nbytes for i in ckpt.infos()), total)
    blocks = max(1, num_blocks(hf_config))
    h = int(hf_config.hidden_size)
    chunking = calibration_chunking(
        hidden_size=h, intermediate_size=int(getattr(hf_config, "intermediate_size", 4 * h) or 4 * h),
        block_bytes=sum(i.nbytes for i in ckpt.infos() if ".layers." in i.name) // blocks, elem=elem,
        budget_bytes=budget, max_len=max(lengths), total_tokens=sum(lengths), on_cuda=device.type == "cuda",
        chunk_tokens=chunk_tokens)
    if chunking.tight:
        log.warning("memory budget of %.1f GiB is tight for %d-token samples; running one sample at a time",
                    budget / 2**30, max(lengths))
    return MemoryLayout(int(budget), chunking.chunk_tokens, chunking.offload_hidden)


__all__ = ["MemoryLayout", "plan_build_memory"]
