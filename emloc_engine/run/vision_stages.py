"""A vision-language run inside the one orchestrator: the VLM stages' configs and their work.

``emloc run MODEL DATA`` (and the app's Run page) runs a VLM like a text model: the same
:class:`~emloc_engine.run.config.RunConfig`, the same planner (it counts image tokens and the vision
tower, :mod:`emloc_engine.run.vision_planning`, and picks ρ), the same manifest, resume, progress,
metrics, run history and run folder (``emulator/``, ``checkpoints/``, ``adapter/``,
``adapter-corrected/``, ``merged/``, ``model.gguf``). Only the stage functions differ
(:mod:`emloc_engine.vision`); :func:`vision_plan` wires the run's settings into them, once:

* emulator: ρ from the plan for the language model's and the vision tower's block linears (the paper
  compresses both at one ratio); ``calib`` of the user's image samples.
* training: ``train.steps``, ``lr``, ``rank``, ``alpha``, ``warmup_steps``, ``save_every``, ``dtype``,
  ``anchor``, ``anchor_ram_gib``, ``grad_checkpointing`` (both towers' blocks) (:mod:`emloc_engine.vision.anchors`: every block of both towers;
  ``linears`` anchors blocks, with a note) and the run's seed. A VLM sample carries its own images, so samples go one at a time:
  ``batch_size × grad_accum`` samples make one optimizer step (the same samples per step as text).
  Text-only knobs the VLM trainer does not have (dropout, rsLoRA, target modules, schedule other than
  cosine, weight decay, gradient clipping, evaluation during training — it evaluates at the end —,
  checkpoints kept, several GPUs) are named in the plan's notes when
  set to something else than their default, never silently dropped.
* correction: ``correct.lambda_`` (None: λ chosen on the held-out samples from ``lambda_grid``).
* export: :mod:`emloc_engine.vision.export` (merged, adapter, the language model's GGUF; no mmproj).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emloc_engine.core.errors import UnsupportedModel
from emloc_engine.core.jsonable import to_json
from emloc_engine.core.layout import RunLayout
from emloc_engine.core.progress import Progress
from emloc_engine.run.config import RunConfig
from emloc_engine.stages.training.options import TrainOptions
from emloc_engine.weights.headers import load_config

# Training settings the VLM trainer honours; any other set away from its default gets a note.
_VLM_TRAIN_KNOBS = (
    "rank",
    "alpha",
    "steps",
    "lr",
    "batch_size",
    "grad_accum",
    "warmup_steps",
    "save_every",
    "dtype",
    "anchor",
    "anchor_ram_gib",
    "grad_checkpointing",
)


def is_vision_language_model(model_dir: Path) -> bool:
    """Whether the folder holds a vision-language model (its config has a vision tower)."""
    from emloc_engine.vision.families import is_vision_language

    try:
        return is_vision_language(load_config(Path(model_dir)))
    except Exception:  # a GGUF file or a folder without config.json: not a VLM
        return False


@dataclass(frozen=True)
class VisionPlan:
    """The VLM stages of a planned run, decided by :func:`vision_plan`."""

    ratio: float
    calib: int
    train: Any  # emloc_engine.vision.finetune.VlmTrainConfig (imported lazily: it imports torch)
    lambdas: tuple[float, ...]
    export: Any | None  # emloc_engine.vision.export.VlmExportConfig, or None when nothing is exported


def vision_exports(cfg: RunConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The exports this VLM run can have, decided before any work, as for text
    (:func:`~emloc_engine.run.plan.checked_exports`): with the default exports an impossible GGUF is
    dropped with a note; asked for explicitly, the run is refused.

    Raises:
        UnsupportedModel: an explicitly requested export this VLM cannot have, naming the family and the fix.
    """
    from emloc_engine.stages.export.options import DEFAULT_FORMATS
    from emloc_engine.vision.export import MMPROJ_NOTE, vlm_export_problem, vlm_gguf_problem

    formats = tuple(cfg.export.formats)
    notes: tuple[str, ...] = ()
    if formats == DEFAULT_FORMATS and "gguf" in formats and vlm_gguf_problem(cfg.model_dir):
        notes = (f"GGUF export skipped: {vlm_gguf_problem(cfg.model_dir)}",)
        formats = tuple(f for f in formats if f != "gguf")
    problem = vlm_export_problem(formats, cfg.model_dir)
    if problem:
        raise UnsupportedModel(
            f"{problem}.", hint="Choose exports from merged, adapter, gguf (--export merged,adapter)."
        )
    if "gguf" in formats:
        notes = (
            *notes,
            "model.gguf holds the language model only. "
            + MMPROJ_NOTE.format(merged=RunLayout(cfg.run_dir).merged)
            + ".",
        )
    return formats, notes


def _train_notes(options: TrainOptions, gpus: int) -> tuple[str, ...]:
    default = TrainOptions()
    ignored = [
        f.name
        for f in dataclasses.fields(TrainOptions)
        if f.name not in _VLM_TRAIN_KNOBS and getattr(options, f.name) != getattr(default, f.name)
    ]
    ignored += ["gpus"] if gpus > 1 else []
    if not ignored:
        return ()
    return (
        f"Not used for vision-language models (the VLM trainer does not have them): {', '.join(ignored)}.",
    )


