"""The emulator folder on disk: block shards, the rest, the index, and ``emloc.json`` written last.

Layout (``RUN_DIR/emulator/``)::

    blocks-00000.safetensors ...   one shard per decoder block: compressed modules as M.u.weight,
                                   M.v.weight (+ M.u.bias), every other tensor of the block copied
    rest.safetensors               every tensor outside the blocks (embeddings, final norm, lm_head)
    model.safetensors.index.json   weight map over the shards
    config.json, tokenizer*, ...   copied from the source model (never the weights)
    emloc.json                     written LAST: its presence marks a complete emulator

Every shard is written atomically and carries the build's fingerprint in its metadata
(``emloc_build``), so a resumed build reuses exactly the shards of the same build
(:func:`shard_build_id`); block shards also carry each module's relative error.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from emloc_engine.core.atomic import atomic_path, write_json_atomic
from emloc_engine.core.dtypes import element_bytes
from emloc_engine.core.version import __version__
from emloc_engine.stages.emulator.build_context import BuildContext
from emloc_engine.weights.checkpoint import Checkpoint
from emloc_engine.weights.gguf_source import GGUF_VIEW_MARKER
from emloc_engine.weights.headers import WEIGHT_SUFFIXES
from emloc_engine.weights.lowrank import EMULATOR_FORMAT, EMULATOR_FORMAT_VERSION, EMULATOR_META

BLOCK_FILE = "blocks-{:05d}.safetensors"
REST_FILE = "rest.safetensors"
INDEX_FILE = "model.safetensors.index.json"
METHOD = "activation-aware-svd"
WHITENING = ("projection onto the top-k left singular vectors of W·S: eigh of W·C̃·Wᵀ when out ≤ in; "
             "fp64 Cholesky root of C̃ + δI (δ from 1e-10, ×100 until PD) and eigh of (WS)ᵀ(WS) when out > in; "
             "C̃ = C / mean eigenvalue")


def shard_build_id(path: Path) -> str | None:
    """The build fingerprint stored in a shard's metadata, or None (absent or unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        return meta.get("emloc_build")
    except Exception:  # an unreadable leftover is simply rebuilt
        return None


def block_tensors(prefix: str, tensors: Mapping[str, torch.Tensor],
                  factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A block's tensors as the emulator stores them: compressed module M as ``M.u.weight`` (out × k),
    ``M.v.weight`` (k × in) and its bias as ``M.u.bias``; every other tensor as is; names prefixed, all
    contiguous (what safetensors writes)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        module, _, leaf = key.rpartition(".")
        if module in factors:
            if leaf == "bias":
                out[f"{prefix}{module}.u.bias"] = t.contiguous()
            continue
        out[prefix + key] = t.contiguous()
    for module, (u, v) in factors.items():
        out[f"{prefix}{module}.u.weight"] = u.contiguous()
        out[f"{prefix}{module}.v.weight"] = v.contiguous()
    return out


def write_block_shard(out_dir: Path, block: int, *, prefix: str, tensors: Mapping[str, torch.Tensor],
                      factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], errors: Mapping[str, float],
                      build_id: str) -> None:
    """Write ``blocks-<block>.safetensors``: the factors of the compressed modules, every other tensor as is.

    Args:
        out_dir: the emulator folder.
        block: the block index.
        prefix: the block's tensor-name prefix (``model.layers.3.``).
        tensors: the block's original tensors, keyed by their name inside the block.
        factors: compressed module (name inside the block) -> ``(u, v)``.
        errors: compressed module -> relative error, stored in the metadata.
        build_id: the build fingerprint, stored in the metadata.
    """
    out = block_tensors(prefix, tensors, factors)
    meta = {"format": "pt", "emloc_build": build_id, "emloc_block": str(block),
            "emloc_errors": json.dumps({prefix + m: e for m, e in errors.items()})}
    with atomic_path(out_dir / BLOCK_FILE.format(block)) as tmp:
        save_file(out, str(tmp), metadata=meta)


def write_rest_shard(ctx: BuildContext, build_id: str) -> None:
    """Write ``rest.safetensors`` (every tensor outside the blocks) unless this build's is there already;
    streamed, one tensor in memory at a time."""
    target = ctx.out_dir / REST_FILE
    if shard_build_id(target) == build_id:
        return
    from emloc_engine.stages.export.merge import SAFETENSORS_DTYPES, ShardWriter

    ckpt = Checkpoint(ctx.ckpt.model_dir)
    try:
        inside = f"{ctx.spec.block_prefix}."
        infos = [i for i in ckpt.infos() if not i.name.startswith(inside)]
        specs = [(i.name, SAFETENSORS_DTYPES[i.dtype], i.shape) for i in infos]
        # one tensor in memory at a time: the embeddings and the head are the largest tensors of a model
        with atomic_path(target) as tmp, ShardWriter(tmp, specs, {"format": "pt", "emloc_build": build_id}) as out:
            for i in infos:
                out.write(i.name, ckpt.get(i.name).contiguous())
    finally:
        ckpt.close()


