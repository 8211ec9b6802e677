"""An image run's settings and result: pure data (no torch, no diffusers), so the CLI and the app read them cheaply.

:class:`ImageRunConfig` is what ``emloc image`` takes (its options are generated from the fields) and
what the app's image Plan page builds; :class:`ImageRunResult` is what
:func:`~emloc_engine.images.run.run_images` returns. The stage modules (:mod:`.run`, :mod:`.planning`)
import torch and diffusers at the top; they re-export these and are imported only when a stage runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from emloc_engine.core.errors import ConfigError
from emloc_engine.images.dataset import CaptionMode

AnchorMode = Literal["none", "blocks"]
ANCHOR_MODES: tuple[str, ...] = get_args(AnchorMode)
"""Anchored training (:mod:`~emloc_engine.images.anchors`): ``none``, or ``blocks`` (every transformer block
of the emulator anchored to the original, online, per forward). Opt-in: why, and its measured GPU cost, in
:mod:`~emloc_engine.images.training`'s docstring."""

RUN_SETTINGS = "image_run.json"
"""The settings of a run's first call, in the run folder (marks an image run folder)."""
RESOLUTIONS = (512, 768, 1024)
"""The training resolutions the app and ``emloc plan`` offer."""
STATS_BUDGET_GIB = 4.0
"""Calibration statistics one emulator pass holds when no plan raised it (GiB; :mod:`.emulator`'s passes).
The image planner raises it up to what the run's heaviest stage leaves free: fewer passes, each of which
streams the original through the calibration forwards again (FLUX.1-dev in 24 GiB: 22 passes at 4 GiB, 4 at the plan's 19 GiB)."""


def check_anchor(value: str) -> list[str]:
    """The problem with an ``anchor`` setting (empty when it is one of :data:`ANCHOR_MODES`)."""
    if value in ANCHOR_MODES:
        return []
    return [f"anchor must be one of {', '.join(ANCHOR_MODES)} (got {value!r})"]


@dataclass(frozen=True)
class ImageRunConfig:
    """A whole image run; every field is also a CLI option of ``emloc image`` (generated from here)."""

    pipeline_dir: Path = field(
        metadata={
            "help": "Diffusers pipeline folder (FLUX.1, SD3, SDXL) or a single-file denoiser with --config-dir."
        }
    )
    images_dir: Path = field(
        metadata={"help": "Folder of the subject's images, captions as .txt beside them."}
    )
    run_dir: Path = field(metadata={"help": "The run folder (created; a rerun resumes)."})
    trigger: str = field(
        default="sks", metadata={"help": "The made-up word that names the subject; added to every caption."}
    )
    prompt: str = field(
        default="", metadata={"help": "Caption for images without a .txt (default 'a photo of TRIGGER')."}
    )
    caption_mode: CaptionMode = field(
        default="files-or-prompt", metadata={"help": "files, files-or-prompt or prompt."}
    )
    min_side_px: int = field(
        default=256, metadata={"help": "Images smaller than this on their short side are refused."}
    )
    holdout_images: int = field(
        default=-1, metadata={"help": "Images held out to choose λ (-1: one in five from 5 images on)."}
    )
    class_dir: Path | None = field(
        default=None, metadata={"help": "Class images for prior preservation (optional)."}
    )
    class_prompt: str = field(default="a photo", metadata={"help": "Caption of every class image."})
    sample_prompts: tuple[str, ...] = field(
        default=(), metadata={"help": "Prompts drawn every sample_every steps (default: the first caption)."}
    )
    config_dir: Path | None = field(
        default=None,
        metadata={
            "help": "Pipeline folder giving the configs, text encoders and VAE of a single-file checkpoint."
        },
    )
    resolution: int = field(
        default=1024, metadata={"help": "Training resolution in pixels (buckets keep about this² pixels)."}
    )
    max_sequence_length: int = field(default=512, metadata={"help": "T5 tokens per caption (FLUX, SD3)."})
    ratio: float = field(default=0.5, metadata={"help": "Keep-ratio ρ of the denoiser's compressed linears."})
    calibration_images: int = field(default=8, metadata={"help": "Images used to calibrate the emulator."})
    calibration_timesteps: int = field(default=4, metadata={"help": "Noise levels per calibration image."})
    stats_budget_gib: float | None = field(default=None, metadata={
        "help": "Calibration statistics held per emulator pass, GiB (default: what the plan leaves free "
                "under the run's peak, at least 4; 4 when ρ is given)."})
    steps: int = field(default=500, metadata={"help": "Training steps."})
    lr: float = field(default=1e-4, metadata={"help": "Learning rate."})
    rank: int = field(default=16, metadata={"help": "LoRA rank."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    batch_size: int = field(default=1, metadata={"help": "Images per step (from one aspect bucket)."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    prior_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the class images' loss."})
    checkpoint_every: int = field(default=100, metadata={"help": "Resumable checkpoint every N steps."})
    sample_every: int = field(default=100, metadata={"help": "Sample images every N steps (0: never)."})
    sample_steps: int = field(default=28, metadata={"help": "Denoising steps per sample image."})
    anchor: AnchorMode = field(
        default="none",
        metadata={
            "help": "Anchored training: none, or blocks (every transformer block of the emulator anchored to "
            "the original on each step; costs one no-grad forward of the original per step)."
        },
    )
    lam: float | None = field(
        default=None, metadata={"help": "Correction λ (default: chosen on held-out images)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of everything random."})
    device: str = field(default="auto", metadata={"help": "cuda, cuda:N, cpu or auto."})
    stop_after: int | None = field(
        default=None, metadata={"help": "Stop training (resumably) after this many steps of this call."}
    )

    def __post_init__(self) -> None:
        for k in ("pipeline_dir", "images_dir", "run_dir"):
            object.__setattr__(self, k, Path(getattr(self, k)))
        if self.holdout_images < -1:
            raise ConfigError(f"holdout_images must be -1 (auto) or more (got {self.holdout_images}).")
        problems = check_anchor(self.anchor)
        if self.stats_budget_gib is not None and not self.stats_budget_gib > 0:
            problems.append(f"stats_budget_gib must be positive (got {self.stats_budget_gib})")
        if problems:
            raise ConfigError("Invalid image run settings.", problems=problems)


@dataclass(frozen=True)
class ImageRunResult:
    run_dir: Path
    kind: str
    adapter_dir: Path
    corrected_dir: Path
    lam: float
    lambda_table: tuple[tuple[float, float], ...]
    losses: tuple[float, ...]
    samples: tuple[Path, ...]
    steps_done: int
    finished: bool


def run_default(name: str) -> Any:
    """:class:`ImageRunConfig`'s default of field ``name`` (the image planner and ``emloc plan`` take theirs from here)."""
    return ImageRunConfig.__dataclass_fields__[name].default


__all__ = [
    "ANCHOR_MODES",
    "RESOLUTIONS",
    "RUN_SETTINGS",
    "STATS_BUDGET_GIB",
    "AnchorMode",
    "ImageRunConfig",
    "ImageRunResult",
    "check_anchor",
    "run_default",
]