def vision_plan(cfg: RunConfig, ratio: float, device: str) -> tuple[VisionPlan, tuple[str, ...]]:
    """The VLM stages' configs from the run's settings (module docstring), and notes for the user.

    Raises:
        UnsupportedModel: an export this VLM cannot have; ConfigError: settings the stages refuse.
    """
    from emloc_engine.vision.export import VlmExportConfig
    from emloc_engine.vision.finetune import VlmTrainConfig

    t = cfg.train
    layout = RunLayout(cfg.run_dir)
    train = VlmTrainConfig(
        cfg.model_dir,
        layout.emulator,
        cfg.data,
        layout.root,
        steps=t.steps,
        lr=t.lr,
        rank=t.rank,
        alpha=t.alpha,
        grad_accum=t.batch_size * t.grad_accum,
        warmup=min(t.warmup_steps, t.steps),
        checkpoint_every=t.save_every if 0 < t.save_every <= t.steps else t.steps,
        seed=cfg.seed,
        device=device,
        dtype=t.dtype,
        anchor="blocks" if t.anchor == "linears" else t.anchor,
        anchor_ram_gib=t.anchor_ram_gib,
        grad_checkpointing=t.grad_checkpointing,
    )
    lambdas = (cfg.correct.lambda_,) if cfg.correct.lambda_ is not None else tuple(cfg.correct.lambda_grid)
    formats, notes = vision_exports(cfg)
    export = None
    if formats:
        export = VlmExportConfig(
            layout.root,
            cfg.model_dir,
            cfg.data,
            formats,
            cfg.export.gguf_type,
            cfg.export.verify,
            device=device if device != "auto" else "cpu",
        )
    notes = (*notes, *_train_notes(t, cfg.gpus))
    if t.anchor == "linears":
        notes = (*notes, "Anchors: a vision-language model is anchored at every block (blocks), not every linear.")
    return VisionPlan(ratio, cfg.calib, train, lambdas, export), notes


def check_vision_data(cfg: RunConfig) -> tuple[Any, Any]:
    """The model's processor and the data's report, every image checked (before the folder is touched).

    Raises:
        ModelNotFound: no processor in the model folder. DataError: every bad line and image listed.
    """
    from emloc_engine.data.vision_pipeline import inspect_vision_dataset
    from emloc_engine.vision.processor import load_processor

    processor = load_processor(cfg.model_dir)
    report = inspect_vision_dataset(cfg.data, processor)
    report.raise_if_fatal()
    return processor, report


def vision_work(plan: VisionPlan, cfg: RunConfig, processor: Any) -> dict[str, Callable[[Progress], Any]]:
    """Each VLM stage as ``work(progress) -> result``, for the orchestrator's ``step``."""
    layout = RunLayout(cfg.run_dir)

    def emulator(p: Progress) -> Any:
        from emloc_engine.data.vision_pipeline import prepare_vision_dataset
        from emloc_engine.vision.emulator import VlmEmulatorConfig, build_vlm_emulator, calibration_inputs

        prepared = prepare_vision_dataset(cfg.data, processor)
        calibration = calibration_inputs(prepared.train, processor, plan.calib)
        return build_vlm_emulator(
            VlmEmulatorConfig(
                cfg.model_dir, layout.emulator, calibration, ratio=plan.ratio, device=cfg.device
            ),
            p,
        )

    def train(p: Progress) -> Any:
        from emloc_engine.vision.finetune import train_vlm_lora

        return train_vlm_lora(plan.train, p)

    def correct(p: Progress) -> Any:
        from emloc_engine.vision.finetune import correct_vlm_adapter

        return correct_vlm_adapter(
            cfg.model_dir,
            layout.emulator,
            layout.adapter,
            layout.adapter_corrected,
            cfg.data,
            lambdas=plan.lambdas,
            device=cfg.device,
            progress=p,
        )

    def export(p: Progress) -> Any:
        from emloc_engine.vision.export import export_vlm

        assert plan.export is not None
        return export_vlm(plan.export, p)

    return {"emulator": emulator, "train": train, "correct": correct, "export": export}


def vision_result_json(name: str, result: Any) -> dict[str, Any]:
    """A VLM stage's result as the manifest stores it, under the keys the text stages use
    (``steps_done``, ``final_eval_loss``, ``lambda_``, ``paths``) so every reader finds them."""
    out: dict[str, Any] = to_json(result)
    if name == "train":  # as the text trainer records them: [step, value] pairs
        out["final_eval_loss"] = out.pop("eval_loss", None)
        out["loss_history"] = [[i + 1, v] for i, v in enumerate(out["losses"])]
        if isinstance(out["final_eval_loss"], float):
            out["eval_history"] = [[out["steps_done"], out["final_eval_loss"]]]
    if name == "correct":
        lam = float(result.lam)
        out["lambda_"] = lam if math.isfinite(lam) else "inf"
    if name == "export":
        keys = ("merged_dir", "adapter_dir", "gguf_path")
        out["paths"] = {k: str(getattr(result, k)) for k in keys if getattr(result, k, None)}
    return out


__all__ = [
    "VisionPlan",
    "check_vision_data",
    "is_vision_language_model",
    "vision_exports",
    "vision_plan",
    "vision_result_json",
    "vision_work",
]
