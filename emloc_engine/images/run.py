"""Every image stage end to end: cache → emulator → LoRA training → correction (resumable).

``run_images(ImageRunConfig(...), progress) -> ImageRunResult`` is what
``emloc image PIPELINE IMAGES --trigger WORD --out RUN`` calls. The run folder holds ``cache/``,
``emulator/``, ``image-checkpoints/``, ``samples/step-N/``, ``adapter/`` and
``adapter-corrected/`` (plus ``denoiser/`` for a single-file checkpoint, and ``image_run.json``,
the settings of the first call). Rerunning the same command resumes: a cache whose fingerprint
matches is reused, a complete emulator (``emloc.json`` written last) is reused, training continues
from its last checkpoint, and the correction runs again (seconds). A rerun whose settings would
change the emulator (ρ, calibration) is refused: use a new run folder.

Decisions where the issue is silent:

* held-out images for the λ choice: ``holdout_images`` (default -1: one in five when there are at
  least 5 images, else none and λ is chosen on the training images with fresh fixed noise);
  held-out images are the last ones by file name and are not trained on;
* sample prompts default to the first training caption; ``prompt`` defaults to
  ``"a photo of {trigger}"`` for images without a caption file;
* prior preservation is on when ``class_dir`` is given: its images (any caption files ignored) get
  ``class_prompt`` (default ``"a photo"``); this engine does not generate class images (draw them
  with the original pipeline and put them in a folder).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from emloc_engine.core.atomic import write_json_atomic
from emloc_engine.core.errors import ConfigError
from emloc_engine.core.progress import NULL_PROGRESS, Progress, sub
from emloc_engine.images.cache import CacheConfig, build_cache
from emloc_engine.images.correction import ImageCorrectionConfig, correct_image_adapter
from emloc_engine.images.dataset import CaptionMode, ImageFolderConfig, ImageItem, scan_image_folder
from emloc_engine.images.emulator import ImageEmulatorConfig, build_image_emulator
from emloc_engine.images.pipelines import PipelineInfo, convert_single_file, identify_pipeline
from emloc_engine.images.training import ImageTrainConfig, train_image_lora
from emloc_engine.weights.lowrank import EMULATOR_META, read_emulator_meta

RUN_SETTINGS = "image_run.json"


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


def resolve_pipeline(cfg: ImageRunConfig) -> PipelineInfo:
    """The pipeline of the run: a folder, or a single file converted once into ``RUN/denoiser``."""
    p = cfg.pipeline_dir
    if p.is_file() and cfg.config_dir is not None:
        return convert_single_file(p, cfg.config_dir, cfg.run_dir / "denoiser")
    return identify_pipeline(p)


def _check_settings(cfg: ImageRunConfig) -> None:
    """Refuse a rerun whose settings would change what the run folder already holds.

    The settings are recorded once the cache is written (a first call that stops at a data problem
    records nothing, so the user may fix the data and change any setting).
    """
    path = cfg.run_dir / RUN_SETTINGS
    current = {k: str(v) for k, v in asdict(cfg).items()}
    if not path.is_file():
        return
    first = json.loads(path.read_text(encoding="utf-8"))
    fixed = (
        "pipeline_dir",
        "ratio",
        "calibration_images",
        "calibration_timesteps",
        "resolution",
        "rank",
        "alpha",
    )
    changed = [f"{k}: {first.get(k)} -> {current[k]}" for k in fixed if first.get(k) != current[k]]
    if changed:
        raise ConfigError(
            f"The run folder {cfg.run_dir} was started with other settings; resuming would mix them.",
            problems=changed,
            hint="Use a new run folder (--out), or the first settings.",
        )


def run_images(cfg: ImageRunConfig, progress: Progress = NULL_PROGRESS) -> ImageRunResult:
    """Run (or resume) every image stage (module docstring).

    Raises:
        ConfigError, DataError, ModelNotFound, UnsupportedModel, MergeError: from the stages.
        Cancelled: between images, blocks or steps; a rerun resumes.
    """
    _check_settings(cfg)
    info = resolve_pipeline(cfg)
    prompt = cfg.prompt or (f"a photo of {cfg.trigger}" if cfg.trigger else "")
    report = scan_image_folder(
        ImageFolderConfig(cfg.images_dir, cfg.trigger, prompt, cfg.caption_mode, cfg.min_side_px)
    )
    report.raise_if_unusable()
    items = report.items
    holdout = cfg.holdout_images if cfg.holdout_images >= 0 else (len(items) // 5 if len(items) >= 5 else 0)
    if holdout >= len(items):
        raise ConfigError(
            f"Holding out {holdout} of {len(items)} images leaves none to train on.",
            hint="Hold out fewer images (--holdout-images).",
        )
    train, held = items[: len(items) - holdout], items[len(items) - holdout :]
    classes: tuple[ImageItem, ...] = ()
    if cfg.class_dir is not None:
        class_report = scan_image_folder(
            ImageFolderConfig(cfg.class_dir, "", cfg.class_prompt, "prompt", cfg.min_side_px)
        )
        class_report.raise_if_unusable()
        classes = class_report.items
    samples = cfg.sample_prompts or (train[0].caption,)
    cache = build_cache(
        CacheConfig(
            info,
            cfg.run_dir / "cache",
            train,
            held,
            classes,
            samples,
            cfg.resolution,
            cfg.max_sequence_length,
            cfg.device,
        ),
        sub(progress, 0.0, 0.1),
    )
    if not (cfg.run_dir / RUN_SETTINGS).is_file():
        write_json_atomic(cfg.run_dir / RUN_SETTINGS, {k: str(v) for k, v in asdict(cfg).items()})
    emulator_dir = cfg.run_dir / "emulator"
    if (emulator_dir / EMULATOR_META).is_file():
        if float(read_emulator_meta(emulator_dir)["ratio"]) != cfg.ratio:
            raise ConfigError(
                f"The emulator in {emulator_dir} was built at another ρ.", hint="Use a new run folder."
            )
    else:
        build_image_emulator(
            ImageEmulatorConfig(
                info,
                cache.cache_dir,
                emulator_dir,
                cfg.ratio,
                cfg.calibration_images,
                cfg.calibration_timesteps,
                seed=cfg.seed,
                device=cfg.device,
            ),
            sub(progress, 0.1, 0.3),
        )
    trained = train_image_lora(
        ImageTrainConfig(
            info,
            cache.cache_dir,
            emulator_dir,
            cfg.run_dir,
            steps=cfg.steps,
            lr=cfg.lr,
            rank=cfg.rank,
            alpha=cfg.alpha,
            batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            prior_loss_weight=cfg.prior_loss_weight,
            checkpoint_every=cfg.checkpoint_every,
            sample_every=cfg.sample_every,
            sample_steps=cfg.sample_steps,
            seed=cfg.seed,
            device=cfg.device,
            stop_after=cfg.stop_after,
        ),
        sub(progress, 0.3, 0.9),
    )
    corrected_dir = cfg.run_dir / "adapter-corrected"
    if trained.steps_done < cfg.steps:
        return ImageRunResult(
            cfg.run_dir,
            info.kind,
            trained.adapter_dir,
            corrected_dir,
            float("nan"),
            (),
            trained.losses,
            trained.samples,
            trained.steps_done,
            False,
        )
    corrected = correct_image_adapter(
        ImageCorrectionConfig(
            info,
            cache.cache_dir,
            emulator_dir,
            trained.adapter_dir,
            corrected_dir,
            lambda_=cfg.lam,
            seed=cfg.seed + 1234,
            device=cfg.device,
        ),
        sub(progress, 0.9, 1.0),
    )
    return ImageRunResult(
        cfg.run_dir,
        info.kind,
        trained.adapter_dir,
        corrected.adapter_dir,
        corrected.lambda_,
        corrected.lambda_table,
        trained.losses,
        trained.samples,
        trained.steps_done,
        True,
    )


__all__ = ["ImageRunConfig", "ImageRunResult", "resolve_pipeline", "run_images"]
