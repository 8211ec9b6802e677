"""Stage 3 for image models: move the adapter trained on the emulator onto the original denoiser.

The maths is the text engine's (:mod:`emloc_engine.stages.correction.corrector`, ``METHOD.md``
Stage 3): per module, :func:`prepare_module` in fp64 from the original weight ``W`` (the pipeline's
denoiser shards) and the emulator's factors ``u``, ``v``, then :func:`apply_lambda` per λ. λ = 0 is
the trained adapter unchanged, λ = ∞ the exact identity ``x (W + Λᶜ)ᵀ = x (u v + Λ)ᵀ`` on the
adapter's input directions.

λ is chosen (``lambda_=None``, the default) by the denoising loss of the ORIGINAL denoiser + each
candidate adapter on held-out images (:func:`~.batches.calibration_batches` of the cache's
``eval`` split: fixed images, noise levels and noise seeds, so every λ sees the same numbers); the
lowest loss wins, ties go to the smaller λ (:func:`choose_lambda`). A DreamBooth set is a handful
of photos; when no image was held out the training images are used (with fresh fixed noise), which
the result and ``emloc_correction.json`` record as ``eval_split: "train"``.

Output ``RUN/adapter-corrected/`` (temporary name, then renamed): the trained adapter's
``adapter_config.json`` with ``base_model_name_or_path`` = the pipeline folder, the corrected
``adapter_model.safetensors`` (same keys, dtypes and shapes), and ``emloc_correction.json``. A
corrected adapter is never corrected again; the trained one is never touched.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emloc_engine.core.atomic import atomic_dir
from emloc_engine.core.errors import ConfigError, MergeError, RunStateError, UnsupportedModel
from emloc_engine.core.progress import NULL_PROGRESS, Progress
from emloc_engine.images.batches import batches_loss, calibration_batches
from emloc_engine.images.cache import ImageCache
from emloc_engine.images.families import NoiseSchedule
from emloc_engine.images.pipelines import PipelineInfo, load_denoiser, scheduler_config
from emloc_engine.images.placement import streamed
from emloc_engine.machine import devices
from emloc_engine.machine.process_memory import gpu_peak_gib, reset_gpu_peak
from emloc_engine.stages.correction.corrector import (
    ModuleCorrection,
    PreparedModule,
    apply_lambda,
    choose_lambda,
    prepare_module,
)
from emloc_engine.weights.adapters import (
    CORRECTION_META,
    fingerprint_adapter,
    is_corrected,
    read_adapter,
    write_adapter,
)
from emloc_engine.weights.checkpoint import Checkpoint
from emloc_engine.weights.lowrank import read_emulator_meta

LAMBDAS = (0.0, 1.0, 3.0, math.inf)


@dataclass(frozen=True)
class ImageCorrectionConfig:
    pipeline: PipelineInfo = field(
        metadata={"help": "The identified pipeline (its denoiser is the original)."}
    )
    cache_dir: Path = field(metadata={"help": "The encoded images (RUN/cache): held-out images choose λ."})
    emulator_dir: Path = field(metadata={"help": "The emulator the adapter was trained on (RUN/emulator)."})
    adapter_dir: Path = field(metadata={"help": "The trained adapter (RUN/adapter)."})
    out_dir: Path = field(metadata={"help": "Where the corrected adapter goes (RUN/adapter-corrected)."})
    lambda_: float | None = field(
        default=None, metadata={"help": "Correction λ (None: chosen on held-out images)."}
    )
    lambda_grid: tuple[float, ...] = field(
        default=LAMBDAS, metadata={"help": "Candidate λ values when choosing."}
    )
    eval_images: int = field(default=8, metadata={"help": "Held-out images used to choose λ."})
    eval_timesteps: int = field(default=4, metadata={"help": "Noise levels per held-out image."})
    eval_batch: int = field(default=4, metadata={"help": "Images × noise levels per forward."})
    seed: int = field(default=1234, metadata={"help": "Seed of the held-out noise."})
    device: str = field(default="auto", metadata={"help": "cuda, cuda:N, cpu or auto."})
    compute_dtype: str = field(
        default="auto", metadata={"help": "dtype of the original denoiser's forwards."}
    )
    overwrite: bool = field(default=True, metadata={"help": "Replace an existing corrected adapter."})

    def __post_init__(self) -> None:
        if self.lambda_ is not None and not self.lambda_ >= 0:
            raise ConfigError(f"λ must be 0 or more (got {self.lambda_}).")
        if not self.lambda_grid or any(not x >= 0 for x in self.lambda_grid):
            raise ConfigError("The λ grid must hold values ≥ 0.")


@dataclass(frozen=True)
class ImageCorrectionResult:
    adapter_dir: Path
    lambda_: float
    lambda_table: tuple[tuple[float, float], ...]
    eval_split: str
    modules: int
    wall_s: float
    peak_vram_gib: float


def prepare_image_adapter(
    info: PipelineInfo, emulator_dir: Path, adapter_dir: Path, device: torch.device
) -> dict[str, PreparedModule]:
    """Every LoRA module's λ-independent correction (fp64), reading ``W`` and ``u``, ``v`` one module at a time.

    Raises:
        UnsupportedModel: the adapter names a module the denoiser lacks, or shapes disagree.
        MergeError: a correction is not finite (names the module).
    """
    adapter = read_adapter(adapter_dir)
    compressed = read_emulator_meta(emulator_dir)["modules"]
    src, emu = Checkpoint(info.denoiser_dir), Checkpoint(emulator_dir)
    prepared: dict[str, PreparedModule] = {}
    try:
        missing = [n for n in adapter.modules if f"{n}.weight" not in src]
        if missing:
            raise UnsupportedModel(
                "The adapter names modules the denoiser does not have.",
                problems=missing[:10],
                hint="Correct with the pipeline the adapter was trained for.",
            )
        linalg = devices.linalg_device(device)
        for name, mod in adapter.modules.items():
            w_e = (emu.get(f"{name}.u.weight"), emu.get(f"{name}.v.weight")) if name in compressed else None
            prep = prepare_module(
                src.get(f"{name}.weight"),
                w_e,
                adapter.A(name),
                adapter.B(name),
                mod.scale,
                device=linalg,
                out_dtype=torch.float64,
            )
            if prep.gap is not None and not bool(torch.isfinite(prep.gap).all()):
                raise MergeError(f"The correction of {name} is not finite (NaN or Inf).")
            prepared[name] = prep
    finally:
        src.close()
        emu.close()
    return prepared


def correct_image_adapter(
    cfg: ImageCorrectionConfig, progress: Progress = NULL_PROGRESS
) -> ImageCorrectionResult:
    """Correct the trained adapter for the emulator/original gap (module docstring).

    Raises:
        RunStateError: the adapter is already corrected, or the output is the adapter itself.
        UnsupportedModel, MergeError, ModelNotFound: from reading and preparing.
        Cancelled: between λ candidates.
    """
    t0 = time.monotonic()
    if is_corrected(cfg.adapter_dir):
        raise RunStateError(
            f"The adapter {cfg.adapter_dir} is already corrected ({CORRECTION_META} is there).",
            hint="Correct the trained adapter (RUN/adapter), never a corrected one.",
        )
    if Path(cfg.out_dir).resolve() == Path(cfg.adapter_dir).resolve():
        raise RunStateError("The corrected adapter must go to its own folder, not over the trained one.")
    device = devices.resolve_device(cfg.device)
    reset_gpu_peak(device)
    prepared = prepare_image_adapter(cfg.pipeline, cfg.emulator_dir, cfg.adapter_dir, device)
    progress.update(0.2, f"prepared {len(prepared)} modules")
    table: tuple[tuple[float, float], ...] = ()
    split = ""
    if cfg.lambda_ is not None:
        lam = float(cfg.lambda_)
    else:
        table, split = _lambda_table(cfg, prepared, device, progress)
        lam = choose_lambda(table)
    chosen = {n: apply_lambda(p, lam) for n, p in prepared.items()}
    _write(cfg, chosen, lam, table, split)
    peak = gpu_peak_gib(device)
    progress.update(1.0, f"corrected adapter written (λ={lam:g})")
    return ImageCorrectionResult(
        Path(cfg.out_dir), lam, table, split, len(chosen), time.monotonic() - t0, peak
    )


def _lambda_table(
    cfg: ImageCorrectionConfig, prepared: dict[str, PreparedModule], device: torch.device, progress: Progress
) -> tuple[tuple[tuple[float, float], ...], str]:
    from peft import PeftModel

    info = cfg.pipeline
    dtype = devices.compute_dtype(device, cfg.compute_dtype)
    cache = ImageCache(cfg.cache_dir)
    split = "eval" if cache.indices("eval") else "train"
    schedule = NoiseSchedule(info.kind, scheduler_config(info))
    batches = calibration_batches(
        cache, schedule, cfg.eval_images, cfg.eval_timesteps, cfg.eval_batch, cfg.seed, split
    )
    model = PeftModel.from_pretrained(
        load_denoiser(info, dtype=dtype), str(cfg.adapter_dir), is_trainable=False
    ).eval()
    layers = {
        n.removeprefix("base_model.model."): m
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})
    }
    grid = sorted(set(float(x) for x in cfg.lambda_grid))
    table = []
    with streamed(model.get_base_model(), device) as live:
        for i, lam in enumerate(grid):
            progress.check_cancelled()
            with torch.no_grad():
                for n, c in ((n, apply_lambda(p, lam)) for n, p in prepared.items()):
                    layers[n].lora_A["default"].weight.copy_(c.lora_A)
                    layers[n].lora_B["default"].weight.copy_(c.lora_B)
            loss = batches_loss(info.kind, live, schedule, batches, device, dtype)
            table.append((lam, loss))
            progress.log("correct/eval_loss", loss, i)
            progress.update(
                0.2 + 0.75 * (i + 1) / len(grid), f"λ={lam:g}: held-out denoising loss {loss:.5f}"
            )
    return tuple(table), split


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else "inf"


def _write(
    cfg: ImageCorrectionConfig,
    chosen: dict[str, ModuleCorrection],
    lam: float,
    table: tuple[tuple[float, float], ...],
    split: str,
) -> None:
    adapter = read_adapter(cfg.adapter_dir)
    tensors = dict(adapter.tensors)
    for name, c in chosen.items():
        mod = adapter.modules[name]
        tensors[mod.a_key] = c.lora_A.to(adapter.tensors[mod.a_key].dtype).contiguous()
        tensors[mod.b_key] = c.lora_B.to(adapter.tensors[mod.b_key].dtype).contiguous()
    config: dict[str, Any] = dict(adapter.config, base_model_name_or_path=str(cfg.pipeline.folder.resolve()))
    meta = {
        "format": "emloc-correction",
        "format_version": 1,
        "kind": "image-denoiser",
        "family": cfg.pipeline.kind,
        "lambda": _json_float(lam),
        "lambda_mode": "fixed" if cfg.lambda_ is not None else "auto",
        "lambda_table": [{"lambda": _json_float(a), "eval_loss": b} for a, b in table],
        "eval_split": split,
        "source_adapter": {"path": str(cfg.adapter_dir), "fingerprint": fingerprint_adapter(cfg.adapter_dir)},
        "pipeline": str(cfg.pipeline.folder),
        "emulator": str(cfg.emulator_dir),
        "modules": {
            n: {"relative_size": _json_float(c.relative_size), "damped": sum(c.damped)}
            for n, c in chosen.items()
        },
    }
    with atomic_dir(Path(cfg.out_dir), overwrite=cfg.overwrite) as tmp:
        write_adapter(tmp, config, tensors, copy_from=cfg.adapter_dir)
        (tmp / CORRECTION_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


__all__ = [
    "LAMBDAS",
    "ImageCorrectionConfig",
    "ImageCorrectionResult",
    "correct_image_adapter",
    "prepare_image_adapter",
]
