"""``emloc run``: every stage end to end, resumable from the run manifest.

The pipeline is only glue: it resolves the model and the data, asks the planner for ρ when none
is given, then calls the same stage functions the app calls — ``build_emulator``, ``train_lora``,
``correct_lora``, ``merge_and_export`` — recording each stage, its settings, the predicted and the
measured peak memory in ``RUN_DIR/manifest.json``. Running the same command again skips finished
stages (each stage also resumes its own partial work: emulator blocks, training checkpoints).
A run folder is bound to its inputs: a different model or dataset fingerprint is refused.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emloc_engine.core.errors import ConfigError, InsufficientMemory, RunStateError
from emloc_engine.core.layout import RunLayout
from emloc_engine.core.progress import NULL_PROGRESS, Progress, sub
from emloc_engine.run.manifest import RunManifest
from emloc_engine.run.runlog import attach_run_log, detach_run_log

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("merged", "adapter", "gguf")
# Share of the progress bar per stage (emulator, train, correct, export): training dominates.
_SLICES = {"emulator": (0.0, 0.2), "train": (0.2, 0.75), "correct": (0.75, 0.85), "export": (0.85, 1.0)}


def parse_lambda(text: str | float | None) -> float | None:
    """``"auto"``/None -> None (chosen on held-out data); ``"inf"`` -> ∞; else a number ≥ 0.

    Raises:
        ConfigError: anything else.
    """
    if text is None or (isinstance(text, str) and text.strip().lower() == "auto"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--lambda must be 'auto', 'inf' or a number ≥ 0 (got {text!r}).") from None
    if math.isnan(value) or value < 0:
        raise ConfigError(f"--lambda must be 'auto', 'inf' or a number ≥ 0 (got {text!r}).")
    return value


@dataclass(frozen=True)
class RunConfig:
    """Everything ``emloc run`` needs; the app builds the same object on its Plan page."""

    model_dir: Path = field(metadata={"help": "Snapshot folder of the original model (safetensors)."})
    data_path: Path = field(metadata={"help": "The training dataset file."})
    run_dir: Path = field(metadata={"help": "Run folder; an interrupted run resumes from its manifest."})
    ratio: float | None = field(default=None, metadata={"help": "Keep-ratio ρ; None lets the planner choose."})
    budget_bytes: int | None = field(default=None, metadata={"help": "GPU memory budget for the planner."})
    rank: int = field(default=16, metadata={"help": "LoRA rank r."})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha; the adapter is scaled by alpha/r."})
    steps: int = field(default=100, metadata={"help": "Optimizer steps."})
    lr: float = field(default=2e-4, metadata={"help": "Peak learning rate (cosine schedule with warmup)."})
    batch_size: int = field(default=4, metadata={"help": "Sequences per optimizer step."})
    lambda_: float | None = field(default=None, metadata={"help": "Correction damping λ; None = auto."})
    calib: int = field(default=64, metadata={"help": "Calibration samples for the emulator."})
    allocation: str = field(default="uniform", metadata={
        "help": "Emulator ranks per module: uniform or spectral (see EmulatorConfig.allocation)."})
    max_length: int = field(default=512, metadata={"help": "Tokens per sample."})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda."})
    exports: tuple[str, ...] = field(default=EXPORT_FORMATS, metadata={"help": "merged, adapter, gguf."})
    gguf_type: str = field(default="f16", metadata={"help": "GGUF tensor type: f16, bf16, q8_0 or f32."})
    seed: int = field(default=0, metadata={"help": "Seed for the split, sampling and initialisation."})
    gpus: int = field(default=1, metadata={"help": "GPUs for data-parallel training (Stage 2); 1 = one process."})
    anchor: str = field(default="auto", metadata={"help": "Anchored training: auto, blocks, linears or none (TrainConfig.anchor)."})

    def __post_init__(self) -> None:
        problems = []
        if self.anchor not in ("auto", "blocks", "linears", "none"):
            problems.append(f"anchor must be auto, blocks, linears or none (got {self.anchor!r})")
        if self.gpus < 1:
            problems.append(f"gpus must be ≥ 1 (got {self.gpus})")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            problems.append(f"ratio must be in (0, 1) (got {self.ratio})")
        if self.rank < 1:
            problems.append(f"rank must be ≥ 1 (got {self.rank})")
        if self.steps < 1:
            problems.append(f"steps must be ≥ 1 (got {self.steps})")
        if self.allocation not in ("uniform", "spectral"):
            problems.append(f"allocation must be uniform or spectral (got {self.allocation!r})")
        if self.calib < 1:
            problems.append(f"calib must be ≥ 1 (got {self.calib})")
        unknown = [e for e in self.exports if e not in EXPORT_FORMATS]
        if unknown:
            problems.append(f"unknown export(s) {unknown}; choose from {', '.join(EXPORT_FORMATS)}")
        if problems:
            raise ConfigError("Invalid run settings.", problems=problems)


@dataclass(frozen=True)
class RunResult:
    """What a whole run produced."""

    run_dir: Path
    ratio: float
    stages_run: tuple[str, ...]
    stages_skipped: tuple[str, ...]
    lambda_: float | None
    final_eval_loss: float | None
    exports: dict[str, str]
    wall_s: float
    notes: tuple[str, ...] = ()


def _json_settings(cfg: RunConfig) -> dict[str, Any]:
    d = asdict(cfg)
    for k, v in d.items():
        if isinstance(v, Path):
            d[k] = str(v)
        elif isinstance(v, float) and math.isinf(v):
            d[k] = "inf"
    return d


def _check_inputs(manifest: RunManifest, name: str, path: Path, fingerprint: str) -> None:
    old = manifest.data["inputs"].get(name)
    if old and old.get("fingerprint") != fingerprint:
        raise RunStateError(
            f"The run folder {manifest.root} was started with a different {name} ({old.get('path')}).",
            hint="Use a new --out folder for a new model or dataset.",
        )
    manifest.set_input(name, path, fingerprint)


def _checked_exports(cfg: RunConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The exports this model can have, decided before any work: a GGUF the writer cannot produce for
    this family is dropped with a note (not discovered after training), the others are kept."""
    if "gguf" not in cfg.exports:
        return cfg.exports, ()
    from emloc_engine.stages.export.gguf_export import gguf_support_problem, gguf_tokenizer_problem
    from emloc_engine.weights.checkpoint import load_config

    problem = gguf_support_problem(load_config(cfg.model_dir)) or gguf_tokenizer_problem(cfg.model_dir)
    if not problem:
        return cfg.exports, ()
    note = f"GGUF export skipped: {problem}"
    log.warning(note)
    return tuple(e for e in cfg.exports if e != "gguf"), (note,)


