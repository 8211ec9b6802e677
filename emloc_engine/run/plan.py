"""``plan_run(RunConfig, machine) -> RunPlan``: ρ and every stage's config, decided once, before any work.

The budget is the GPU: unless the user gives ``--budget-gib``, the chosen card's free memory (or the
``--gpu-memory`` cap when lower) minus ``max(0.5 GiB, 5 %)`` (:func:`~emloc_engine.machine.budget.default_budget_bytes`;
on the CPU, the available RAM). The original need not fit it: the plan then streams the original
(``RunPlan.stream_original``) in every stage that uses it.

Every stage config the run will use is built here from the run's settings, so the CLI, the app and
the per-stage commands cannot wire a setting differently: the emulator build is held to half the
inference peak (its chunks shrink to fit, so the GPU stays usable meanwhile), the correction always
replaces its own earlier output inside a run, and so on.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emloc_engine.core.errors import InsufficientMemory
from emloc_engine.core.layout import RunLayout
from emloc_engine.run.config import RunConfig

if TYPE_CHECKING:
    from emloc_engine.data import DataReport
    from emloc_engine.machine.hardware import GpuInfo, MachineInfo
    from emloc_engine.run.planning import MemoryPlan, PlanConfig
    from emloc_engine.run.vision_stages import VisionPlan
    from emloc_engine.stages.correction.corrector import CorrectionConfig
    from emloc_engine.stages.emulator.builder import EmulatorConfig
    from emloc_engine.stages.export.exporter import ExportConfig
    from emloc_engine.stages.training.distributed import ParallelConfig
    from emloc_engine.stages.training.trainer import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlanRecord:
    """What the planner decided, as the manifest stores it."""

    ratio: float
    fits: bool
    reason: str
    budget_note: str
    budget_gib: float
    limit_bytes: int
    device: str
    predicted_peaks_gib: dict[str, float]
    inference_peak_gib: float
    full_lora_peak_gib: float
    est_seconds: dict[str, float]
    stream_original: bool = False
    predicted_ram_gib: dict[str, float] = dataclasses.field(default_factory=dict)
    predicted_allocated_gib: dict[str, float] = dataclasses.field(default_factory=dict)
    """Per stage, the prediction of ``torch.cuda.max_memory_allocated`` (the peak less the CUDA context and
    allocator slack, which the allocator's statistics never see): what a measured stage peak compares to."""


@dataclass(frozen=True)
class RunPlan:
    """A run, decided: its settings, ρ, the memory plan and the config of every stage."""

    config: RunConfig
    ratio: float
    record: PlanRecord
    memory: MemoryPlan
    emulator: EmulatorConfig
    train: TrainConfig
    parallel: ParallelConfig | None
    correct: CorrectionConfig
    export: ExportConfig | None
    notes: tuple[str, ...] = ()
    stream_original: bool = False
    """The original does not fit the budget: every stage that uses it streams it block by block from the shards."""
    vision: VisionPlan | None = None
    """A vision-language model: its stages' configs (:mod:`emloc_engine.run.vision_stages`); the text ones unused."""

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.config.run_dir)

    @property
    def budget_note(self) -> str:
        return self.record.budget_note

    @property
    def exports(self) -> tuple[str, ...]:
        if self.vision is not None:
            return tuple(self.vision.export.formats) if self.vision.export is not None else ()
        return self.export.formats if self.export is not None else ()


def options_of(options: Any) -> dict[str, Any]:
    """The fields of a stage's options object as keyword arguments (to build the stage config)."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


def checked_exports(cfg: RunConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The exports this model can have, decided before any work (never discovered after training).

    A GGUF the writers cannot produce for this family is dropped with a note when the run asked for the
    default exports (merged, adapter, gguf); asked for explicitly (``adapter-gguf``, ``ollama``,
    ``lmstudio``, or ``gguf`` without the defaults) the run is refused with the missing piece named.

    Raises:
        UnsupportedModel: an explicitly requested GGUF export this family cannot have.
        MissingTool: a K-quant GGUF type without llama.cpp's ``llama-quantize``.
    """
    from emloc_engine.core.errors import UnsupportedModel
    from emloc_engine.stages.export.exporter import export_problem, resolve_formats
    from emloc_engine.stages.export.options import DEFAULT_FORMATS

    formats = cfg.export.formats
    wanted = resolve_formats(formats, cfg.model_dir)
    if not wanted & {"gguf", "adapter-gguf"}:
        return formats, ()
    problem = export_problem(wanted, cfg.export.gguf_type, cfg.model_dir)
    if not problem:
        return formats, ()
    if tuple(formats) != DEFAULT_FORMATS:
        raise UnsupportedModel(f"{problem}.", hint="Choose exports without GGUF (--export merged,adapter).")
    note = f"GGUF export skipped: {problem.removeprefix('Cannot export GGUF: ')}"
    log.warning(note)
    return tuple(e for e in formats if e != "gguf"), (note,)


