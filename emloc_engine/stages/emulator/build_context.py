"""What a streamed pass over the decoder blocks works from, resolved once from the stage's settings.

:class:`ModulePlan` says how one linear module is compressed; :class:`BuildContext` holds the plan
of every module together with the model, device, dtypes and memory layout. The build
(:mod:`emloc_engine.stages.emulator.block_loop`), the spectra pass of the rank allocation and the
emulator folder writer (:mod:`emloc_engine.stages.emulator.writer`) all take one context instead of
a dozen arguments.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from emloc_engine.core.architectures import ArchSpec
from emloc_engine.stages.emulator.memory_plan import MemoryLayout
from emloc_engine.weights.checkpoint import Checkpoint


@dataclass(frozen=True)
class ModulePlan:
    """How one decoder linear module is compressed."""

    name: str
    block: int
    path: str
    ratio: float
    rank: int
    in_features: int
    out_features: int
    bias: bool


def last_match(name: str, pairs: tuple[tuple[str, Any], ...]) -> Any:
    """The value of the last ``(pattern, value)`` whose fnmatch pattern matches ``name``, else None."""
    found = None
    for pattern, value in pairs:
        if fnmatch.fnmatchcase(name, pattern):
            found = value
    return found


@dataclass(frozen=True)
class BuildContext:
    """The resolved inputs of one streamed pass over the blocks.

    Attributes:
        model_dir: the source model folder (resolved).
        out_dir: the emulator folder (resolved).
        spec: the decoder layout of the architecture.
        ckpt: the source checkpoint (headers; tensors are read block by block).
        hf_config: the model's transformers config.
        blocks: number of decoder blocks.
        plan: every compressed module's :class:`ModulePlan`, by full module name.
        samples: the calibration samples' token ids.
        layout: chunking and hidden-state placement.
        device: where the blocks run.
        compute: dtype of the block forward.
        stats: dtype of the statistics ``C = Σ XᵀX``.
        linalg: dtype of the factorisation.
        solver: the factorisation's eigen-solver.
        factor_devices: more devices that factorise while the main one runs the next block.
    """

    model_dir: Path
    out_dir: Path
    spec: ArchSpec
    ckpt: Checkpoint
    hf_config: Any
    blocks: int
    plan: Mapping[str, ModulePlan]
    samples: tuple[tuple[int, ...], ...]
    layout: MemoryLayout
    device: torch.device
    compute: torch.dtype
    stats: torch.dtype
    linalg: torch.dtype
    solver: str
    factor_devices: tuple[str, ...]

    @property
    def n_tokens(self) -> int:
        """Real calibration tokens."""
        return sum(len(s) for s in self.samples)


__all__ = ["BuildContext", "ModulePlan", "last_match"]
