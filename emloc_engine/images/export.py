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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from emloc_engine.core.errors import ConfigError
from emloc_engine.core.progress import NULL_PROGRESS, Progress, sub

if TYPE_CHECKING:
    from emloc_engine.images.export_readback import Comparison

# torch and diffusers load inside export_image_lora (the writers live in export_writers.py), so the app
# can show this config without importing torch at start-up

IMAGE_EXPORT_FORMATS = ("diffusers", "kohya", "merged")


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
    denoiser_dir: Path | None = field(
        default=None,
        metadata={
            "help": "Where the denoiser is when not in the pipeline folder (RUN/denoiser, a converted single file)."
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

    device: str = field(
        default="auto",
        metadata={
            "help": "Where the read-back runs: auto (the GPU when the denoiser fits in its free memory, "
            "else the CPU), cpu, or cuda[:N]."
        },
    )

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be auto, cpu or cuda[:N] (got {self.device!r}).")
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
    import torch

    from emloc_engine.images.export_readback import load_stored_denoiser
    from emloc_engine.images.export_writers import reference, write_lora_file, write_merged
    from emloc_engine.images.lora_formats import kohya_state_dict
    from emloc_engine.images.merge_pipeline import check_adapter_fits
    from emloc_engine.images.pipelines import identify_pipeline, with_denoiser_dir
    from emloc_engine.stages.export.merge import read_lora_deltas

    info = identify_pipeline(cfg.pipeline_dir)
    if cfg.denoiser_dir is not None:
        info = with_denoiser_dir(info, cfg.denoiser_dir)
    _, deltas = read_lora_deltas(cfg.adapter_dir)
    check_adapter_fits(info.denoiser_dir, deltas)
    if "kohya" in cfg.formats:  # refuse a missing kohya naming before anything is loaded or written
        config = json.loads((info.denoiser_dir / "config.json").read_text(encoding="utf-8"))
        kohya_state_dict(info.kind, deltas, config)
    checks: list[Comparison] = []
    paths: dict[str, Path] = {}
    denoiser = load_stored_denoiser(info, device=cfg.device) if cfg.verify else None
    try:
        ref = reference(info, cfg.adapter_dir, denoiser) if denoiser is not None else None
        progress.update(0.1, "reference computed" if ref else "writing")
        files = [f for f in ("diffusers", "kohya") if f in cfg.formats]
        for i, fmt in enumerate(files):
            progress.check_cancelled()
            paths[fmt] = write_lora_file(cfg, info, fmt, deltas, denoiser, ref, checks)
            progress.update(0.1 + 0.3 * (i + 1) / len(files), f"{fmt} LoRA written and checked")
        denoiser = None  # the merged check loads its own denoiser: never two in memory
        gc.collect()
        if "merged" in cfg.formats:
            progress.check_cancelled()
            paths["merged"] = write_merged(cfg, info, deltas, ref, checks, sub(progress, 0.4, 1.0))
    finally:
        denoiser = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    progress.update(1.0, "export done")
    return ImageExportResult(
        Path(cfg.out_dir),
        info.kind,
        paths.get("diffusers"),
        paths.get("kohya"),
        paths.get("merged"),
        tuple(checks),
    )
