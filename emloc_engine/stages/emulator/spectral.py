"""Rank allocation by whitened spectra (``allocation="spectral"``): measure, allocate, store.

Before the build, a first streamed pass (:meth:`~emloc_engine.stages.emulator.block_loop.BlockLoop.spectra`)
runs the build's capture and block forward with the same statistics, but instead of factorising it
keeps each module's whitened spectrum (eigenvalues of ``W C Wᵀ``, fp64) and frees the block; then
:func:`emloc_engine.stages.emulator.rank_allocation.allocate_ranks` redistributes the uniform ρ's
parameter budget over the modules (some become dense) and the normal loop builds that plan. The
chosen ranks are stored in :data:`ALLOCATION_FILE` in the output folder, keyed by everything the pass
depends on, so a resumed or repeated build reuses them without a second pass (and would recompute
the same ones: the pass is deterministic on one machine).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from emloc_engine.core.atomic import write_json_atomic
from emloc_engine.core.errors import ConfigError, InsufficientMemory
from emloc_engine.core.progress import Progress
from emloc_engine.stages.emulator.block_loop import BlockLoop
from emloc_engine.stages.emulator.build_context import BuildContext, ModulePlan, last_match
from emloc_engine.stages.emulator.rank_allocation import allocate_ranks, kept_parameters

log = logging.getLogger(__name__)

ALLOCATION_FILE = "emloc-allocation.json"
ALLOCATION_VERSION = 1


def free_modules(plan: Mapping[str, ModulePlan], rank_overrides: tuple[tuple[str, int], ...]) -> list[str]:
    """Planned modules whose rank the spectral allocation may choose: those without a user rank override."""
    return [n for n in plan if last_match(n, rank_overrides) is None]


def measure(ctx: BuildContext, modules: set[str], progress: Progress) -> dict[str, list[float]]:
    """The whitened spectrum of every module in ``modules`` (a streamed pass that writes nothing).

    Raises:
        InsufficientMemory: CUDA ran out of memory during the pass.
        DataError, ModelNotFound, Cancelled: as the build.
    """
    if not modules:
        return {}
    loop = BlockLoop(ctx, build_id="")
    try:
        return loop.spectra(modules, progress)
    except torch.OutOfMemoryError as exc:
        raise InsufficientMemory(
            f"Out of GPU memory while measuring spectra for the rank allocation: {exc}".splitlines()[0],
            hint="Lower --calib or --max-length, or set a smaller memory budget / chunk_tokens.") from exc
    finally:
        loop.close()


def spectral_allocation(ctx: BuildContext, *, free: Sequence[str], ratio: float, key: str,
                        progress: Progress) -> dict[str, Any]:
    """The spectra pass and the greedy allocation over the ``free`` modules, as a JSON-ready record.

    Args:
        ctx: the uniform build's context (its plan gives each module's uniform rank: the budget).
        free: the modules whose rank may change (:func:`free_modules`).
        ratio: the uniform keep-ratio ρ.
        key: fingerprint of everything the pass depends on (stored with the record).
        progress: receives the pass's progress; messages start with "rank allocation".
    """
    t0 = time.monotonic()
    plan = ctx.plan
    progress.update(0.0, f"rank allocation: measuring the spectra of {len(free)} modules")
    spectra = measure(ctx, set(free), progress)
    shapes = {n: (plan[n].out_features, plan[n].in_features) for n in free}
    budget = sum(plan[n].rank * (plan[n].out_features + plan[n].in_features) for n in free)
    overrides, dense = allocate_ranks({n: spectra[n] for n in free}, shapes, ratio, budget=budget)
    spent = kept_parameters(shapes, overrides, dense)
    wall = time.monotonic() - t0
    log.info("spectral rank allocation: %d modules, %d kept dense, %d of %d parameters, %.1f s",
             len(free), len(dense), spent, budget, wall)
    progress.update(1.0, f"rank allocation: {len(dense)} of {len(free)} modules dense, "
                         f"{spent:,} of {budget:,} parameters")
    return {"key": key, "allocation": "spectral", "version": ALLOCATION_VERSION, "budget": budget,
            "params_spent": spent, "spectra_wall_s": round(wall, 3),
            "rank_overrides": [[n, k] for n, k in overrides], "dense": list(dense)}


def read_allocation(out_dir: Path, key: str) -> dict[str, Any] | None:
    """The stored spectral allocation of this build's inputs, or None (absent, unreadable or stale)."""
    try:
        data = json.loads((out_dir / ALLOCATION_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def save_allocation(out_dir: Path, allocation: Mapping[str, Any]) -> None:
    """Store the allocation record in ``out_dir`` (created if needed), atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / ALLOCATION_FILE, dict(allocation))


def apply_allocation(plan: Mapping[str, ModulePlan], allocation: Mapping[str, Any]) -> dict[str, ModulePlan]:
    """The plan with the allocation's ranks, without the modules it keeps dense.

    Raises:
        ConfigError: the allocation keeps every module dense.
    """
    ranks = {str(n): int(k) for n, k in allocation["rank_overrides"]}
    dense = set(allocation["dense"])
    out = {}
    for name, p in plan.items():
        if name in dense:
            continue
        k = ranks.get(name)
        out[name] = p if k is None else ModulePlan(p.name, p.block, p.path, p.ratio,
                                                   min(k, p.out_features, p.in_features), p.in_features,
                                                   p.out_features, p.bias)
    if not out:
        raise ConfigError("The spectral allocation keeps every module dense: nothing is compressed.",
                          hint="Use a lower ratio or allocation uniform.")
    return out


__all__ = ["ALLOCATION_FILE", "ALLOCATION_VERSION", "apply_allocation", "free_modules", "measure", "read_allocation",
           "save_allocation", "spectral_allocation"]
