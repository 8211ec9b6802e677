"""The torch side of :mod:`emloc_engine.images.export`: write one output into a temporary folder and read it back.

Every writer works inside :func:`~emloc_engine.core.atomic.atomic_dir`, so the check runs on the
temporary folder and a failed check leaves nothing under the final name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from emloc_engine.core.atomic import atomic_dir
from emloc_engine.core.errors import MergeError
from emloc_engine.core.progress import Progress, sub
from emloc_engine.core.version import __version__
from emloc_engine.images.export_readback import (
    Comparison,
    compare,
    denoise,
    load_stored_denoiser,
    lora_file_applied,
    peft_applied,
    probe_inputs,
    tolerance_for,
)
from emloc_engine.images.lora_formats import diffusers_state_dict, kohya_metadata, kohya_state_dict
from emloc_engine.images.merge_pipeline import write_merged_pipeline
from emloc_engine.images.pipelines import PipelineInfo
from emloc_engine.stages.export.merge import LoraDelta

if TYPE_CHECKING:
    from emloc_engine.images.export import ImageExportConfig

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""The file name ``load_lora_weights(folder)`` looks for by default."""


@dataclass
class Reference:
    """The probe input and the two outputs every export is compared with."""

    inputs: dict[str, object]
    base: torch.Tensor
    ref: torch.Tensor
    tolerance: float


def reference(info: PipelineInfo, adapter_dir: Path, denoiser: object) -> Reference:
    inputs = probe_inputs(info.kind, denoiser)
    base = denoise(denoiser, inputs)
    with peft_applied(denoiser, adapter_dir) as applied:
        ref = denoise(applied, inputs)
    return Reference(inputs, base, ref, tolerance_for(denoiser))


def _check(c: Comparison, where: Path) -> Comparison:
    if c.adapter_effect <= 0:
        raise MergeError(
            f"The adapter does not change the denoiser's output (all LoRA B are zero?); {c.what} "
            "cannot be checked.",
            hint="Export an adapter that was trained (RUN/adapter-corrected).",
        )
    if not c.ok:
        raise MergeError(
            f"The {c.what} read back from {where} differs from the original + adapter: max |diff| "
            f"{c.max_abs_diff:.3g} (allowed: {c.tolerance:g} × {c.ref_max_abs:.3g}"
            + (
                f" and {c.effect_fraction:g} × the adapter's effect {c.adapter_effect:.3g}"
                if c.effect_fraction
                else ""
            )
            + "). Nothing was written.",
            hint="This is a bug in the export; use the peft adapter folder meanwhile.",
        )
    return c


def write_lora_file(
    cfg: ImageExportConfig,
    info: PipelineInfo,
    fmt: str,
    deltas: dict[str, LoraDelta],
    denoiser: object | None,
    ref: Reference | None,
    checks: list[Comparison],
) -> Path:
    import diffusers
    from safetensors.torch import save_file

    final = Path(cfg.out_dir) / fmt
    name = DIFFUSERS_WEIGHT_NAME if fmt == "diffusers" else f"{cfg.file_stem}.safetensors"
    with atomic_dir(final, overwrite=True) as tmp:
        if fmt == "diffusers":
            cls = getattr(diffusers, info.pipeline_class)
            layers = {f"{info.denoiser}_lora_layers": diffusers_state_dict(deltas)}
            cls.save_lora_weights(str(tmp), weight_name=name, **layers)
        else:
            config = json.loads((info.denoiser_dir / "config.json").read_text(encoding="utf-8"))
            state = kohya_state_dict(info.kind, deltas, config)
            save_file(state, str(tmp / name), metadata=kohya_metadata(info.kind, state, __version__))
        if denoiser is not None and ref is not None:
            with lora_file_applied(info, denoiser, tmp / name) as loaded:
                out = denoise(loaded, ref.inputs)
            checks.append(
                _check(compare(f"{fmt} LoRA file", out, ref.ref, ref.base, ref.tolerance), final / name)
            )
    return final / name


def write_merged(
    cfg: ImageExportConfig,
    info: PipelineInfo,
    deltas: dict[str, LoraDelta],
    ref: Reference | None,
    checks: list[Comparison],
    progress: Progress,
) -> Path:
    final = Path(cfg.out_dir) / "merged"
    with atomic_dir(final, overwrite=True) as tmp:
        write_merged_pipeline(info, deltas, tmp, sub(progress, 0.0, 0.7))
        if ref is not None:
            merged = load_stored_denoiser(info, tmp / info.denoiser, cfg.device)
            exact = next(merged.parameters()).dtype == torch.float32  # see the pass rule in export_readback
            out = denoise(merged, ref.inputs)
            del merged
            c = compare(
                "merged pipeline's denoiser", out, ref.ref, ref.base, ref.tolerance, 0.1 if exact else None
            )
            checks.append(_check(c, final))
    return final
