"""The image planner: every image stage's GPU peak from the pipeline's configs, and the largest ρ that fits.

``plan_images(ImagePlanConfig(pipeline_dir, budget_bytes, resolution=1024, batch_size=1, rank=16))
-> ImagePlan``: no weight is loaded (the denoiser is built on the meta device from its config, the
text encoders and VAE are counted from their safetensors headers; :mod:`.plan_shapes`). The budget
is the text runs' (:func:`~emloc_engine.run.plan.machine_budget_bytes`: free memory or the
``--gpu-memory`` cap, less ``max(0.5 GiB, 5 %)``; or ``--budget-gib``), and every predicted part
must fit ``budget − margin × (budget − CUDA context)`` (the text planner's safety margin).

Formulas (bytes; ``b`` = 2 for bf16 on a GPU, 4 for fp32 on the CPU; ``B`` the batch; every stage
adds the CUDA context and 3 % allocator slack, :class:`~emloc_engine.run.planning.PlannerConstants`):

* **cache** (:mod:`.cache`): ``max(VAE, text)``: the VAE in fp32 (params × 4) plus what encoding one
  image holds (:func:`~.plan_shapes.vae_encode_bytes`, a meta encode: five full-resolution 128-channel
  maps at 1024², 2.5 GiB); then every text encoder at once in ``b`` (params × b) plus
  ``8 · tokens · width · 4`` of working tensors.
* **emulator** (:mod:`.emulator`): the original streamed block by block: the weights outside the
  blocks and the largest block in ``b`` (:mod:`.placement`: one block at a time, sent back even when
  a pass stops the forward); the statistics of the largest pass (:func:`stats_pass_bytes`: fp32, one
  ``in²`` per group of linears sharing an input, passes of whole blocks as :func:`~.emulator._passes`
  cuts them); then the larger of the calibration forward (:func:`forward_bytes`, ``calibration_batch``
  images) with the widest ``XᵀX`` product before it is added, and the factorisation (one normalised
  statistic, freed after its group's last module, and ``2 · out · in · 4`` of workspace).
* **train** (:mod:`.training`): the emulator resident in ``b`` (dense weights + ``k(out+in)+out``
  per compressed linear, ``k = ⌊ρ·out·in/(out+in)⌋``); LoRA ``r(out+in)`` per linear in fp32 with
  AdamW's two moments (12 bytes a parameter); the step (:func:`train_step_bytes`): ``B ×`` the peak
  of live tensors of a batch-1 forward and backward on the meta device with peft's LoRA attached and
  gradient checkpointing as on GPUs (activations, recomputed activations, their gradients, the LoRA
  gradients; :attr:`~.plan_shapes.ActivationProfile.step_bytes`). When the run samples
  (``sample_every``), drawing samples (the VAE in ``b`` decoding one image, LoRA gradients kept,
  16 bytes a parameter) must fit too. Anchored (``anchor="blocks"``, :mod:`.anchors`): the original's
  weights outside the blocks stay on the device (streamed), the offsets of one micro-batch are held
  (:func:`anchor_offset_bytes`: ``B ×`` the elements of every anchored block's output, from the meta
  forward, × ``b``), and before each training forward the original runs streamed, no grad: the peak is
  emulator + LoRA states + offsets + max(training step, the original's largest block + its forward).
* **correct** (:mod:`.correction`): the larger of the fp64 preparation of one module
  (``3 · out · in · 8``) and the λ search: the original streamed with its adapter (the largest block in
  ``b`` with its LoRA in fp32, the weights outside the blocks) and a no-grad forward of ``eval_batch``
  images.
* **inference** (for information: "can this card run the model"): the whole denoiser in ``b`` and a
  batch-1 forward.

The statistics budget of the emulator's passes (``stats_budget_gib``, unless given): the largest on the
grid ``4 · 1.25^k`` GiB whose emulator stage stays within the run's heaviest other stage (cache, train at
the chosen ρ, correct) and the budget, at least :data:`~.options.STATS_BUDGET_GIB`. It never raises the
run's peak; it cuts the passes, each of which streams the original through every calibration forward
again (FLUX.1-dev at 24 GiB: 4 passes instead of 22).

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
from emloc_engine.images.options import (
    RESOLUTIONS,
    STATS_BUDGET_GIB,
    AnchorMode,
    ImageRunConfig,
    check_anchor,
    run_default,
)
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
LORA_STATE_BYTES_PER_PARAM = 12  # fp32 weight + AdamW's two moments (the step's gradients: step_bytes)


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
    stats_budget_gib: float | None = field(default=run_default("stats_budget_gib"), metadata={
        "help": "Statistics per calibration pass, GiB (None: the largest the run's peak leaves room for)."})
    sample_every: int = field(default=run_default("sample_every"), metadata={
        "help": "Sample images every N training steps (0: never; then the VAE never joins training)."})
    safety_margin: float = field(default=0.1, metadata={"help": "Margin, a fraction of the budget."})
    anchor: AnchorMode = field(default=run_default("anchor"), metadata={
        "help": "Anchored training (none or blocks): the train stage also holds the offsets and runs the original."})
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
        if self.stats_budget_gib is not None and not self.stats_budget_gib > 0:
            problems.append(f"stats_budget_gib must be positive (got {self.stats_budget_gib})")
        problems += check_anchor(self.anchor)
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
    stats_budget_gib: float = STATS_BUDGET_GIB  # what the emulator's passes may hold (the run's setting)

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


def train_step_bytes(profile: ActivationProfile, batch: int) -> int:
    """What a training step holds beyond the weights, the adapter and its moments (module docstring).

    ``batch ×`` the batch-1 step's peak: the LoRA gradients in it do not grow with the batch, so this
    over-counts them ``batch − 1`` times (0.16 GiB each for SDXL at rank 16).
    """
    return batch * profile.step_bytes


def stats_pass_bytes(shapes: DenoiserShapes, profile: ActivationProfile, budget_bytes: float) -> int:
    """The largest calibration pass's statistics (fp32) as the emulator holds them.

    The passes are :func:`~emloc_engine.images.emulator._passes`' (whole blocks, each module's ``in²`` counted
    against ``stats_budget_gib``); what a pass holds is one ``in² · 4`` per statistic group in it (q/k/v
    share one), :attr:`~.plan_shapes.ActivationProfile.stat_groups`.
    """
    from emloc_engine.images.pipelines import BLOCK_PATTERN

    group_of = dict(profile.stat_group_of)
    blocks: dict[str, tuple[int, set[int]]] = {}
    for name, (_, in_f) in shapes.compressed.items():
        m = BLOCK_PATTERN.match(name)
        key = m.group(1) if m else name
        size, groups = blocks.get(key, (0, set()))
        blocks[key] = (size + in_f * in_f * 4, groups | ({group_of[name]} if name in group_of else set()))
    largest, used, held = 0, 0, set[int]()
    for size, groups in blocks.values():
        if used and used + size <= budget_bytes:
            used, held = used + size, held | groups
        else:
            used, held = size, set(groups)
        largest = max(largest, sum(profile.stat_groups[g] ** 2 * 4 for g in held))
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
    vae_encode: int


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
        _vae_encode(info.folder.resolve(), cfg.resolution),
    )


@functools.lru_cache(maxsize=16)
def _vae_encode(folder: Path, resolution: int) -> int:
    """:func:`~.plan_shapes.vae_encode_bytes` (cached: a meta encode at 1024² takes ~0.3 s)."""
    from emloc_engine.images.plan_shapes import vae_encode_bytes

    return vae_encode_bytes(identify_pipeline(folder), resolution)


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


def _heaviest(parts: list[list[tuple[str, int]]]) -> list[tuple[str, int]]:
    return max(parts, key=lambda p: sum(b for _, b in p))


def _emulator_stage(cfg: ImagePlanConfig, f: _Facts, elem: int, cuda: bool, stats_gib: float) -> ImageStagePeak:
    s = f.shapes
    biggest = max(s.compressed.values(), key=lambda oi: oi[0] * oi[1], default=(0, 0))
    widest_stat = max(f.profile.stat_groups, default=0) ** 2 * 4
    outside = s.outside_params * elem
    stats = stats_pass_bytes(s, f.profile, stats_gib * GIB)
    emulator = [
        ("outside the blocks", outside),
        ("one block (original, streamed)", max(s.unit_params, default=0) * elem),
        ("calibration statistics (pass)", stats),
        *_heaviest([
            [
                ("calibration forward", forward_bytes(f.profile, cfg.calibration_batch)),
                ("statistics product XᵀX", widest_stat),
            ],
            [
                ("normalised statistic", widest_stat),
                ("factorisation workspace", 2 * biggest[0] * biggest[1] * 4),
            ],
        ]),
    ]
    return _stage("emulator", emulator, cuda)


def _stats_gib(
    cfg: ImagePlanConfig, f: _Facts, elem: int, cuda: bool, room: int
) -> tuple[float, ImageStagePeak]:
    """The statistics budget (GiB) and its emulator stage: ``cfg.stats_budget_gib`` when given, else the largest
    on the grid ``STATS_BUDGET_GIB · 1.25^k`` (up to every statistic in one pass) whose emulator stage keeps
    within ``room``, and at least :data:`STATS_BUDGET_GIB` (module docstring)."""
    if cfg.stats_budget_gib is not None:
        return cfg.stats_budget_gib, _emulator_stage(cfg, f, elem, cuda, cfg.stats_budget_gib)
    best = (STATS_BUDGET_GIB, _emulator_stage(cfg, f, elem, cuda, STATS_BUDGET_GIB))
    every = sum(i * i * 4 for _, i in f.shapes.compressed.values()) / GIB
    gib = STATS_BUDGET_GIB
    while gib < every:
        gib *= 1.25
        stage = _emulator_stage(cfg, f, elem, cuda, gib)
        if stage.peak_bytes <= room:
            best = (gib, stage)
    return best


def _fixed_stages(cfg: ImagePlanConfig, f: _Facts, elem: int, cuda: bool) -> list[ImageStagePeak]:
    """The cache and correct stages (neither depends on ρ or on the statistics budget)."""
    s = f.shapes
    outside = s.outside_params * elem
    biggest = max(s.compressed.values(), key=lambda oi: oi[0] * oi[1], default=(0, 0))
    cache = _heaviest([
        [("VAE (fp32)", f.vae_params * 4), ("VAE encode (one image)", f.vae_encode)],
        [("text encoders", f.text_params * elem), ("text working tensors", f.text_work)],
    ])
    lora_dims = s.unit_lora_dims or (0,) * len(s.unit_params)
    block, block_lora = max(
        zip(s.unit_params, lora_dims, strict=True), key=lambda u: u[0] * elem + u[1] * cfg.rank * 4, default=(0, 0)
    )
    correct = _heaviest([
        [
            ("outside the blocks", outside),
            ("one block (original, streamed)", block * elem),
            ("its adapter (fp32)", block_lora * cfg.rank * 4),
            ("held-out forward", forward_bytes(f.profile, cfg.eval_batch)),
        ],
        [("fp64 preparation", 3 * biggest[0] * biggest[1] * 8)],
    ])
    return [_stage("cache", cache, cuda), _stage("correct", correct, cuda)]


def anchor_offset_bytes(profile: ActivationProfile, batch: int, elem: int) -> int:
    """Anchored training's offsets of one micro-batch: every anchored block's output, in the training dtype."""
    return batch * profile.anchor_out_numel * elem


def _train_stage(cfg: ImagePlanConfig, f: _Facts, ratio: float, elem: int, cuda: bool) -> ImageStagePeak:
    weights = emulator_params(f.shapes, ratio) * elem
    step_part = ("training step (activations, gradients)", train_step_bytes(f.profile, cfg.batch_size))
    anchored: list[tuple[str, int]] = []
    if cfg.anchor != "none":
        anchored = [("original outside the blocks (anchors)", f.shapes.outside_params * elem)]
        anchor_pass = [
            ("one block (original, streamed)", max(f.shapes.unit_params, default=0) * elem),
            ("original's forward (anchors)", forward_bytes(f.profile, cfg.batch_size)),
        ]
        step_parts = _heaviest([[step_part], anchor_pass])
        step_parts = [("anchor offsets", anchor_offset_bytes(f.profile, cfg.batch_size, elem)), *step_parts]
    else:
        step_parts = [step_part]
    step = [
        ("emulator", weights),
        ("LoRA + AdamW moments", lora_params(f.shapes, cfg.rank) * LORA_STATE_BYTES_PER_PARAM),
        *anchored,
        *step_parts,
    ]
    sampling = [
        ("emulator", weights),
        ("LoRA + AdamW", lora_params(f.shapes, cfg.rank) * LORA_BYTES_PER_PARAM),
        *anchored,
        ("VAE + decode (samples)", f.vae_params * elem + vae_feature_bytes(f.vae, cfg.resolution, elem)),
    ]
    return _stage("train", _heaviest([step, sampling] if cfg.sample_every > 0 else [step]), cuda)


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
    cache, correct = _fixed_stages(cfg, f, elem, cuda)
    floor_gib = cfg.stats_budget_gib if cfg.stats_budget_gib is not None else STATS_BUDGET_GIB
    fixed = [cache, _emulator_stage(cfg, f, elem, cuda, floor_gib), correct]
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
    stats_gib, emulator = floor_gib, fixed[1]
    if fits:
        room = min(limit, max(cache.peak_bytes, train.peak_bytes, correct.peak_bytes))
        stats_gib, emulator = _stats_gib(cfg, f, elem, cuda, room)
    stages = (cache, emulator, train, correct)
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
        stats_gib,
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
            sample_every=run.sample_every,
            anchor=run.anchor,
            stats_budget_gib=run.stats_budget_gib,
        )
    )


def with_plan(run: ImageRunConfig, plan: ImagePlan) -> ImageRunConfig:
    """``run`` with what its plan chose: ρ, and the emulator's statistics budget unless the run gives one.

    Raises:
        InsufficientMemory: the plan does not fit (its reason says which stage and by how much).
    """
    from dataclasses import replace

    plan.raise_if_unfit()
    assert plan.ratio is not None
    stats = run.stats_budget_gib if run.stats_budget_gib is not None else plan.stats_budget_gib
    return replace(run, ratio=plan.ratio, stats_budget_gib=stats)


def _stored(run_dir: Path, key: str) -> float | None:
    """A number the run folder's ``image_run.json`` was started with, or None (no run yet, or not set)."""
    import json

    path = Path(run_dir) / "image_run.json"
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get(key)
        return float(value) if value not in (None, "None") else None
    except (ValueError, TypeError, AttributeError) as exc:
        from emloc_engine.core.errors import ConfigError

        raise ConfigError(
            f"{path} is not a run's settings file: {key} is unreadable ({exc}).",
            hint="Restore the file, or start a new run folder (--out).",
        ) from exc


def stored_ratio(run_dir: Path) -> float | None:
    """The ρ an existing run folder was started with (a resumed run keeps it), or None."""
    return _stored(run_dir, "ratio")


def stored_stats_budget(run_dir: Path) -> float | None:
    """The emulator's statistics budget an existing run folder was started with (its plan's, or the user's), or
    None. A resumed run whose first call stopped during the build rebuilds with it, as the first call would have."""
    return _stored(run_dir, "stats_budget_gib")


__all__ = [
    "BATCHES",
    "RESOLUTIONS",
    "ImagePlan",
    "ImagePlanConfig",
    "ImageStagePeak",
    "anchor_offset_bytes",
    "emulator_params",
    "format_image_plan",
    "format_plan_table",
    "lora_params",
    "plan_for_run",
    "plan_images",
    "plan_table",
    "stored_ratio",
    "stored_stats_budget",
    "with_plan",
]
