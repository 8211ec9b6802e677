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
from dataclasses import asdict

from emloc_engine.core.atomic import write_json_atomic
from emloc_engine.core.errors import ConfigError
from emloc_engine.core.progress import NULL_PROGRESS, Progress, sub
from emloc_engine.images.cache import CacheConfig, build_cache
from emloc_engine.images.correction import ImageCorrectionConfig, correct_image_adapter
from emloc_engine.images.dataset import ImageFolderConfig, ImageItem, scan_image_folder
from emloc_engine.images.emulator import ImageEmulatorConfig, build_image_emulator
from emloc_engine.images.options import RUN_SETTINGS, STATS_BUDGET_GIB, ImageRunConfig, ImageRunResult
from emloc_engine.images.pipeline_index import check_config_dir
from emloc_engine.images.pipelines import PipelineInfo, convert_single_file, identify_pipeline
from emloc_engine.images.training import ImageTrainConfig, train_image_lora
from emloc_engine.run.lock import run_folder_lock
from emloc_engine.weights.lowrank import EMULATOR_META, read_emulator_meta


def resolve_pipeline(cfg: ImageRunConfig) -> PipelineInfo:
    """The pipeline of the run: a folder, or a single file converted once into ``RUN/denoiser``."""
    p = cfg.pipeline_dir
    if p.is_file() and cfg.config_dir is not None:
        check_config_dir(p, cfg.config_dir)  # a clear message before diffusers tries to map the file
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
        "config_dir",  # a single file's text encoders and VAE encoded the cache
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
        RunStateError: another process (or run) is writing this run folder.
    """
    with run_folder_lock(cfg.run_dir):
        return _run_images(cfg, progress)


def _run_images(cfg: ImageRunConfig, progress: Progress) -> ImageRunResult:
    """:func:`run_images` with the run folder's lock held (the Runs page cannot delete it meanwhile)."""
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
                stats_budget_gib=cfg.stats_budget_gib or STATS_BUDGET_GIB,
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
            anchor=cfg.anchor,
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


__all__ = ["RUN_SETTINGS", "ImageRunConfig", "ImageRunResult", "resolve_pipeline", "run_images"]
