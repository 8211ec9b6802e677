"""Merge a LoRA adapter into a model whose weights come from a :class:`~emloc_engine.weights.checkpoint.Checkpoint`
that has no safetensors shards to copy: a model view of a GGUF file.

The merged folder is a plain Hugging Face folder: ``model-0000i-of-0000n.safetensors`` shards of at most
:data:`SHARD_BYTES`, tensors in the checkpoint's order, each in its storage dtype (the GGUF's F32/F16/BF16,
and the view's dtype, bf16 by default, for quantized tensors), plus ``model.safetensors.index.json``.
An adapted weight is read as exact fp32 (the dequantized file), merged in fp32
(:func:`~emloc_engine.stages.export.merge.merge_weight`) and only then cast to its storage dtype.
Memory holds one tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from emloc_engine.core.atomic import write_json_atomic
from emloc_engine.core.errors import MergeError
from emloc_engine.core.progress import NULL_PROGRESS, Progress
from emloc_engine.stages.export.merge import SAFETENSORS_DTYPES, LoraDelta, ShardWriter, merge_weight
from emloc_engine.weights.checkpoint import Checkpoint, TensorInfo

SHARD_BYTES = 5 * 2**30
"""Largest merged shard (transformers' default ``max_shard_size`` is 5 GB too)."""


def plan_shards(infos: list[TensorInfo], shard_bytes: int = SHARD_BYTES) -> list[list[TensorInfo]]:
    """Split tensors, in order, into shards of at most ``shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return [s for s in shards if s]


def _merged(ckpt: Checkpoint, info: TensorInfo, delta: LoraDelta) -> torch.Tensor:
    store = SAFETENSORS_DTYPES[info.dtype]
    w = merge_weight(info.name, ckpt.get(info.name, dtype=torch.float32), delta)
    out = w.to(store)
    if not bool(torch.isfinite(out).all()):
        raise MergeError(f"Merging the LoRA delta into {info.name} overflows {store} when cast back.",
                         hint="The adapter pushes weights out of the storage range; make the view in float32.")
    return out


def write_merged_from_checkpoint(model_dir: Path, deltas: dict[str, LoraDelta], out: Path,
                                 progress: Progress = NULL_PROGRESS, *, shard_bytes: int = SHARD_BYTES) -> int:
    """Write the merged weights of ``model_dir`` (read through :class:`Checkpoint`) into ``out``; returns modules merged.

    Raises:
        MergeError: a non-finite merge (names the tensor).
        ModelNotFound: the source is unreadable.
        OSError: the disk is full (the caller's ``atomic_dir`` turns it into ``DiskFull``).
    """
    ckpt = Checkpoint(model_dir)
    try:
        shards = plan_shards(list(ckpt.infos()), shard_bytes)
        total = sum(i.nbytes for s in shards for i in s) or 1
        done, merged, weight_map = 0, 0, {}
        for k, shard in enumerate(shards):
            name = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            specs = [(i.name, SAFETENSORS_DTYPES[i.dtype], i.shape) for i in shard]
            with ShardWriter(out / name, specs) as dst:
                for info in shard:
                    progress.check_cancelled()
                    module = info.name[: -len(".weight")] if info.name.endswith(".weight") else None
                    if module in deltas:
                        t = _merged(ckpt, info, deltas[module])
                        merged += 1
                    else:
                        t = ckpt.get(info.name)
                    dst.write(info.name, t)
                    del t
                    weight_map[info.name] = name
                    done += info.nbytes
                    progress.update(done / total, f"Merging {name}")
    finally:
        ckpt.close()
    write_json_atomic(out / "model.safetensors.index.json",
                      {"metadata": {"total_size": total if weight_map else 0}, "weight_map": weight_map})
    return merged


__all__ = ["SHARD_BYTES", "plan_shards", "write_merged_from_checkpoint"]
