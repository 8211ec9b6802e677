"""How the emulator build splits its calibration tokens into forward chunks: one rule, for the builder and the planner.

The build (:mod:`emloc_engine.stages.emulator.memory_plan`) keeps the hidden states of every sample,
one block's statistics, the block itself and the factorisation temporaries resident, and gives the
rest of its memory budget to the activations of one chunk. The planner
(:func:`emloc_engine.run.planning.emulator_build_peak`) must predict the chunk the build will really
run, so both call :func:`calibration_chunking` (on 2026-12-06 they each had their own formula, and the
planner assumed 16,733-token chunks where a Qwen2.5-14B build ran one of 32,768).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_CHUNK_TOKENS = 1 << 17
MIN_DEFAULT_BUDGET = 2 << 30
DEFAULT_BUDGET_SHARE = 0.4


@dataclass(frozen=True)
class Chunking:
    """Padded tokens per forward chunk, whether hidden states wait in CPU RAM, and whether the budget was tight."""

    chunk_tokens: int
    offload_hidden: bool
    tight: bool


def default_build_budget(model_bytes: int, device_total_bytes: int | None) -> int:
    """The build's budget when none is given: 40% of the checkpoint's bytes, at least 2 GiB, at most the device."""
    budget = max(MIN_DEFAULT_BUDGET, int(DEFAULT_BUDGET_SHARE * model_bytes))
    return min(budget, device_total_bytes) if device_total_bytes else budget


def calibration_chunking(*, hidden_size: int, intermediate_size: int, block_bytes: int, elem: int,
                         budget_bytes: int, max_len: int, total_tokens: int, on_cuda: bool,
                         chunk_tokens: int | None = None) -> Chunking:
    """The build's chunking for a budget.

    Resident: the hidden states of every sample (``tokens × hidden × elem``), the group statistics
    (``4·(3·h² + I²)`` bytes), one block twice (stored + compute copy) and the factorisation temporaries
    (``3 · widest_in² × 4``). The rest goes to the activations of one chunk, ``(8·I + 16·h)`` bytes per
    token in bf16. When that leaves less than one sample, the hidden states move to (pinned) CPU memory.

    Args:
        hidden_size, intermediate_size: the decoder's widths.
        block_bytes: one decoder block's stored bytes.
        elem: bytes per element of the compute dtype.
        budget_bytes: device memory the build may use.
        max_len: the longest calibration sample, in tokens.
        total_tokens: every calibration sample's tokens together.
        on_cuda: the build runs on a CUDA device (only there do hidden states move to pinned RAM).
        chunk_tokens: padded tokens per chunk, overriding the budget's choice (at least one sample).
    """
    h, inter = hidden_size, intermediate_size
    per_token = (8 * inter + 16 * h) * max(elem, 2) // 2
    fixed = 4 * (3 * h * h + inter * inter) + 2 * block_bytes * max(1, elem // 2) + 3 * 4 * max(h, inter) ** 2
    hidden = total_tokens * h * elem
    offload = on_cuda and budget_bytes - fixed - hidden < per_token * max_len
    room = budget_bytes - fixed - (0 if offload else hidden)
    tight = room < per_token * max_len
    if chunk_tokens is not None:
        chunk = max(chunk_tokens, max_len)
    else:
        chunk = max(max_len, min(room // per_token, MAX_CHUNK_TOKENS))
    return Chunking(int(chunk), bool(offload), bool(tight and chunk_tokens is None))


__all__ = ["MAX_CHUNK_TOKENS", "Chunking", "calibration_chunking", "default_build_budget"]