def bounding_gpu(machine: MachineInfo, device: str, gpus: int) -> GpuInfo | None:
    """The GPU whose memory bounds the run first: ``cuda:N``'s, else the smallest of GPUs 0..gpus−1; None on the CPU."""
    if device == "cpu" or not machine.gpus:
        return None
    by_index = sorted(machine.gpus, key=lambda g: g.index)
    if device.startswith("cuda:"):
        wanted = int(device.split(":", 1)[1])
        chosen = [g for g in by_index if g.index == wanted]
        return chosen[0] if chosen else by_index[0]
    return min(by_index[:max(1, gpus)], key=lambda g: g.total_bytes)


def machine_budget_bytes(machine: MachineInfo, device: str = "auto", gpus: int = 1,
                         gpu_memory_bytes: int | None = None) -> int:
    """The default budget on ``machine``: the bounding GPU's free memory (capped by ``gpu_memory_bytes``)
    minus the margin of :func:`~emloc_engine.machine.budget.default_budget_bytes`; on the CPU the
    available RAM minus the margin (the cap does not apply there). The CLI and the app both use this."""
    from emloc_engine.machine.budget import default_budget_bytes

    gpu = bounding_gpu(machine, device, gpus)
    if gpu is None:
        return default_budget_bytes(machine.ram_available_bytes or machine.ram_total_bytes)
    return default_budget_bytes(gpu.free_bytes, gpu_memory_bytes)


def eval_sequences_of(report: DataReport | None) -> int | None:
    """Held-out sequences of the inspected data at most (the report's ``n_eval``), for the λ search's plan.

    The report counts after plain text is cut into ``max_length`` pieces and before packing, which only
    ever joins sequences: the run holds this many or fewer. None without a report (the planner then
    plans for the worst case, every eval batch full).
    """
    return report.n_eval if report is not None else None


def sample_tokens_of(report: DataReport | None, batch_size: int) -> int | None:
    """Tokens of a typical padded training sample of the inspected data, for the time estimate.

    A batch is padded to its longest sample: with one sample per batch that is the mean length, with
    more it is near the long end (the 95th percentile). None without token statistics (the planner
    then counts the whole context).
    """
    stats = report.token_stats if report is not None else None
    if stats is None or stats.unit != "tokens":
        return None
    return max(1, round(stats.mean if batch_size <= 1 else stats.p95))


def plan_config_for(cfg: RunConfig, machine: MachineInfo, budget_bytes: int | None = None,
                    disk_free_bytes: int | None = None, sample_tokens: int | None = None,
                    eval_sequences: int | None = None) -> PlanConfig:
    """The one translation of a run's settings into the planner's :class:`PlanConfig`.

    Args:
        cfg: the run's settings.
        machine: what the run will compute on (the first GPU unless the device is the CPU).
        budget_bytes: the budget to plan for (default: the run's own, else :func:`machine_budget_bytes`).
        disk_free_bytes: free space where the run folder goes (None: not checked).
        sample_tokens: a typical padded sample's tokens (:func:`sample_tokens_of`), for the time estimate.
        eval_sequences: held-out sequences of the data when known (the data report's ``n_eval``): the streamed
            λ search keeps that many on the GPU; None plans for the worst case.
    """
    from emloc_engine.run.planning import PlanConfig

    gpu = bounding_gpu(machine, cfg.device, cfg.gpus)
    use_gpu = gpu is not None
    if budget_bytes is None:
        budget_bytes = cfg.budget_bytes if cfg.budget_bytes is not None else machine_budget_bytes(
            machine, cfg.device, cfg.gpus, cfg.gpu_memory_bytes)
    total = gpu.total_bytes if gpu is not None else machine.ram_total_bytes
    if gpu is not None and cfg.gpu_memory_bytes is not None:
        total = min(total, cfg.gpu_memory_bytes)
    return PlanConfig(
        budget_bytes=budget_bytes, gpu_total_bytes=total,
        ram_bytes=machine.ram_total_bytes or None, disk_free_bytes=disk_free_bytes,
        anchor_ram_bytes=int(cfg.train.anchor_ram_gib * 2**30), export_formats=cfg.export.formats,
        context_length=cfg.data.max_length, batch_size=cfg.train.batch_size, lora_rank=cfg.train.rank,
        ratio=cfg.ratio, device="cuda" if use_gpu else "cpu", calibration_samples=cfg.calib,
        train_steps=cfg.train.steps, auto_lambda=cfg.correct.lambda_ is None, num_gpus=cfg.gpus,
        anchored=cfg.train.anchor != "none", anchor_linears=cfg.train.anchor == "linears",
        eval_batches=cfg.correct.max_eval_batches, eval_batch_size=cfg.correct.eval_batch_size,
        train_eval_batches=cfg.train.max_eval_batches, lambda_candidates=len(cfg.correct.lambda_grid),
        eval_sequences=eval_sequences, target_modules=cfg.train.target_modules,
        dense_modules=cfg.emulator.dense_patterns, grad_checkpointing=cfg.train.grad_checkpointing,
        gpu_name=gpu.name if gpu is not None else None, sample_tokens=sample_tokens)


