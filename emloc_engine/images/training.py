"""Stage 2 for image models: DreamBooth-style LoRA on the emulator's denoiser.

``train_image_lora(ImageTrainConfig(...), progress) -> ImageTrainResult``: peft LoRA on every
compressed linear of the emulator (the adapter spans the whole composite ``u·v``, exactly as for text:
:mod:`~emloc_engine.stages.training.lora_layers`), trained on the cached latents and prompt
embeddings with the family's loss (:mod:`.families`: flow matching for FLUX/SD3, noise prediction
for SDXL). Each step draws a batch from one aspect bucket; with class images cached (prior
preservation) it adds ``prior_loss_weight`` × the same loss on a batch of class images. AdamW, a
constant learning rate after a linear warmup, weight decay 1e-4 and gradients clipped at norm 1 (the
DreamBooth scripts' defaults), LoRA weights in fp32.

Outputs in the run folder:

* ``image-checkpoints/step-N/state.pt`` every ``checkpoint_every`` steps (LoRA weights, optimizer,
  the pending data order and every RNG): rerunning the same call continues from the last one, and
  the continued run draws exactly what an uninterrupted one would.
* ``samples/step-N/{k}.png`` every ``sample_every`` steps: the cached sample prompts drawn by the
  pipeline whose denoiser is the emulator + LoRA (fixed seed per prompt; the VAE is loaded for
  this only; no text encoder: the prompts' embeddings are in the cache).
* ``adapter/``: the trained adapter as peft writes it (``adapter_config.json`` +
  ``adapter_model.safetensors``, keys ``base_model.model.<denoiser module>.lora_A.weight``), written
  to a temporary name and renamed.

Anchored training (``anchor="blocks"``, :mod:`.anchors`): the original denoiser is loaded into CPU
memory (in the training dtype) and every transformer block of the emulator is anchored to it on each
forward (the original streamed block by block on a GPU). Decision: opt-in (default ``"none"``). Its GPU
cost is measured (2026-12-07, H100, 1024², 10 steps: FLUX.1-dev 21.77 GiB and 50 s against 20.15 GiB and
20 s; SDXL 5.94 GiB and 20 s against 3.97 GiB and 11 s), and on the tiny CPU benchmark (ρ 0.5, three seeds)
it lifted the share of full LoRA's gain reaching the original from −87 % to 94 % (benchmarks/RESULTS.md,
"Image models"). It stays opt-in because that quality evidence is a tiny synthetic pipeline while the
paper's FLUX.1-dev DreamBooth trains unanchored, and because anchoring by default would lower the ρ the
planner picks (FLUX.1-dev in 24 GiB: 0.55 instead of 0.65, the plan's anchored train stage being 0.8 GiB
above the measured one). The
anchors are stateless (recomputed from each forward's inputs, no randomness), so resume stays exact.
Samples are drawn with the anchors paused: the emulator + LoRA, as without anchoring, at the sampling
cost and memory the planner counts.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emloc_engine.core.atomic import atomic_dir
from emloc_engine.core.errors import ConfigError
from emloc_engine.core.progress import NULL_PROGRESS, Progress
from emloc_engine.images.cache import ImageCache
from emloc_engine.images.emulator import load_image_emulator
from emloc_engine.images.families import NoiseSchedule, denoising_loss
from emloc_engine.images.options import AnchorMode, check_anchor, run_default
from emloc_engine.images.pipelines import PipelineInfo, scheduler_config
from emloc_engine.machine import devices
from emloc_engine.machine.process_memory import gpu_peak_gib, reset_gpu_peak
from emloc_engine.weights.lowrank import read_emulator_meta

CHECKPOINTS = "image-checkpoints"
SAMPLES = "samples"
ADAPTER = "adapter"


@dataclass(frozen=True)
class ImageTrainConfig:
    pipeline: PipelineInfo = field(metadata={"help": "The identified pipeline (what the adapter is for)."})
    cache_dir: Path = field(metadata={"help": "The encoded images and captions (RUN/cache)."})
    emulator_dir: Path = field(metadata={"help": "The denoiser's emulator (RUN/emulator)."})
    run_dir: Path = field(metadata={"help": "The run folder: adapter/, samples/ and checkpoints go here."})
    steps: int = field(default=500, metadata={"help": "Optimizer steps."})
    lr: float = field(default=1e-4, metadata={"help": "Learning rate (AdamW, constant after warmup)."})
    rank: int = field(default=16, metadata={"help": "LoRA rank r."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scale alpha / r)."})
    batch_size: int = field(default=1, metadata={"help": "Images per micro-batch (from one aspect bucket)."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    warmup: int = field(default=0, metadata={"help": "Linear warmup steps."})
    prior_loss_weight: float = field(
        default=1.0, metadata={"help": "Weight of the class images' loss (prior preservation)."}
    )
    checkpoint_every: int = field(
        default=100, metadata={"help": "Save a resumable checkpoint every N steps."}
    )
    sample_every: int = field(
        default=0, metadata={"help": "Draw the sample prompts every N steps (0: never)."}
    )
    sample_steps: int = field(default=28, metadata={"help": "Denoising steps of each sample image."})
    sample_resolution: int = field(
        default=0, metadata={"help": "Sample image size in pixels (0: the training resolution)."}
    )
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "Recompute activations in the backward (GPU only)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the adapter init, the data order and the noise."})
    device: str = field(default="auto", metadata={"help": "cuda, cuda:N, cpu or auto."})
    dtype: str = field(default="auto", metadata={"help": "Emulator weights: auto (bf16 on GPUs), float32..."})
    stop_after: int | None = field(
        default=None, metadata={"help": "Stop (resumably) after this many steps of this call."}
    )
    anchor: AnchorMode = field(
        default=run_default("anchor"),
        metadata={"help": "none, or blocks: every transformer block anchored to the original, online."},
    )

    def __post_init__(self) -> None:
        problems = [
            f"{k} must be at least 1 (got {getattr(self, k)})"
            for k in ("steps", "rank", "batch_size", "grad_accum", "checkpoint_every", "sample_steps")
            if getattr(self, k) < 1
        ]
        if not self.lr > 0:
            problems.append(f"lr must be positive (got {self.lr})")
        if self.sample_every < 0 or self.warmup < 0 or self.prior_loss_weight < 0:
            problems.append("sample_every, warmup and prior_loss_weight must not be negative")
        problems += check_anchor(self.anchor)
        if problems:
            raise ConfigError("Invalid image training settings.", problems=problems)


@dataclass(frozen=True)
class ImageTrainResult:
    adapter_dir: Path
    losses: tuple[float, ...]
    steps_done: int
    resumed_from: int
    samples: tuple[Path, ...]
    wall_s: float
    peak_vram_gib: float


class BucketSampler:
    """Batches of item indices, each from one bucket; an epoch is every bucket's shuffled items."""

    def __init__(
        self, buckets: dict[tuple[int, int], list[int]], batch_size: int, rng: random.Random
    ) -> None:
        self.buckets, self.batch_size, self.rng = buckets, batch_size, rng
        self.pending: list[list[int]] = []

    def next(self) -> list[int]:
        if not self.pending:
            for items in self.buckets.values():
                order = list(items)
                self.rng.shuffle(order)
                self.pending += [
                    order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)
                ]
            self.rng.shuffle(self.pending)
        return self.pending.pop()