def source_revision(model_dir: Path) -> str | None:
    """The commit of an HF-cache snapshot folder (its name), else None."""
    return model_dir.name if model_dir.parent.name == "snapshots" else None


def _copy_side_files(model_dir: Path, out_dir: Path) -> None:
    """Config, tokenizer, chat template… every file of the source folder but weights, indexes and code."""
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and f.suffix not in WEIGHT_SUFFIXES and not f.name.endswith(".index.json") \
                and f.name not in (EMULATOR_META, GGUF_VIEW_MARKER) and f.suffix != ".py":  # a model folder's code is never carried
            with atomic_path(out_dir / f.name) as tmp:
                shutil.copyfile(f, tmp)


def _write_index(out_dir: Path, blocks: int) -> dict[str, float]:
    """Write the weight map over the shards; returns every module's relative error from their metadata."""
    weight_map: dict[str, str] = {}
    errors: dict[str, float] = {}
    total = 0
    for name in [REST_FILE, *(BLOCK_FILE.format(b) for b in range(blocks))]:
        with safe_open(str(out_dir / name), framework="pt") as fh:
            errors.update(json.loads((fh.metadata() or {}).get("emloc_errors", "{}")))
            for key in fh.keys():  # noqa: SIM118 - safe_open handles are not mappings
                weight_map[key] = name
                sl = fh.get_slice(key)
                total += math.prod(sl.get_shape()) * element_bytes(sl.get_dtype())
    write_json_atomic(out_dir / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return errors


def finish_emulator(ctx: BuildContext, *, settings: Mapping[str, Any], source_fp: str, calib_fp: str,
                    build_id: str, allocation: Mapping[str, Any] | None,
                    build: Mapping[str, Any]) -> dict[str, Any]:
    """Copy config/tokenizer files, write the index, then ``emloc.json`` (last); returns its content.

    Args:
        ctx: the build's context (its plan is the one that was built).
        settings: the user's plan settings as recorded (``ratio``, ``plan``, ``allocation``).
        source_fp: fingerprint of the source model.
        calib_fp: fingerprint of the calibration samples.
        build_id: the build fingerprint.
        allocation: the spectral allocation record, or None for a uniform build.
        build: how it ran (device, dtypes, chunking, timings, peak memory).
    """
    out_dir, spec, blocks = ctx.out_dir, ctx.spec, ctx.blocks
    _copy_side_files(ctx.model_dir, out_dir)
    errors = _write_index(out_dir, blocks)
    modules = {n: {"ratio": p.ratio, "rank": p.rank, "in_features": p.in_features, "out_features": p.out_features,
                   "bias": p.bias, "rel_error": errors.get(n)} for n, p in ctx.plan.items()}
    meta = {
        "format": EMULATOR_FORMAT,
        "format_version": EMULATOR_FORMAT_VERSION,
        "engine_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source_model": {"path": str(ctx.model_dir), "revision": source_revision(ctx.model_dir),
                         "fingerprint": source_fp},
        "method": METHOD,
        "whitening": WHITENING,
        **settings,
        **({"spectral_allocation": {k: allocation[k] for k in ("key", "version", "budget", "params_spent",
                                                                "spectra_wall_s", "dense")}}
           if allocation is not None else {}),
        "calibration": {"samples": len(ctx.samples), "tokens": ctx.n_tokens, "fingerprint": calib_fp,
                        "max_length": max(len(s) for s in ctx.samples)},
        "build_id": build_id,
        "build": dict(build),
        "dense_modules": [spec.module_name(b, m) for b in range(blocks) for m in spec.linear_modules
                          if spec.module_name(b, m) not in ctx.plan],
        "modules": modules,
    }
    write_json_atomic(out_dir / EMULATOR_META, meta)
    return meta


__all__ = ["BLOCK_FILE", "INDEX_FILE", "METHOD", "REST_FILE", "WHITENING", "block_tensors", "finish_emulator",
           "shard_build_id", "source_revision", "write_block_shard", "write_rest_shard"]
