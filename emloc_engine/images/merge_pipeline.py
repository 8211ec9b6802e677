"""Write a pipeline folder whose denoiser has the LoRA merged in; every other component comes from the original.

The denoiser's weights are streamed tensor by tensor through
:func:`emloc_engine.stages.export.merge.merge_weight` (``W' = W + s·B·A`` in fp32, NaN/Inf refused before
anything is committed, cast back to the stored dtype), so one tensor at a time is in memory. The
denoiser folder gets its ``config.json`` and the merged ``diffusion_pytorch_model*.safetensors`` (the
files diffusers loads without ``variant``); variant files (``*.fp16.safetensors``) are *not* carried
over, because they would load the unmerged weights.

Every other file of the pipeline (text encoders, VAE, tokenizers, scheduler, ``model_index.json``) is
hard-linked from the original when the output is on the same disk (no space used; nothing ever writes
into these files) and copied otherwise. The original folder is only read.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from emloc_engine.core.errors import MergeError, ModelNotFound
from emloc_engine.core.progress import NULL_PROGRESS, Progress
from emloc_engine.images.pipelines import PipelineInfo
from emloc_engine.stages.export.merge import (
    SAFETENSORS_DTYPES,
    LoraDelta,
    ShardWriter,
    iter_shard_tensors,
    merge_weight,
    read_shard_index,
)

WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def denoiser_shards(folder: Path) -> list[Path]:
    """The safetensors files diffusers loads for a denoiser folder (the index's shards, or the single file).

    Raises:
        ModelNotFound: neither a single file nor an index (e.g. only ``.bin`` or only variants).
    """
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / n for n in names]
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    raise ModelNotFound(
        f"{folder} has no {WEIGHTS} (or sharded index) to merge into.",
        hint="Merging needs the denoiser in safetensors without a variant; export the LoRA file instead.",
    )


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` (its resolved file, so HF cache symlinks point nowhere new) to ``dst``; copy if that fails."""
    real = src.resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(real, dst)
    except OSError:
        shutil.copy2(real, dst)


def _copy_tree(src: Path, dst: Path, skip: str) -> None:
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.parts[0] == skip or rel.parts[0].startswith(".") or not path.is_file():
            continue
        link_or_copy(path, dst / rel)


def write_merged_pipeline(
    info: PipelineInfo,
    deltas: Mapping[str, LoraDelta],
    out_dir: Path,
    progress: Progress = NULL_PROGRESS,
) -> None:
    """Write the merged pipeline into ``out_dir`` (a fresh temporary folder the caller renames).

    Args:
        info: the original pipeline (read only): its folder's other components, its denoiser's weights
            from ``info.denoiser_dir`` (a converted single file's folder, or ``folder/<denoiser>``).
        deltas: module (relative to the denoiser) -> delta.
        out_dir: where to write.
        progress: one update per tensor group; cancel checked per shard.

    Raises:
        MergeError: an adapted module has no weight in the denoiser, a shape mismatch, or NaN/Inf.
    """
    src = info.denoiser_dir
    shards = denoiser_shards(src)
    _copy_tree(info.folder, out_dir, skip=info.denoiser)
    dst = out_dir / info.denoiser
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "config.json", dst / "config.json")
    if (src / WEIGHTS_INDEX).is_file():
        shutil.copy2(src / WEIGHTS_INDEX, dst / WEIGHTS_INDEX)
    wanted = {f"{m}.weight": m for m in deltas}
    seen: set[str] = set()
    for i, shard in enumerate(shards):
        progress.check_cancelled()
        entries, metadata = read_shard_index(shard)
        specs = [(e.name, SAFETENSORS_DTYPES[e.dtype], e.shape) for e in entries]
        with ShardWriter(dst / shard.name, specs, metadata or {"format": "pt"}) as writer:
            for name, tensor in iter_shard_tensors(shard):
                if name in wanted:
                    tensor = merge_weight(name, tensor, deltas[wanted[name]])
                    seen.add(name)
                writer.write(name, tensor)
        progress.update((i + 1) / len(shards), f"merged {shard.name}")
    missing = sorted(set(wanted) - seen)
    if missing:
        raise MergeError(
            f"The adapter changes modules that {src} does not have:",
            problems=missing[:20],
            hint="The adapter was trained for another model; export with the pipeline it was trained on.",
        )


def check_adapter_fits(denoiser_dir: Path, deltas: Mapping[str, LoraDelta]) -> None:
    """Refuse an adapter whose modules the denoiser lacks or whose shapes differ (read from the headers only).

    Raises:
        MergeError: listing every module that does not fit, before anything is loaded or written.
    """
    src = Path(denoiser_dir)
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in denoiser_shards(src):
        entries, _ = read_shard_index(shard)
        shapes.update({e.name: e.shape for e in entries})
    problems = []
    for module, d in deltas.items():
        shape = shapes.get(f"{module}.weight")
        if shape is None:
            problems.append(f"{module}: not in this denoiser")
        elif shape != (int(d.B.shape[0]), int(d.A.shape[1])):
            problems.append(
                f"{module}: weight {list(shape)}, adapter {int(d.B.shape[0])}×{int(d.A.shape[1])}"
            )
    if problems:
        raise MergeError(
            f"The adapter does not fit {src} (modules it does not have or of other shapes):",
            problems=problems[:20] + ([f"... {len(problems) - 20} more"] if len(problems) > 20 else []),
            hint="The adapter was trained for another model; export with the pipeline it was trained on.",
        )
