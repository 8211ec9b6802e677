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
    """Chunking from the memory budget, with an explicit account of what stays resident.

    Budget (default): 40% of the checkpoint's bytes, at least 2 GiB, at most the device's total,
    so construction peaks well under half of the model's inference peak. Resident: the hidden states
    of every sample (``tokens × hidden × elem``), the group statistics (``Σ in² × 4``), one block
    twice (stored + compute copy) and the factorisation temporaries (``≈ 3 · widest_in² × 4``).
    The rest goes to activations of one chunk, about ``(8·intermediate + 16·hidden)`` bytes per
    token in bf16. When that leaves less than one sample, the hidden states move to (pinned) CPU
    memory.

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
    max_len = max(lengths)
    h = int(hf_config.hidden_size)
    inter = int(getattr(hf_config, "intermediate_size", 4 * h) or 4 * h)
    per_token = (8 * inter + 16 * h) * max(elem, 2) // 2
    if budget_bytes is not None:
        budget = budget_bytes
    else:
        budget = max(2 << 30, int(0.4 * sum(i.nbytes for i in ckpt.infos())))
        if device.type == "cuda":
            budget = min(budget, torch.cuda.get_device_properties(device).total_memory)
    blocks = max(1, num_blocks(hf_config))
    block_bytes = sum(i.nbytes for i in ckpt.infos() if ".layers." in i.name) // blocks
    fixed = 4 * (3 * h * h + inter * inter) + 2 * block_bytes * max(1, elem // 2) + 3 * 4 * max(h, inter) ** 2
    hidden = sum(lengths) * h * elem
    offload = device.type == "cuda" and budget - fixed - hidden < per_token * max_len
    room = budget - fixed - (0 if offload else hidden)
    if chunk_tokens is not None:
        chunk = max(chunk_tokens, max_len)
    else:
        chunk = max(max_len, min(room // per_token, 1 << 17))
        if room < per_token * max_len:
            log.warning("memory budget of %.1f GiB is tight for %d-token samples; running one sample at a time",
                        budget / 2**30, max_len)
    return MemoryLayout(int(budget), int(chunk), bool(offload))


__all__ = ["MemoryLayout", "plan_build_memory"]
