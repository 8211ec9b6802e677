"""Export an image run's LoRA: a diffusers file, a kohya-named file, a merged pipeline; each read back.

``export_image_lora(ImageExportConfig(pipeline_dir, adapter_dir, out_dir), progress)`` writes, for the
formats asked:

- ``OUT/diffusers/pytorch_lora_weights.safetensors``: written by the pipeline class's own
  ``save_lora_weights`` (``transformer_lora_layers=`` / ``unet_lora_layers=``); loads with
  ``pipe.load_lora_weights("OUT/diffusers")`` and in ComfyUI/Forge.
- ``OUT/kohya/<name>.safetensors``: kohya naming (SDXL: sgm ``lora_unet_…``; FLUX.1: sd-scripts
  ``lora_unet_double_blocks_…``), for A1111/Forge/ComfyUI/kohya; not for SD3 (see
  :mod:`emloc_engine.images.lora_formats`).
- ``OUT/merged/``: a pipeline folder whose denoiser has the LoRA merged in (fp32 maths, NaN/Inf
  refused before writing); other components hard-linked or copied from the original, never written.

Each output is written into a temporary folder, **read back** there (:mod:`.export_readback`: the
original denoiser + the file loaded by diffusers, or the merged denoiser, must reproduce the
original denoiser + the peft adapter on a probe input) and only then renamed into place; a failed
check raises :class:`MergeError` and leaves nothing under the final name. ``verify=False`` skips
the read-back (for very large models on a small machine).

Both LoRA files carry the adapter's scale folded into the up/B weights (alpha = rank), so every
tool applies it at strength 1.0 as trained.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from emloc_engine.core.atomic import atomic_dir
from emloc_engine.core.errors import ConfigError, MergeError
from emloc_engine.core.progress import NULL_PROGRESS, Progress, sub
from emloc_engine.core.version import __version__
from emloc_engine.images.export_readback import (
    Comparison,
    PipelineFacts,
    compare,
    denoise,
    load_denoiser,
    lora_file_applied,
    peft_applied,
    pipeline_facts,
    probe_inputs,
    tolerance_for,
)
from emloc_engine.images.lora_formats import diffusers_state_dict, kohya_metadata, kohya_state_dict
from emloc_engine.images.merge_pipeline import check_adapter_fits, write_merged_pipeline
from emloc_engine.stages.export.merge import LoraDelta, read_lora_deltas

IMAGE_EXPORT_FORMATS = ("diffusers", "kohya", "merged")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class ImageExportConfig:
    pipeline_dir: Path = field(
        metadata={"help": "The original diffusers pipeline folder the adapter was trained for."}
    )
    adapter_dir: Path = field(
        metadata={"help": "peft adapter folder of the denoiser (RUN/adapter-corrected)."}
    )
    out_dir: Path = field(
        metadata={"help": "Folder the exports go into (RUN/export); one sub-folder per format."}
    )
    formats: tuple[str, ...] = field(
        default=("diffusers", "kohya"),
        metadata={
            "help": "What to write: diffusers (LoRA file for diffusers/ComfyUI), kohya (LoRA file in "
            "kohya naming for A1111/Forge/ComfyUI), merged (a whole pipeline folder)."
        },
    )
    name: str = field(
        default="", metadata={"help": "File name of the kohya LoRA (default: the run folder's name)."}
    )
    verify: bool = field(
        default=True,
        metadata={
            "help": "Load every output back and compare the denoiser's output "
            "with the original + adapter (needs the denoiser in memory)."
        },
    )

    def __post_init__(self) -> None:
        bad = [f for f in self.formats if f not in IMAGE_EXPORT_FORMATS]
        if bad or not self.formats:
            raise ConfigError(
                f"Unknown export format(s) {', '.join(bad) or '(none given)'}; choose from "
                f"{', '.join(IMAGE_EXPORT_FORMATS)}."
            )

    @property
    def file_stem(self) -> str:
        stem = self.name or Path(self.out_dir).resolve().parent.name or "emloc_lora"
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)


@dataclass(frozen=True)
class ImageExportResult:
    out_dir: Path
    family: str
    diffusers_file: Path | None
    kohya_file: Path | None
    merged_dir: Path | None
    checks: tuple[Comparison, ...]


@dataclass
class _Reference:
    """The probe input and the two outputs every export is compared with."""

    inputs: dict[str, object]
    base: torch.Tensor
    ref: torch.Tensor
    tolerance: float


def _reference(facts: PipelineFacts, adapter_dir: Path, denoiser: object) -> _Reference:
    inputs = probe_inputs(facts.family, denoiser)
    base = denoise(denoiser, inputs)
    with peft_applied(denoiser, adapter_dir) as applied:
        ref = denoise(applied, inputs)
    return _Reference(inputs, base, ref, tolerance_for(denoiser))


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
            f"{c.max_abs_diff:.3g} > {c.tolerance:g} × {c.ref_max_abs:.3g} (the adapter moves the output "
            f"by {c.adapter_effect:.3g}). Nothing was written.",
            hint="This is a bug in the export; use the peft adapter folder meanwhile.",
        )
    return c


def _write_lora_file(
    cfg: ImageExportConfig,
    facts: PipelineFacts,
    fmt: str,
    deltas: dict[str, LoraDelta],
    denoiser: object | None,
    ref: _Reference | None,
    checks: list[Comparison],
) -> Path:
    import diffusers
    from safetensors.torch import save_file

    final = Path(cfg.out_dir) / fmt
    name = DIFFUSERS_WEIGHT_NAME if fmt == "diffusers" else f"{cfg.file_stem}.safetensors"
    with atomic_dir(final, overwrite=True) as tmp:
        if fmt == "diffusers":
            cls = getattr(diffusers, facts.pipeline_class)
            layers = {f"{facts.denoiser}_lora_layers": diffusers_state_dict(deltas)}
            cls.save_lora_weights(str(tmp), weight_name=name, **layers)
        else:
            config = json.loads((facts.folder / facts.denoiser / "config.json").read_text(encoding="utf-8"))
            state = kohya_state_dict(facts.family, deltas, config)
            save_file(state, str(tmp / name), metadata=kohya_metadata(facts.family, state, __version__))
        if denoiser is not None and ref is not None:
            with lora_file_applied(facts, denoiser, tmp / name) as loaded:
                out = denoise(loaded, ref.inputs)
            checks.append(
                _check(compare(f"{fmt} LoRA file", out, ref.ref, ref.base, ref.tolerance), final / name)
            )
    return final / name


def _write_merged(
    cfg: ImageExportConfig,
    facts: PipelineFacts,
    deltas: dict[str, LoraDelta],
    ref: _Reference | None,
    checks: list[Comparison],
    progress: Progress,
) -> Path:
    final = Path(cfg.out_dir) / "merged"
    with atomic_dir(final, overwrite=True) as tmp:
        write_merged_pipeline(facts.folder, facts.denoiser, deltas, tmp, sub(progress, 0.0, 0.7))
        if ref is not None:
            merged = load_denoiser(tmp, facts)
            out = denoise(merged, ref.inputs)
            del merged
            checks.append(
                _check(compare("merged pipeline's denoiser", out, ref.ref, ref.base, ref.tolerance), final)
            )
    return final


def export_image_lora(cfg: ImageExportConfig, progress: Progress = NULL_PROGRESS) -> ImageExportResult:
    """Write the asked formats of an image LoRA, each read back before it is renamed into place.

    Args:
        cfg: pipeline, adapter, output folder and formats.
        progress: fraction per output; cancel checked between outputs (and per shard while merging).

    Returns:
        The paths written and every read-back comparison.

    Raises:
        ModelNotFound, UnsupportedModel: the pipeline or adapter folder is unusable.
        MergeError: an adapted module the model lacks, NaN/Inf, no kohya naming (:class:`UnsupportedKohya`),
            or a read-back that does not reproduce the reference.
    """
    facts = pipeline_facts(cfg.pipeline_dir)
    _, deltas = read_lora_deltas(cfg.adapter_dir)
    check_adapter_fits(facts.folder, facts.denoiser, deltas)
    checks: list[Comparison] = []
    paths: dict[str, Path] = {}
    denoiser = load_denoiser(facts.folder, facts) if cfg.verify else None
    try:
        ref = _reference(facts, cfg.adapter_dir, denoiser) if denoiser is not None else None
        progress.update(0.1, "reference computed" if ref else "writing")
        files = [f for f in ("diffusers", "kohya") if f in cfg.formats]
        for i, fmt in enumerate(files):
            progress.check_cancelled()
            paths[fmt] = _write_lora_file(cfg, facts, fmt, deltas, denoiser, ref, checks)
            progress.update(0.1 + 0.3 * (i + 1) / len(files), f"{fmt} LoRA written and checked")
        denoiser = None  # the merged check loads its own denoiser: never two in memory
        gc.collect()
        if "merged" in cfg.formats:
            progress.check_cancelled()
            paths["merged"] = _write_merged(cfg, facts, deltas, ref, checks, sub(progress, 0.4, 1.0))
    finally:
        denoiser = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    progress.update(1.0, "export done")
    return ImageExportResult(
        Path(cfg.out_dir),
        facts.family,
        paths.get("diffusers"),
        paths.get("kohya"),
        paths.get("merged"),
        tuple(checks),
    )