def choose_ratio(cfg: RunConfig) -> tuple[float, dict[str, Any]]:
    """ρ from the config, or from the planner for the detected machine.

    The planner's default budget is the model's own inference peak (the promise: training fits in
    what inference needs). Tiny models on big GPUs, and CPU runs, can fail that rule only because
    of fixed costs (CUDA context, logits); when the user gave neither ρ nor a budget, the whole
    device is used as the budget instead and the manifest says so.

    Returns:
        ``(ρ, plan record)``; the record holds the predicted peak (GiB) of every stage.

    Raises:
        ConfigError: nothing fits even then; the message lists what would.
    """
    from emloc_engine.machine.hardware import detect_machine
    from emloc_engine.run import planning

    facts = planning.model_facts(cfg.model_dir)
    machine = detect_machine()
    use_gpu = cfg.device != "cpu" and bool(machine.gpus)
    device_total = machine.gpus[0].total_bytes if use_gpu else machine.ram_total_bytes

    def plan(budget: int | None) -> Any:
        return planning.plan_memory(facts, planning.PlanConfig(
            budget_bytes=budget, gpu_total_bytes=device_total, context_length=cfg.max_length,
            batch_size=cfg.batch_size, lora_rank=cfg.rank, ratio=cfg.ratio,
            device="cuda" if use_gpu else "cpu", calibration_samples=cfg.calib, train_steps=cfg.steps,
            auto_lambda=cfg.lambda_ is None, num_gpus=cfg.gpus, anchored=cfg.anchor != "none",
            anchor_linears=cfg.anchor == "linears"))

    result = plan(cfg.budget_bytes)
    budget_note = "inference peak" if cfg.budget_bytes is None else "user budget"
    if not result.fits and cfg.budget_bytes is None and cfg.ratio is None:
        result = plan(device_total)
        budget_note = "whole device (the inference-peak budget left no room for fixed costs)"
    info = {"ratio": result.ratio, "fits": result.fits, "reason": result.reason, "budget": budget_note,
            "budget_gib": result.budget_bytes / 2**30, "limit_bytes": result.limit_bytes,
            "device": "cuda" if use_gpu else "cpu",
            "predicted_peaks_gib": {s.name: s.peak_bytes / 2**30 for s in result.stages},
            "inference_peak_gib": result.inference_peak_bytes / 2**30,
            "full_lora_peak_gib": result.full_lora_peak_bytes / 2**30,
            "est_seconds": result.est_seconds}
    if cfg.ratio is not None:
        return cfg.ratio, info
    if result.ratio is None or not result.fits:
        raise InsufficientMemory(f"No compression ratio fits: {result.reason}", problems=list(result.suggestions),
                                 hint="Give --ratio or --budget-gib explicitly, or follow a suggestion above.")
    return float(result.ratio), info