def lora_targets(emulator_dir: Path) -> list[str]:
    """The emulator's compressed modules: what the LoRA adapts."""
    return sorted(read_emulator_meta(emulator_dir)["modules"])


def attach_image_lora(model: Any, targets: list[str], rank: int, alpha: float, base_path: str) -> Any:
    """peft LoRA (no task type) on ``targets`` of a denoiser, LowRankLinear included; returns the PeftModel."""
    from emloc_engine.stages.training.lora_layers import attach_lora, lora_config

    config = lora_config(rank, alpha, 0.0, targets, False, base_path)
    config.task_type = None
    return attach_lora(model, config)


def train_image_lora(cfg: ImageTrainConfig, progress: Progress = NULL_PROGRESS) -> ImageTrainResult:
    """Train the LoRA on the emulator (module docstring); rerunning resumes from the last checkpoint.

    Raises:
        ConfigError, ModelNotFound: bad settings or folders.
        Cancelled: at a step boundary; the last checkpoint is kept.
    """
    t0 = time.monotonic()
    info = cfg.pipeline
    device = devices.resolve_device(cfg.device)
    dtype = devices.compute_dtype(device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    denoiser = load_image_emulator(cfg.emulator_dir, dtype=dtype, device=device)
    peft_model = attach_image_lora(
        denoiser, lora_targets(cfg.emulator_dir), cfg.rank, cfg.alpha, str(info.folder.resolve())
    )
    model = peft_model.get_base_model()
    if cfg.gradient_checkpointing and device.type == "cuda":
        model.enable_gradient_checkpointing()
    anchors = _attach_anchors(cfg, peft_model, dtype, device)
    try:
        with without_cudnn_attention():
            return _train(cfg, progress, peft_model, model, anchors, device, dtype, t0)
    finally:
        if anchors is not None:
            anchors.close()


@contextlib.contextmanager
def without_cudnn_attention() -> Iterator[None]:
    """Training with PyTorch's cuDNN attention kernel switched off (flash / memory-efficient attention instead),
    the previous setting restored after.

    FLUX.1-dev's joint attention (24 heads of 128 over 4,096 image + 512 text tokens at 1024²) in bf16 on an H100 (torch 2.11,
    2026-12-07) made cuDNN's attention backward fail: ``mha_graph.execute(...) is_good()`` under
    ``CUDA_LAUNCH_BLOCKING=1``, an illegal memory access or a non-finite loss at step 2 without it. With the
    kernel off the same run trained 10 finite steps in 20.1 GiB. The setting is process-wide because gradient
    checkpointing recomputes the forward inside ``backward()``, where a context around the forward alone
    would not reach.
    """
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


def _attach_anchors(cfg: ImageTrainConfig, peft_model: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """:class:`~.anchors.OnlineBlockAnchors` to the original (kept in CPU memory) when ``cfg.anchor`` says so."""
    if cfg.anchor == "none":
        return None
    from emloc_engine.images.anchors import OnlineBlockAnchors
    from emloc_engine.images.pipelines import load_denoiser

    original = load_denoiser(cfg.pipeline, dtype=dtype, device=torch.device("cpu"))
    return OnlineBlockAnchors(original, peft_model, device)


def _train(
    cfg: ImageTrainConfig,
    progress: Progress,
    peft_model: Any,
    model: Any,
    anchors: Any,
    device: torch.device,
    dtype: torch.dtype,
    t0: float,
) -> ImageTrainResult:
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    info = cfg.pipeline
    cache = ImageCache(cfg.cache_dir)
    schedule = NoiseSchedule(info.kind, scheduler_config(info))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    rng = random.Random(cfg.seed)
    instance = BucketSampler(cache.buckets("train"), cfg.batch_size, rng)
    prior = BucketSampler(cache.buckets("class"), cfg.batch_size, rng) if cache.indices("class") else None
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    ckpt_dir = cfg.run_dir / CHECKPOINTS
    start, losses = 0, []
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None:
        state = torch.load(latest / "state.pt", weights_only=True)  # a checkpoint folder never runs code
        set_peft_model_state_dict(peft_model, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        rng.setstate(state["rng"])
        gen.set_state(state["gen"])
        instance.pending = state["instance_pending"]
        if prior is not None:
            prior.pending = state["prior_pending"]
        start, losses = int(state["step"]), list(state["losses"])
    resumed_from, step = start, start
    samples: list[Path] = []
    reset_gpu_peak(device)
    peft_model.train()
    while step < cfg.steps and (cfg.stop_after is None or step - resumed_from < cfg.stop_after):
        progress.check_cancelled()
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(cfg.grad_accum):
            loss = _micro_loss(info.kind, model, schedule, cache, instance.next(), gen, device, dtype)
            if prior is not None and cfg.prior_loss_weight > 0:
                loss = loss + cfg.prior_loss_weight * _micro_loss(
                    info.kind, model, schedule, cache, prior.next(), gen, device, dtype
                )
            (loss / cfg.grad_accum).backward()
            total += float(loss.detach()) / cfg.grad_accum
        if not math.isfinite(total):
            raise ConfigError(
                f"The training loss became {total} at step {step + 1}.",
                hint="Lower the learning rate, or train in float32.",
            )
        # A finite loss can still give non-finite gradients; clipping would spread them and the optimizer would
        # write them into every LoRA weight, to be seen only as the next step's nan loss. Stop here instead,
        # before the update: the adapter and the last checkpoint stay as they were.
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        if not math.isfinite(grad_norm):
            raise ConfigError(
                f"The gradients became {grad_norm} at step {step + 1} (the loss was {total:.4g}); "
                "no update was applied.",
                hint="Lower the learning rate, or train in float32.",
            )
        progress.log("train/grad_norm", grad_norm, step + 1)
        optimizer.step()
        step += 1
        losses.append(total)
        progress.log("train/loss", total, step)
        progress.update(step / cfg.steps, f"step {step}/{cfg.steps}, loss {total:.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_checkpoint(
                ckpt_dir / f"step-{step}",
                {
                    "step": step,
                    "losses": losses,
                    "lora": get_peft_model_state_dict(peft_model),
                    "optimizer": optimizer.state_dict(),
                    "rng": rng.getstate(),
                    "gen": gen.get_state(),
                    "instance_pending": instance.pending,
                    "prior_pending": prior.pending if prior else [],
                },
            )
        if (
            cfg.sample_every
            and (step % cfg.sample_every == 0 or step == cfg.steps)
            and cache.meta["sample_prompts"]
        ):
            peft_model.eval()
            with anchors.paused() if anchors is not None else contextlib.nullcontext():
                samples += draw_samples(
                    info,
                    model,
                    cache,
                    cfg.run_dir / SAMPLES / f"step-{step}",
                    device,
                    dtype,
                    cfg.sample_steps,
                    cfg.sample_resolution or int(cache.meta["resolution"]),
                    cfg.seed,
                )
            peft_model.train()
    peft_model.eval()
    adapter_dir = cfg.run_dir / ADAPTER
    if step >= cfg.steps:
        with atomic_dir(adapter_dir, overwrite=True) as tmp:
            peft_model.save_pretrained(str(tmp))
    peak = gpu_peak_gib(device)
    return ImageTrainResult(
        adapter_dir, tuple(losses), step, resumed_from, tuple(samples), time.monotonic() - t0, peak
    )


def _micro_loss(
    kind: Any,
    model: Any,
    schedule: NoiseSchedule,
    cache: ImageCache,
    idx: list[int],
    gen: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    x0 = cache.latents(idx, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    indices = schedule.sample_indices(len(idx), gen)
    cond = {k: v.to(device, dtype) for k, v in cache.cond(idx).items()}
    return denoising_loss(kind, model, schedule, x0.to(device, dtype), noise.to(device, dtype), indices, cond)


def latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(
        (p for p in folder.glob("step-*") if (p / "state.pt").is_file()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    return done[-1] if done else None


def _save_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    with atomic_dir(folder, overwrite=True) as tmp:
        torch.save(state, tmp / "state.pt")


# ------------------------------------------------------------------------------------------ samples
def draw_samples(
    info: PipelineInfo,
    denoiser: Any,
    cache: ImageCache,
    out_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    steps: int,
    resolution: int,
    seed: int,
) -> list[Path]:
    """Draw every cached sample prompt with ``denoiser`` (the emulator + LoRA) into ``out_dir/{k}.png``.

    The pipeline gets the cached prompt embeddings (no text encoder is loaded); FLUX.1 uses its
    guidance embedding (3.5), SD3 and SDXL classifier-free guidance 5.0 against the empty prompt.
    """
    from emloc_engine.images.pipelines import load_pipeline

    encoders = tuple(n for n in info.components if n.startswith("text_encoder"))
    pipe = load_pipeline(info, without=encoders, dtype=torch.float32, **{info.denoiser: denoiser})
    pipe.vae.to(device=device, dtype=dtype)
    multiple = int(cache.meta["side_multiple"])
    side = max(multiple, resolution // multiple * multiple)
    paths = []
    try:
        with atomic_dir(out_dir, overwrite=True) as tmp:
            for k, prompt in enumerate(cache.meta["sample_prompts"]):
                cond, neg = cache.prompt_cond(prompt, (side, side)), cache.prompt_cond("", (side, side))
                kw: dict[str, Any] = {
                    "prompt_embeds": cond["embeds"].to(device, dtype),
                    "pooled_prompt_embeds": cond["pooled"].to(device, dtype),
                }
                if info.kind == "flux":
                    kw["guidance_scale"] = 3.5
                else:
                    kw.update(
                        guidance_scale=5.0,
                        negative_prompt_embeds=neg["embeds"].to(device, dtype),
                        negative_pooled_prompt_embeds=neg["pooled"].to(device, dtype),
                    )
                with torch.no_grad():
                    image = pipe(
                        height=side,
                        width=side,
                        num_inference_steps=steps,
                        generator=torch.Generator().manual_seed(seed + k),
                        **kw,
                    ).images[0]
                image.save(tmp / f"{k}.png")
                paths.append(out_dir / f"{k}.png")
    finally:
        pipe.vae.to("cpu")
    return paths


__all__ = ["ImageTrainConfig", "ImageTrainResult", "attach_image_lora", "draw_samples", "train_image_lora"]
