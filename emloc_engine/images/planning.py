"""The image planner: every image stage's GPU peak from the pipeline's configs, and the largest ρ that fits.

``plan_images(ImagePlanConfig(pipeline_dir, budget_bytes, resolution=1024, batch_size=1, rank=16))
-> ImagePlan``: no weight is loaded (the denoiser is built on the meta device from its config, the
text encoders and VAE are counted from their safetensors headers; :mod:`.plan_shapes`). The budget
is the text runs' (:func:`~emloc_engine.run.plan.machine_budget_bytes`: free memory or the
``--gpu-memory`` cap, less ``max(0.5 GiB, 5 %)``; or ``--budget-gib``), and every predicted part
must fit ``budget − margin × (budget − CUDA context)`` (the text planner's safety margin).

Formulas (bytes; ``b`` = 2 for bf16 on a GPU, 4 for fp32 on the CPU; ``B`` the batch; every stage
adds the CUDA context and 3 % allocator slack, :class:`~emloc_engine.run.planning.PlannerConstants`):

* **cache** (:mod:`.cache`): ``max(VAE, text)``: the VAE in fp32 (params × 4) plus its encoder's
  largest feature maps, ``3 · max_i(ch_i · res² / 4^i) · 4``, one image at a time; then every text
  encoder at once in ``b`` (params × b) plus ``8 · tokens · width · 4`` of working tensors.
* **emulator** (:mod:`.emulator`): the original streamed block by block: the weights outside the
  blocks and the largest block in ``b``; the calibration statistics of the largest pass (fp32, whole
  blocks up to ``stats_budget_gib``, as :func:`~.emulator._passes` groups them); one module's
  factorisation (fp32 ``W`` twice and ``3 · in²``); a no-grad forward of ``calibration_batch``
  images (:func:`forward_bytes`: the peak of live tensors of a batch-1 meta forward, times the batch).
* **train** (:mod:`.training`): the emulator resident in ``b`` (dense weights + ``k(out+in)+out``
  per compressed linear, ``k = ⌊ρ·out·in/(out+in)⌋``); LoRA ``r(out+in)`` per linear in fp32 with
  its gradient and AdamW's two moments (16 bytes a parameter); activations ``B ×`` the saved
  tensors of a batch-1 step counted on the meta device (:func:`~.plan_shapes.activation_profile`):
  with gradient checkpointing (on GPUs) everything saved outside the blocks, every block's inputs,
  one block's recomputed activations and their gradients (``2 ×`` the largest block's), and
  ``4 ×`` the largest tensor a block hands on; without it (the CPU) everything saved. The step's
  activations grow with the latent tokens, ``(res/16)²`` for FLUX/SD3 and the UNet's feature maps
  for SDXL. Sample images during training (the VAE in ``b`` decoding one image) must fit too.
* **correct** (:mod:`.correction`): the original streamed again with the adapter (fp32), a no-grad
  forward of ``eval_batch`` images, and one module's fp64 preparation (``3 · out · in · 8``).
* **inference** (for information: "can this card run the model"): the whole denoiser in ``b`` and a
  batch-1 forward.

ρ: the largest on the grid 0.05, 0.10 … 0.90 whose training fits (only training depends on ρ). When
a ρ-independent stage does not fit, or training does not fit at ρ = 0.05, the plan says which stage,
by how much, and what would help (lower resolution, batch 1, a bigger budget).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emloc_engine.core.errors import ConfigError, InsufficientMemory
from emloc_engine.core.ranks import rank_for_ratio
from emloc_engine.images.options import RESOLUTIONS, ImageRunConfig, run_default
from emloc_engine.images.pipeline_index import check_config_dir
from emloc_engine.images.pipelines import PipelineInfo, identify_pipeline
from emloc_engine.images.plan_shapes import (
    ActivationProfile,
    DenoiserShapes,
    activation_profile,
    component_config,
    component_params,
    denoiser_shapes,
    meta_denoiser,
)
from emloc_engine.run.planning import PlannerConstants

GIB = 1024**3
BATCHES = (1, 2, 4)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
LORA_BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW's two moments


@dataclass(frozen=True)
class ImagePlanConfig:
    """What to plan: the pipeline, the budget and the training settings that change memory (their defaults
    are the run's own, :func:`~emloc_engine.images.options.run_default`: the plan plans what ``emloc image`` runs)."""

    pipeline_dir: Path = field(metadata={"help": "Diffusers pipeline folder (FLUX.1, SD3, SDXL)."})
    budget_bytes: int = field(metadata={"help": "GPU memory every stage must keep to."})
    resolution: int = field(default=run_default("resolution"), metadata={"help": "Training resolution in pixels."})
    batch_size: int = field(default=run_default("batch_size"), metadata={"help": "Images per step."})
    rank: int = field(default=run_default("rank"), metadata={"help": "LoRA rank."})
    ratio: float | None = field(default=None, metadata={"help": "Evaluate this ρ (default: choose)."})
    device: str = field(default="cuda", metadata={"help": "cuda (bf16, checkpointing) or cpu (fp32)."})
    max_sequence_length: int = field(default=run_default("max_sequence_length"), metadata={
        "help": "T5 tokens per caption (FLUX, SD3)."})
    calibration_batch: int = field(default=4, metadata={"help": "Calibration forwards per batch."})
    eval_batch: int = field(default=4, metadata={"help": "Held-out forwards per batch (correction)."})
    stats_budget_gib: float = field(default=4.0, metadata={"help": "Statistics per calibration pass."})
    safety_margin: float = field(default=0.1, metadata={"help": "Margin, a fraction of the budget."})
    ratios: tuple[float, ...] = field(
        default=tuple(round(0.9 - 0.05 * i, 2) for i in range(18)),
        metadata={"help": "The ρ tried, largest first."},
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "pipeline_dir", Path(self.pipeline_dir))
        problems = [
            f"{k} must be at least 1 (got {getattr(self, k)})"
            for k in ("budget_bytes", "resolution", "batch_size", "rank", "calibration_batch", "eval_batch")
            if getattr(self, k) < 1
        ]
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            problems.append(f"ratio must be in (0, 1] (got {self.ratio})")
        if problems:
            raise ConfigError("Invalid image plan settings.", problems=problems)


@dataclass(frozen=True)
class ImageStagePeak:
    """One stage's predicted peak and its parts (label, bytes)."""

    name: str
    parts: tuple[tuple[str, int], ...]

    @property
    def peak_bytes(self) -> int:
        return sum(b for _, b in self.parts)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


@dataclass(frozen=True)
class ImagePlan:
    """The plan: ρ (None when nothing fits), every stage's peak at it, and why."""

    config: ImagePlanConfig
    kind: str
    ratio: float | None
    fits: bool
    limit_bytes: int
    stages: tuple[ImageStagePeak, ...]
    inference: ImageStagePeak
    latent_tokens: int
    params: int
    emulator_params: int
    reason: str

    def stage(self, name: str) -> ImageStagePeak:
        return next(s for s in self.stages if s.name == name)

    @property
    def peak_bytes(self) -> int:
        return max(s.peak_bytes for s in self.stages)

    def predicted_peaks_gib(self) -> dict[str, float]:
        return {s.name: round(s.peak_gib, 3) for s in (*self.stages, self.inference)}

    def raise_if_unfit(self) -> None:
        """Raise :class:`InsufficientMemory` with the plan's reason unless it fits."""
        if not self.fits:
            raise InsufficientMemory(
                self.reason, hint="Lower the resolution or the batch, or give more memory."
            )


# ------------------------------------------------------------------------------------ arithmetic
def emulator_params(shapes: DenoiserShapes, ratio: float) -> int:
    """Parameters of the emulator at ρ: dense weights, and ``k(out+in)+out`` per compressed linear."""
    params = shapes.params
    for out_f, in_f in shapes.compressed.values():
        k = min(rank_for_ratio(ratio, out_f, in_f), min(out_f, in_f))
        params += k * (out_f + in_f) - out_f * in_f  # v (k×in) and u (out×k); the bias stays on u
    return params


def lora_params(shapes: DenoiserShapes, rank: int) -> int:
    """LoRA parameters: ``r(out+in)`` per adapted linear."""
    return sum(rank * (o + i) for o, i in shapes.compressed.values())


def vae_feature_bytes(vae: dict[str, Any], resolution: int, elem: int) -> int:
    """The VAE's largest feature maps at ``resolution`` (three of them live at once)."""
    chans = vae.get("block_out_channels", (128,))
    return 3 * max(int(c) * resolution * resolution // 4**i for i, c in enumerate(chans)) * elem


def forward_bytes(profile: ActivationProfile, batch: int) -> int:
    """A no-grad forward's peak of live tensors (measured at batch 1 on the meta device) for ``batch``."""
    return batch * profile.forward_bytes


def train_activation_bytes(profile: ActivationProfile, batch: int, checkpointing: bool) -> int:
    """What a training step keeps for the backward (module docstring)."""
    if not checkpointing:
        return batch * profile.total_bytes
    return batch * (
        profile.outside_bytes
        + profile.unit_input_bytes
        + 2 * profile.max_unit_bytes
        + 4 * profile.max_unit_out_bytes
    )


def stats_pass_bytes(shapes: DenoiserShapes, budget_bytes: float) -> int:
    """The largest calibration pass's statistics (fp32), grouped like the emulator groups them."""
    from emloc_engine.images.pipelines import BLOCK_PATTERN

    blocks: dict[str, int] = {}
    for name, (_, in_f) in shapes.compressed.items():
        m = BLOCK_PATTERN.match(name)
        key = m.group(1) if m else name
        blocks[key] = blocks.get(key, 0) + in_f * in_f * 4
    largest, used = 0, 0
    for size in blocks.values():
        used = used + size if used and used + size <= budget_bytes else size
        largest = max(largest, used)
    return largest


# ------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class _Facts:
    info: PipelineInfo
    shapes: DenoiserShapes
    profile: ActivationProfile
    vae_params: int
    text_params: int
    text_work: int
    vae: dict[str, Any]


def _facts(cfg: ImagePlanConfig, info: PipelineInfo, elem: int) -> _Facts:
    shapes, profile = _profiled(
        info.folder.resolve(), cfg.resolution, cfg.rank, elem, cfg.max_sequence_length
    )
    text = [n for n in TEXT_ENCODERS if n in info.components]
    widths = [
        int(c.get("d_model") or c.get("hidden_size") or 0) for c in (component_config(info, n) for n in text)
    ]
    tokens = max(77, cfg.max_sequence_length)
    return _Facts(
        info,
        shapes,
        profile,
        component_params(info, "vae"),
        sum(component_params(info, n) for n in text),
        8 * tokens * max(widths, default=0) * 4,
        component_config(info, "vae"),
    )


@functools.lru_cache(maxsize=16)
def _profiled(
    folder: Path, resolution: int, rank: int, elem: int, max_sequence_length: int
) -> tuple[DenoiserShapes, ActivationProfile]:
    """The denoiser's shapes and a batch-1 step's activations (cached: a FLUX.1 meta forward takes ~2 s)."""
    import torch  # here, not at import: the app's start-up must not load torch

    info = identify_pipeline(folder)
    model = meta_denoiser(info)
    shapes = denoiser_shapes(info, model)
    dtype = torch.bfloat16 if elem == 2 else torch.float32
    profile = activation_profile(
        info, model, shapes, resolution, dtype=dtype, rank=rank, max_sequence_length=max_sequence_length
    )
    return shapes, profile


def _stage(name: str, parts: list[tuple[str, int]], cuda: bool) -> ImageStagePeak:
    c = PlannerConstants()
    tensors = sum(b for _, b in parts)
    runtime = (c.cuda_context_bytes if cuda else 0) + int(c.allocator_slack * tensors)
    return ImageStagePeak(name, (*((label, int(b)) for label, b in parts), ("runtime", runtime)))


def _fixed_stages(cfg: ImagePlanConfig, f: _Facts, elem: int, cuda: bool) -> list[ImageStagePeak]:
    s = f.shapes
    streamed = (s.outside_params + max(s.unit_params, default=0)) * elem
    biggest = max(s.compressed.values(), key=lambda oi: oi[0] * oi[1], default=(0, 0))
    widest_in = max((i for _, i in s.compressed.values()), default=0)
    cache = max(
        [("VAE (fp32)", f.vae_params * 4), ("VAE feature maps", vae_feature_bytes(f.vae, cfg.resolution, 4))],
        [("text encoders", f.text_params * elem), ("text working tensors", f.text_work)],
        key=lambda parts: sum(b for _, b in parts),
    )
    emulator = [
        ("original, streamed", streamed),
        ("calibration statistics", stats_pass_bytes(s, cfg.stats_budget_gib * GIB)),
        ("factorisation", 2 * biggest[0] * biggest[1] * 4 + 3 * widest_in * widest_in * 4),
        ("calibration forward", forward_bytes(f.profile, cfg.calibration_batch)),
    ]
    correct = [
        ("original, streamed", streamed),
        ("adapter (fp32)", lora_params(s, cfg.rank) * 4),
        ("held-out forward", forward_bytes(f.profile, cfg.eval_batch)),
        ("fp64 preparation", 3 * biggest[0] * biggest[1] * 8),
    ]
    return [
        _stage("cache", cache, cuda),
        _stage("emulator", emulator, cuda),
        _stage("correct", correct, cuda),
    ]


def _train_stage(cfg: ImagePlanConfig, f: _Facts, ratio: float, elem: int, cuda: bool) -> ImageStagePeak:
    weights = emulator_params(f.shapes, ratio) * elem
    step = [
        ("emulator", weights),
        ("LoRA + AdamW", lora_params(f.shapes, cfg.rank) * LORA_BYTES_PER_PARAM),
        ("activations", train_activation_bytes(f.profile, cfg.batch_size, checkpointing=cuda)),
    ]
    sampling = [
        ("emulator", weights),
        ("LoRA + AdamW", lora_params(f.shapes, cfg.rank) * LORA_BYTES_PER_PARAM),
        ("VAE + decode (samples)", f.vae_params * elem + vae_feature_bytes(f.vae, cfg.resolution, elem)),
    ]
    return _stage("train", max(step, sampling, key=lambda p: sum(b for _, b in p)), cuda)


def plan_images(cfg: ImagePlanConfig) -> ImagePlan:
    """Predict every stage's peak and choose ρ (module docstring). Never loads a weight.

    Raises:
        ModelNotFound, UnsupportedModel: not a supported pipeline folder.
    """
    info = identify_pipeline(cfg.pipeline_dir)
    cuda = cfg.device != "cpu"
    elem = 2 if cuda else 4
    f = _facts(cfg, info, elem)
    c = PlannerConstants()
    context = c.cuda_context_bytes if cuda else 0
    limit = int(cfg.budget_bytes - cfg.safety_margin * max(0, cfg.budget_bytes - context))
    fixed = _fixed_stages(cfg, f, elem, cuda)
    inference = _stage(
        "inference",
        [("denoiser", f.shapes.params * elem), ("forward", forward_bytes(f.profile, 1))],
        cuda,
    )
    ratios = (cfg.ratio,) if cfg.ratio is not None else cfg.ratios
    over = [s for s in fixed if s.peak_bytes > limit]
    chosen: float | None = None
    train = _train_stage(cfg, f, ratios[-1], elem, cuda)
    if not over:
        for r in ratios:
            train = _train_stage(cfg, f, r, elem, cuda)
            if train.peak_bytes <= limit:
                chosen = r
                break
    fits = chosen is not None
    stages = (fixed[0], fixed[1], train, fixed[2])
    reason = _reason(cfg, over, train, limit, chosen, ratios[-1])
    return ImagePlan(
        cfg,
        info.kind,
        chosen,
        fits,
        limit,
        stages,
        inference,
        f.profile.latent_tokens * cfg.batch_size,
        f.shapes.params,
        emulator_params(f.shapes, chosen if chosen is not None else ratios[-1]),
        reason,
    )


def _reason(
    cfg: ImagePlanConfig,
    over: list[ImageStagePeak],
    train: ImageStagePeak,
    limit: int,
    chosen: float | None,
    smallest: float,
) -> str:
    where = f"at {cfg.resolution}×{cfg.resolution}, batch {cfg.batch_size}"
    if chosen is not None:
        return (
            f"ρ = {chosen:g}: every stage fits {limit / GIB:.1f} GiB {where} "
            f"(training {train.peak_gib:.1f} GiB)."
        )
    short = over or [train]
    worst = max(short, key=lambda s: s.peak_bytes)
    what = f"the {worst.name} stage" + ("" if over else f" even at ρ = {smallest:g}")
    return (
        f"Nothing fits {limit / GIB:.1f} GiB {where}: {what} needs {worst.peak_gib:.1f} GiB, "
        f"{(worst.peak_bytes - limit) / GIB:.1f} GiB more than the budget allows."
    )


def plan_table(
    cfg: ImagePlanConfig,
    resolutions: tuple[int, ...] = RESOLUTIONS,
    batches: tuple[int, ...] = BATCHES,
) -> list[ImagePlan]:
    """The plan of every (resolution, batch) option, for ``emloc plan`` and the app.

    A resolution the denoiser cannot take (SD3's largest position embedding) is left out.
    """
    from dataclasses import replace

    plans = []
    for r in resolutions:
        try:
            plans += [plan_images(replace(cfg, resolution=r, batch_size=b)) for b in batches]
        except ConfigError:
            continue
    return plans


def format_image_plan(plan: ImagePlan) -> str:
    """One plan as text: ρ and every stage's peak with its parts."""
    lines = [f"{plan.kind} pipeline {plan.config.pipeline_dir}", plan.reason]
    for s in (*plan.stages, plan.inference):
        parts = ", ".join(f"{label} {b / GIB:.2f}" for label, b in s.parts)
        lines.append(f"  {s.name:<10} {s.peak_gib:7.2f} GiB  ({parts})")
    return "\n".join(lines)


def format_plan_table(plans: list[ImagePlan]) -> str:
    """The resolution × batch options as a table: ρ and the largest stage peak, or what is missing."""
    lines = ["resolution  batch  ρ      peak GiB  limiting stage"]
    for p in plans:
        worst = max(p.stages, key=lambda s: s.peak_bytes)
        rho = f"{p.ratio:<5g}" if p.ratio is not None else "none "
        note = (
            worst.name
            if p.fits
            else f"{worst.name}: {(worst.peak_bytes - p.limit_bytes) / GIB:.1f} GiB short"
        )
        lines.append(
            f"{p.config.resolution:>10}  {p.config.batch_size:>5}  {rho}  {p.peak_bytes / GIB:8.2f}  {note}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ a run's ρ
def plan_for_run(
    run: ImageRunConfig,
    budget_bytes: int | None = None,
    gpu_memory_bytes: int | None = None,
    machine: Any = None,
) -> ImagePlan:
    """The plan of an image run's settings on ``machine`` (default: this one).

    The budget is the text runs' (``budget_bytes``, else :func:`~emloc_engine.run.plan.machine_budget_bytes`
    with the ``gpu_memory_bytes`` cap); a single-file denoiser is planned from its ``config_dir``.
    """
    from emloc_engine.run.plan import bounding_gpu, machine_budget_bytes

    if machine is None:
        from emloc_engine.machine.hardware import detect_machine

        machine = detect_machine()
    if budget_bytes is None:
        budget_bytes = machine_budget_bytes(machine, run.device, 1, gpu_memory_bytes)
    on_gpu = bounding_gpu(machine, run.device, 1) is not None
    folder = run.pipeline_dir
    if Path(run.pipeline_dir).is_file() and run.config_dir is not None:
        # same family, so the folder's denoiser has the file's shapes
        check_config_dir(run.pipeline_dir, run.config_dir)
        folder = run.config_dir
    return plan_images(
        ImagePlanConfig(
            folder,
            int(budget_bytes),
            resolution=run.resolution,
            batch_size=run.batch_size,
            rank=run.rank,
            device="cuda" if on_gpu else "cpu",
            max_sequence_length=run.max_sequence_length,
        )
    )


def stored_ratio(run_dir: Path) -> float | None:
    """The ρ an existing run folder was started with (a resumed run keeps it), or None."""
    import json

    path = Path(run_dir) / "image_run.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text(encoding="utf-8")).get("ratio")
    return float(value) if value not in (None, "None") else None


__all__ = [
    "BATCHES",
    "RESOLUTIONS",
    "ImagePlan",
    "ImagePlanConfig",
    "ImageStagePeak",
    "emulator_params",
    "format_image_plan",
    "format_plan_table",
    "lora_params",
    "plan_for_run",
    "plan_images",
    "plan_table",
    "stored_ratio",
]