def run_pipeline(cfg: RunConfig, progress: Progress = NULL_PROGRESS) -> RunResult:
    """Run (or resume) every stage of EMLoC for one model and one dataset.

    Args:
        cfg: the whole run's settings.
        progress: receives the overall fraction, stage messages and every stage's metrics.

    Returns:
        A :class:`RunResult` with the chosen ρ and λ and the export paths.

    Raises:
        EngineError: from any stage; the manifest records the failed stage and the run resumes.
        Cancelled: after the current stage reached a resumable point.
    """
    from emloc_engine.data import DataConfig, calibration_token_ids, inspect_dataset, load_tokenizer
    from emloc_engine.stages.correction.corrector import CorrectionConfig, correct_lora
    from emloc_engine.stages.emulator.builder import EmulatorConfig, build_emulator
    from emloc_engine.stages.export.exporter import ExportConfig, merge_and_export
    from emloc_engine.stages.training.trainer import TrainConfig, train_lora
    from emloc_engine.weights.checkpoint import fingerprint_model

    t0 = time.monotonic()
    layout = RunLayout(Path(cfg.run_dir))
    manifest = RunManifest.open(layout.root)
    handler = attach_run_log(layout.root)
    ran: list[str] = []
    skipped: list[str] = []
    current = "setup"
    try:
        data_cfg = DataConfig(path=Path(cfg.data_path), max_length=cfg.max_length, seed=cfg.seed)
        tokenizer = load_tokenizer(cfg.model_dir)
        report = inspect_dataset(data_cfg, tokenizer)
        _check_inputs(manifest, "model", cfg.model_dir, fingerprint_model(cfg.model_dir))
        _check_inputs(manifest, "data", cfg.data_path, report.fingerprint)
        exports_wanted, notes = _checked_exports(cfg)
        ratio, plan_info = choose_ratio(cfg)
        manifest.update_settings({**_json_settings(cfg), "ratio": ratio, "plan": plan_info,
                                  "exports": list(exports_wanted), "notes": list(notes)})
        predicted = plan_info.get("predicted_peaks_gib", {})

        def stage(name: str) -> Progress:
            nonlocal current
            current = name
            a, b = _SLICES[name]
            return sub(progress, a, b)

        # Stage 1: emulator
        if manifest.is_done("emulator") and (layout.emulator / "emloc.json").exists():
            skipped.append("emulator")
        else:
            p = stage("emulator")
            manifest.start_stage("emulator", predicted_peak_gib=predicted.get("emulator"))
            ids = calibration_token_ids(data_cfg, tokenizer, n=cfg.calib, seed=cfg.seed)
            # The build streams one block at a time and needs little; it is held to half the
            # inference peak (its chunks shrink to fit) so the GPU stays usable meanwhile.
            budget = None
            if plan_info.get("device") == "cuda":
                budget = int(min(plan_info["limit_bytes"], 0.5 * plan_info["inference_peak_gib"] * 2**30))
            factor_devices = (tuple(f"cuda:{i}" for i in range(1, cfg.gpus))
                              if plan_info.get("device") == "cuda" and cfg.gpus > 1 else ())
            er = build_emulator(EmulatorConfig(model_dir=cfg.model_dir, out_dir=layout.emulator,
                                               calibration_ids=tuple(tuple(x) for x in ids), ratio=ratio,
                                               device=cfg.device, memory_budget_bytes=budget,
                                               allocation=cfg.allocation,
                                               factor_devices=factor_devices), p)
            manifest.finish_stage("emulator", er.to_dict(), measured_peak_gib=er.peak_vram_gib)
            ran.append("emulator")

        # Stage 2: training
        final_eval: float | None = None
        if manifest.is_done("train") and (layout.adapter / "adapter_config.json").exists():
            skipped.append("train")
            final_eval = manifest.stage("train").get("result", {}).get("final_eval_loss")
        else:
            p = stage("train")
            manifest.start_stage("train", predicted_peak_gib=predicted.get("train"))
            train_cfg = TrainConfig(run_dir=layout.root, data=data_cfg, rank=cfg.rank, alpha=cfg.alpha,
                                    steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                                    device=cfg.device, seed=cfg.seed,
                                    anchor="none" if cfg.gpus > 1 and cfg.anchor == "auto" else cfg.anchor)
            if cfg.gpus > 1:
                from emloc_engine.stages.training.distributed import ParallelConfig, train_lora_distributed

                tr = train_lora_distributed(train_cfg, ParallelConfig(processes=cfg.gpus), p)
            else:
                tr = train_lora(train_cfg, p)
            final_eval = tr.final_eval_loss
            manifest.finish_stage("train", {"steps": tr.steps_done, "final_eval_loss": tr.final_eval_loss,
                                            "loss_history": list(tr.loss_history),
                                            "eval_history": list(tr.eval_history),
                                            "tokens_per_s": tr.tokens_per_s, "wall_s": tr.wall_s,
                                            "anchor": tr.anchor, "anchor_note": tr.anchor_note,
                                            "anchor_s": tr.anchor_s},
                                  measured_peak_gib=tr.peak_vram_gib)
            ran.append("train")

        # Stage 3: correction
        lam: float | None
        if manifest.is_done("correct") and (layout.adapter_corrected / "adapter_config.json").exists():
            skipped.append("correct")
            lam_rec = manifest.stage("correct").get("result", {}).get("lambda")
            lam = math.inf if lam_rec == "inf" else lam_rec
        else:
            p = stage("correct")
            manifest.start_stage("correct", predicted_peak_gib=predicted.get("correct"))
            cr = correct_lora(CorrectionConfig(run_dir=layout.root, model_dir=cfg.model_dir, lambda_=cfg.lambda_,
                                               data=data_cfg, device=cfg.device, overwrite=True), p)
            lam = cr.lambda_
            manifest.finish_stage("correct", {**cr.to_dict(), "lambda": "inf" if math.isinf(lam) else lam},
                                  measured_peak_gib=getattr(cr, "peak_vram_gib", None))
            ran.append("correct")

        # Stage 4: export
        exports: dict[str, str] = {}
        if exports_wanted:
            if manifest.is_done("export"):
                skipped.append("export")
                exports = dict(manifest.stage("export").get("result", {}).get("paths", {}))
            else:
                p = stage("export")
                manifest.start_stage("export")
                xr = merge_and_export(ExportConfig(run_dir=layout.root, model_dir=cfg.model_dir,
                                                   formats=exports_wanted, gguf_type=cfg.gguf_type,
                                                   overwrite=True, device=cfg.device), p)
                for key in ("merged_dir", "adapter_dir", "gguf_path"):
                    value = getattr(xr, key, None)
                    if value:
                        exports[key] = str(value)
                manifest.finish_stage("export", {**xr.to_dict(), "paths": exports,
                                                 "verification": [list(v) for v in xr.verification]},
                                      measured_peak_gib=getattr(xr, "peak_vram_gib", None))
                ran.append("export")
        progress.update(1.0, "Done")
        return RunResult(layout.root, ratio, tuple(ran), tuple(skipped), lam, final_eval, exports,
                         time.monotonic() - t0, notes)
    except BaseException as exc:
        if current in _SLICES:
            manifest.record_interruption(current, exc)
        raise
    finally:
        detach_run_log(handler)