def plan_memory_for(cfg: RunConfig, machine: MachineInfo, sample_tokens: int | None = None,
                    eval_sequences: int | None = None) -> tuple[MemoryPlan, PlanRecord]:
    """The memory plan of ``cfg`` on ``machine`` and its record (ρ from the planner unless given).

    Raises:
        InsufficientMemory: no ρ fits even with the whole device; the message lists what would.
    """
    from emloc_engine.run import planning

    facts = planning.model_facts(cfg.model_dir)
    plan_cfg = plan_config_for(cfg, machine, disk_free_bytes=_disk_free(cfg.run_dir), sample_tokens=sample_tokens,
                               eval_sequences=eval_sequences)
    memory = planning.plan_memory(facts, plan_cfg)
    note = ("user budget" if memory.budget_bytes >= cfg.budget_bytes else "user budget, capped at the device's size") \
        if cfg.budget_bytes is not None else (
        "free GPU memory − margin" if plan_cfg.device == "cuda" else "available RAM − margin")
    if memory.shortfalls and memory.ratio is not None:
        raise InsufficientMemory(memory.reason, problems=[f.message for f in memory.shortfalls],
                                 hint="Free RAM or disk space, or run on a machine with more.")
    if cfg.ratio is None and (memory.ratio is None or not memory.fits):
        raise InsufficientMemory(f"No compression ratio fits: {memory.reason}",
                                 problems=[f.message for f in memory.shortfalls] + list(memory.suggestions),
                                 hint="Give --ratio or --budget-gib explicitly, or follow a suggestion above.")

    ratio = cfg.ratio if cfg.ratio is not None else float(memory.ratio or 0.0)
    record = PlanRecord(
        ratio=ratio, fits=memory.fits, reason=memory.reason, budget_note=note,
        budget_gib=memory.budget_bytes / 2**30, limit_bytes=memory.limit_bytes, device=plan_cfg.device,
        predicted_peaks_gib={s.name: s.peak_bytes / 2**30 for s in memory.stages},
        inference_peak_gib=memory.inference_peak_bytes / 2**30,
        full_lora_peak_gib=memory.full_lora_peak_bytes / 2**30, est_seconds=memory.est_seconds,
        stream_original=memory.stream_original,
        predicted_ram_gib={s.name: s.ram_bytes / 2**30 for s in memory.stages},
        predicted_allocated_gib={s.name: s.allocated_bytes / 2**30 for s in memory.stages})
    return memory, record


def _disk_free(run_dir: Path) -> int | None:
    """Free space where ``run_dir`` goes (its nearest existing parent); None when it cannot be read."""
    import shutil

    path = Path(run_dir).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return int(shutil.disk_usage(path).free)
    except OSError:
        return None


def recorded_memory(plan_record: dict[str, Any] | None) -> tuple[int | None, bool]:
    """``(GPU budget in bytes or None, stream_original)`` as a run's manifest recorded its plan.

    A per-stage ``emloc export`` and the app's Try page wire the export as the run did: its verification
    keeps to the run's budget on the GPU and streams the original when the run did.
    """
    if not plan_record:
        return None, False
    budget = plan_record.get("budget_gib")
    on_gpu = plan_record.get("device") == "cuda" and isinstance(budget, (int, float))
    return (int(float(budget) * 2**30) if on_gpu and budget else None), bool(plan_record.get("stream_original"))


def check_budget(plan: RunPlan) -> None:
    """Refuse a fixed ρ that does not fit the budget the user gave (the budget is a promise).

    A plan with a fixed ρ is still made (the app shows its bars); running it is what is refused.

    Raises:
        InsufficientMemory: naming ρ, the budget and what would fit.
    """
    cfg = plan.config
    if cfg.ratio is not None and cfg.budget_bytes is not None and not plan.record.fits:
        raise InsufficientMemory(f"ρ = {cfg.ratio} does not fit the budget of {cfg.budget_bytes / 2**30:.2f} GiB: "
                                 f"{plan.record.reason}", problems=list(plan.memory.suggestions),
                                 hint="Leave --ratio out to let the planner pick one that fits, or raise the budget.")


