"""Every VLM stage end to end: emulator → LoRA training → correction → merged folder (resumable).

``run_vlm(VlmRunConfig(...), progress)`` is what ``emloc vlm MODEL DATA --out RUN`` calls. The run
folder holds ``emulator/``, ``vlm-checkpoints/``, ``adapter/``, ``adapter-corrected/`` and
``merged/``. Rerunning the same command resumes: a complete emulator (its ``emloc.json`` written
last) is reused, training continues from its last checkpoint, correction and merge run again
(seconds to minutes). Decision: the VLM stages have their own command until the run orchestrator
(``emloc run``) learns image data; ρ defaults to 0.5 (the paper's 50 % budget) unless given, and
the planner's VLM accounting (:mod:`emloc_engine.run.vision_planning`) says what fits
(``emloc plan MODEL``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from emloc_engine.core.errors import ConfigError
from emloc_engine.core.progress import NULL_PROGRESS, Progress, sub
from emloc_engine.data.config import DataConfig
from emloc_engine.data.vision_pipeline import prepare_vision_dataset
from emloc_engine.vision.emulator import VlmEmulatorConfig, build_vlm_emulator, calibration_inputs
from emloc_engine.vision.finetune import VlmTrainConfig, correct_vlm_adapter, merge_vlm, train_vlm_lora
from emloc_engine.vision.processor import load_processor
from emloc_engine.weights.lowrank import EMULATOR_META


@dataclass(frozen=True)
class VlmRunConfig:
    """A whole VLM run."""

    model_dir: Path = field(metadata={"help": "The VLM's folder."})
    data: DataConfig = field(metadata={"help": "The image dataset."})
    run_dir: Path = field(metadata={"help": "The run folder (created; a rerun resumes)."})
    ratio: float = field(
        default=0.5, metadata={"help": "Keep-ratio ρ of the language model's block linears."}
    )
    vision_ratio: float | None = field(
        default=None, metadata={"help": "Keep-ratio of the vision tower (default ρ)."}
    )
    calibration_samples: int = field(default=64, metadata={"help": "Calibration samples for the emulator."})
    steps: int = field(default=100, metadata={"help": "Training steps."})
    lr: float = field(default=2e-4, metadata={"help": "Peak learning rate."})
    rank: int = field(default=16, metadata={"help": "LoRA rank."})
    lam: float | None = field(
        default=None, metadata={"help": "Correction λ (None: chosen on held-out data)."}
    )
    device: str = field(default="auto", metadata={"help": "cuda, cuda:N, cpu or auto."})

    def __post_init__(self) -> None:
        if self.calibration_samples < 1:
            raise ConfigError(f"calibration_samples must be at least 1 (got {self.calibration_samples}).")


@dataclass(frozen=True)
class VlmRunResult:
    run_dir: Path
    merged_dir: Path
    adapter_dir: Path
    lam: float
    losses: tuple[float, ...]
    eval_loss: float | None


def run_vlm(cfg: VlmRunConfig, progress: Progress = NULL_PROGRESS) -> VlmRunResult:
    """Run (or resume) every VLM stage.

    Raises:
        ConfigError, DataError, ModelNotFound, UnsupportedModel, MergeError: from the stages.
        Cancelled: between blocks / steps; a rerun resumes.
    """
    processor = load_processor(cfg.model_dir)
    emulator_dir = cfg.run_dir / "emulator"
    if not (emulator_dir / EMULATOR_META).is_file():
        prepared = prepare_vision_dataset(cfg.data, processor)  # every image checked before weights load
        build_vlm_emulator(
            VlmEmulatorConfig(
                cfg.model_dir,
                emulator_dir,
                calibration_inputs(prepared.train, processor, cfg.calibration_samples),
                ratio=cfg.ratio,
                vision_ratio=cfg.vision_ratio,
                device=cfg.device,
            ),
            sub(progress, 0.0, 0.3),
        )
    trained = train_vlm_lora(
        VlmTrainConfig(
            cfg.model_dir,
            emulator_dir,
            cfg.data,
            cfg.run_dir,
            steps=cfg.steps,
            lr=cfg.lr,
            rank=cfg.rank,
            alpha=2.0 * cfg.rank,
            device=cfg.device,
            checkpoint_every=max(1, cfg.steps // 4),
        ),
        sub(progress, 0.3, 0.8),
    )
    lambdas = (cfg.lam,) if cfg.lam is not None else (0.0, 1.0, 3.0, math.inf)
    corrected = correct_vlm_adapter(
        cfg.model_dir,
        emulator_dir,
        trained.adapter_dir,
        cfg.run_dir / "adapter-corrected",
        cfg.data,
        lambdas=lambdas,
        device=cfg.device,
        progress=sub(progress, 0.8, 0.9),
    )
    merged = merge_vlm(
        cfg.model_dir, corrected.adapter_dir, cfg.run_dir / "merged", emulator_dir, sub(progress, 0.9, 1.0)
    )
    return VlmRunResult(
        cfg.run_dir, merged, corrected.adapter_dir, corrected.lam, trained.losses, trained.eval_loss
    )


__all__ = ["VlmRunConfig", "VlmRunResult", "run_vlm"]