def plan_run(cfg: RunConfig, machine: MachineInfo | None = None, *, sample_tokens: int | None = None,
             eval_sequences: int | None = None) -> RunPlan:
    """Decide ρ and every stage's config for ``cfg`` on ``machine`` (detected when None).

    ``sample_tokens``: a typical padded sample's tokens when the data was inspected (the time estimate
    counts them instead of the whole context; memory always plans for the whole context).
    ``eval_sequences``: the data's held-out sequences when known (the streamed λ search's hidden states;
    None: the worst case).

    Raises:
        InsufficientMemory: nothing fits; ConfigError: the settings cannot be wired into a stage.
    """
    from emloc_engine.run.planning import emulator_budget_bytes
    from emloc_engine.run.vision_stages import is_vision_language_model, vision_plan
    from emloc_engine.stages.correction.corrector import CorrectionConfig
    from emloc_engine.stages.emulator.builder import EmulatorConfig
    from emloc_engine.stages.export.exporter import ExportConfig
    from emloc_engine.stages.training.distributed import ParallelConfig
    from emloc_engine.stages.training.trainer import TrainConfig

    if machine is None:
        from emloc_engine.machine.hardware import detect_machine

        machine = detect_machine()
    memory, record = plan_memory_for(cfg, machine, sample_tokens, eval_sequences)
    layout = RunLayout(cfg.run_dir)
    on_cuda = record.device == "cuda"
    budget = emulator_budget_bytes(record.limit_bytes, memory.inference_peak_bytes) if on_cuda else None
    factor_devices = tuple(f"cuda:{i}" for i in range(1, cfg.gpus)) if on_cuda and cfg.gpus > 1 else ()
    emulator = EmulatorConfig(**options_of(cfg.emulator), model_dir=cfg.model_dir, out_dir=layout.emulator,
                              calibration_ids=(), ratio=record.ratio, device=cfg.device,
                              memory_budget_bytes=budget, factor_devices=factor_devices)
    train_options = options_of(cfg.train)
    # The original does not fit the budget: every stage that uses it streams it (anchors, λ search, verification).
    stream = memory.stream_original
    # A streamed pass whose hidden states would not fit beside the rest goes with them in RAM (the planner's choice).
    train = TrainConfig(**train_options, run_dir=layout.root, data=cfg.data, device=cfg.device, seed=cfg.seed,
                        stream_original=stream, hidden_on_gpu_bytes=memory.stage("train").hidden_on_gpu_bytes,
                        anchor_group_tokens=memory.stage("train").anchor_group_tokens)
    parallel = ParallelConfig(processes=cfg.gpus) if cfg.gpus > 1 else None
    correct = CorrectionConfig(**options_of(cfg.correct), run_dir=layout.root, model_dir=cfg.model_dir,
                               data=cfg.data, device=cfg.device, overwrite=True, stream_original=stream,
                               hidden_on_gpu_bytes=memory.stage("correct").hidden_on_gpu_bytes)
    vision: VisionPlan | None = None
    formats: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    if is_vision_language_model(cfg.model_dir):  # a VLM: the same plan, the VLM stages' configs
        vision, notes = vision_plan(cfg, record.ratio, cfg.device)
    else:
        formats, notes = checked_exports(cfg)
    export = None
    if formats:
        export = ExportConfig(**{**options_of(cfg.export), "formats": formats}, run_dir=layout.root,
                              model_dir=cfg.model_dir, overwrite=True, device=cfg.device,
                              memory_budget_bytes=memory.budget_bytes if on_cuda else None, stream_original=stream)
    if cfg.gpu_memory_bytes is not None and not on_cuda:
        notes = (*notes, f"--gpu-memory {cfg.gpu_memory_bytes / 2**30:g} GiB is recorded and ignored: the run is on the CPU.")
    elif cfg.gpu_memory_bytes is not None and (gpu := bounding_gpu(machine, cfg.device, cfg.gpus)) is not None \
            and cfg.gpu_memory_bytes >= gpu.total_bytes:
        notes = (*notes, f"--gpu-memory {cfg.gpu_memory_bytes / 2**30:g} GiB is not less than the {gpu.name}'s "
                         f"{gpu.total_bytes / 2**30:.1f} GiB: it caps nothing (the budget comes from the card's free "
                         "memory); give a smaller value to cap this process.")
    return RunPlan(config=cfg, ratio=record.ratio, record=record, memory=memory, emulator=emulator, train=train,
                   parallel=parallel, correct=correct, export=export,
                   notes=(*notes, *(n for n in memory.notes if n.startswith(("The original", "Anchors", "Budget")))),
                   stream_original=memory.stream_original, vision=vision)
