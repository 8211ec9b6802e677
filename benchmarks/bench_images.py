"""Image-model memory benchmark (issue 23): every EMLoC stage's GPU peak and time under a memory cap, and plain LoRA's.

Random bf16 weights of the real shapes (speed and memory do not depend on the values), built from
configs, nothing downloaded:

* ``flux-dev``: FLUX.1-dev's transformer (19 double + 38 single blocks, 3072 wide, guidance
  embedding; 11.9 B parameters, written straight to safetensors shards without initialising a
  module), its VAE, CLIP-L; T5 is 4096 wide with 2 layers unless ``--full-text-encoders`` (T5-XXL's
  24 layers: 4.7 B parameters, only the cache stage uses it).
* ``sdxl``: SDXL base's UNet (2.6 B), VAE, CLIP-L and OpenCLIP-bigG text encoders (real sizes).
* ``tiny-flux`` / ``tiny-sdxl``: the test pipelines (a CPU smoke run of this script).

Stages, one after the other on one GPU, each under ``torch.cuda.set_per_process_memory_fraction``
(``--cap-gib``; an out-of-memory error is recorded as ``"oom"``, not raised):

1. ``inference``: the original denoiser resident in bf16, one forward at the resolution (what "can
   run the model" means);
2. ``cache``: text encoders (bf16) and VAE (fp32) encode the images and captions once;
3. ``emulator``: activation-aware SVD at ``--ratio`` (original streamed block by block);
4. ``train``: LoRA (rank 16) on the emulator, ``--steps`` steps, batch 1, gradient checkpointing;
5. ``correct``: λ search with the original streamed block by block;
6. ``plain_lora``: the same LoRA on the ORIGINAL denoiser resident in bf16 with gradient
   checkpointing, ``--steps`` steps, first under the cap, then (if that ran out of memory) without it,
   to report its real peak;
7. ``train_anchored`` (only with ``--anchor``): ``train`` again from scratch, every block anchored to the
   original (``anchor="blocks"``: the original in CPU memory, streamed through the GPU on every step).

Prints one JSON object (also written to ``--out``). Commands (H200 or H100; about 15-25 minutes for
flux-dev, most of it writing and reading the 24 GB random transformer):

    python benchmarks/bench_images.py --model flux-dev --cap-gib 24 --resolution 1024 --work /tmp/img-bench
    python benchmarks/bench_images.py --model sdxl --cap-gib 12 --resolution 1024 --work /tmp/img-bench
    python benchmarks/bench_images.py --model tiny-flux --device cpu --resolution 32 --work /tmp/img-tiny
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.image_shapes import FLUX_DEV, SDXL_UNET, VAE
from emloc_engine.core.errors import ConfigError
from emloc_engine.images.cache import CacheConfig, ImageCache, build_cache
from emloc_engine.images.correction import ImageCorrectionConfig, correct_image_adapter
from emloc_engine.images.dataset import ImageFolderConfig, scan_image_folder
from emloc_engine.images.emulator import ImageEmulatorConfig, build_image_emulator
from emloc_engine.images.families import NoiseSchedule, denoising_loss
from emloc_engine.images.pipelines import PipelineInfo, identify_pipeline, load_denoiser, scheduler_config
from emloc_engine.images.training import (
    ADAPTER,
    CHECKPOINTS,
    ImageTrainConfig,
    attach_image_lora,
    lora_targets,
    train_image_lora,
)
from emloc_engine.weights.lowrank import EMULATOR_META, read_emulator_meta
from tests.tiny_pipelines import (
    build_tiny_pipeline,
    clip_text_config,
    make_clip_tokenizer,
    make_t5_tokenizer,
    t5_encoder_config,
    write_subject_images,
)

SHARD_BYTES = 5 * 2**30


def _random_denoiser(cls: Any, config: dict[str, Any], folder: Path) -> None:
    """Write ``cls(**config)``'s tensors as random bf16 safetensors shards + index, never building the module."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    with init_empty_weights():
        model = cls(**config)
    model.save_config(folder)
    where = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU draws 12 B normals in seconds, a CPU in minutes
    gen = torch.Generator(where).manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    shards: list[dict[str, torch.Tensor]] = []
    size = 0
    for name, p in model.state_dict().items():
        std = 0.02 if p.dim() >= 2 else 0.0
        t = (
            (torch.randn(p.shape, generator=gen, device=where, dtype=torch.bfloat16) * std).cpu()
            if std
            else torch.ones(p.shape, dtype=torch.bfloat16)
        )
        if name.endswith("bias"):
            t.zero_()
        shard[name] = t
        size += t.numel() * 2
        if size >= SHARD_BYTES:
            shards.append(shard)
            shard, size = {}, 0
    if shard:
        shards.append(shard)
    weight_map = {}
    for i, part in enumerate(shards):
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    index = {
        "metadata": {"total_size": sum(t.numel() * 2 for s in shards for t in s.values())},
        "weight_map": weight_map,
    }
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


def build_pipeline(model: str, work: Path, full_text: bool) -> Path:
    """The pipeline folder of ``model`` (reused when complete)."""
    if model.startswith("tiny-"):
        return build_tiny_pipeline(model.removeprefix("tiny-"), work / "hub", weight_std=0.1)
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    folder = work / model
    if (folder / "model_index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    clip_l = clip_text_config(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    if model == "flux-dev":
        denoiser = ("transformer", diffusers.FluxTransformer2DModel, FLUX_DEV)
        t5 = t5_encoder_config(
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=24 if full_text else 2,
            num_heads=64,
            feed_forward_proj="gated-gelu",
        )
        parts = dict(
            text_encoder=CLIPTextModel(clip_l).to(torch.bfloat16),
            text_encoder_2=T5EncoderModel(t5).to(torch.bfloat16),
            tokenizer=make_clip_tokenizer(),
            tokenizer_2=make_t5_tokenizer(),
            vae=diffusers.AutoencoderKL(
                **VAE,
                latent_channels=16,
                scaling_factor=0.3611,
                shift_factor=0.1159,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(
                shift=3.0,
                use_dynamic_shifting=True,
                base_shift=0.5,
                max_shift=1.15,
                base_image_seq_len=256,
                max_image_seq_len=4096,
            ),
        )
        pipe_cls: Any = diffusers.FluxPipeline
    else:
        big_g = clip_text_config(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            projection_dim=1280,
            hidden_act="gelu",
        )
        denoiser = ("unet", diffusers.UNet2DConditionModel, SDXL_UNET)
        parts = dict(
            text_encoder=CLIPTextModel(clip_l).to(torch.bfloat16),
            text_encoder_2=CLIPTextModelWithProjection(big_g).to(torch.bfloat16),
            tokenizer=make_clip_tokenizer(),
            tokenizer_2=make_clip_tokenizer(),
            vae=diffusers.AutoencoderKL(**VAE, latent_channels=4, scaling_factor=0.13025),
            scheduler=diffusers.EulerDiscreteScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                timestep_spacing="leading",
                steps_offset=1,
            ),
        )
        pipe_cls = diffusers.StableDiffusionXLPipeline
    name, cls, config = denoiser
    (folder / name).mkdir(exist_ok=True)
    _random_denoiser(cls, config, folder / name)
    index: dict[str, Any] = {
        "_class_name": pipe_cls.__name__,
        "_diffusers_version": diffusers.__version__,
        name: ["diffusers", cls.__name__],
    }
    for comp, part in parts.items():
        part.save_pretrained(folder / comp)
        lib = "diffusers" if type(part).__module__.startswith("diffusers") else "transformers"
        index[comp] = [lib, type(part).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


STAGES = ("cache", "inference", "emulator", "train", "correct", "plain_lora", "train_anchored")  # in run order
PARTIAL: list[Path] = []  # rewritten after every stage: --out's path with .partial.json, and WORK/results-MODEL.json


def measure(name: str, fn: Callable[[], Any], device: torch.device, results: dict[str, Any]) -> Any:
    """Run one stage; record its peak GiB and seconds, or ``"oom"``."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.monotonic()
    try:
        out = fn()
    except torch.cuda.OutOfMemoryError as exc:
        results[name] = {
            "peak_gib": "oom",
            "wall_s": round(time.monotonic() - t0, 1),
            "error": str(exc)[:200],
        }
        return None
    except ConfigError as exc:  # e.g. a non-finite training loss: recorded, and the later stages still run
        results[name] = {"peak_gib": "error", "wall_s": round(time.monotonic() - t0, 1), "error": str(exc)[:300]}
        if device.type == "cuda":  # the steps before the failure are whole steps: their peak is the stage's
            results[name]["peak_before_error_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        print(name, results[name], flush=True)
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    results[name] = {"peak_gib": round(peak, 3), "wall_s": round(time.monotonic() - t0, 1)}
    print(name, results[name], flush=True)
    for path in PARTIAL:  # a device call cut off later still returns the stages done so far
        path.write_text(json.dumps(results, indent=2) + "\n")
    return out


def _cap(device: torch.device, cap_gib: float | None) -> None:
    """Cap this process's GPU memory at ``cap_gib`` (None: the whole card)."""
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = 1.0 if cap_gib is None else min(1.0, cap_gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device.index or 0)


def inference(info: PipelineInfo, cache_dir: Path, device: torch.device, dtype: torch.dtype) -> None:
    model = load_denoiser(info, dtype=dtype, device=device)
    cache = ImageCache(cache_dir)
    sched = NoiseSchedule(info.kind, scheduler_config(info))
    idx = cache.indices("train")[:1]
    x0 = cache.latents(idx, sample=False).to(device, dtype)
    cond = {k: v.to(device, dtype) for k, v in cache.cond(idx).items()}
    with torch.inference_mode():
        denoising_loss(
            info.kind, model, sched, x0, torch.randn_like(x0), sched.fractions_to_indices([0.5]), cond
        )
    del model


def plain_lora(
    info: PipelineInfo,
    cache_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    steps: int,
    targets: list[str],
) -> float:
    model = load_denoiser(info, dtype=dtype, device=device)
    if device.type == "cuda":
        model.enable_gradient_checkpointing()
    peft_model = attach_image_lora(model, targets, 16, 16.0, str(info.folder))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    cache = ImageCache(cache_dir)
    sched = NoiseSchedule(info.kind, scheduler_config(info))
    base = peft_model.get_base_model()
    base.train()
    loss = math.nan
    for step in range(steps):
        idx = [cache.indices("train")[step % len(cache.indices("train"))]]
        x0 = cache.latents(idx).to(device, dtype)
        cond = {k: v.to(device, dtype) for k, v in cache.cond(idx).items()}
        out = denoising_loss(info.kind, base, sched, x0, torch.randn_like(x0), sched.sample_indices(1), cond)
        out.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(out)
    del peft_model, model, opt
    return loss


def _block_probe(model: Any, names: list[str]) -> tuple[dict[str, float], list[Any]]:
    """Forward hooks recording each named block's first output's largest magnitude (``inf``/``nan`` kept)."""
    seen: dict[str, float] = {}

    def hook(name: str) -> Any:
        def fn(_m: Any, _a: Any, out: Any) -> None:
            t = out[0] if isinstance(out, tuple) else out
            if isinstance(t, torch.Tensor) and name not in seen:  # the first forward, not a checkpoint's recompute
                seen[name] = float(t.detach().float().abs().amax())

        return fn

    return seen, [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]


def nan_probe(info: PipelineInfo, cache_dir: Path, emulator_dir: Path, device: torch.device,
              dtype: torch.dtype) -> dict[str, Any]:
    """Where a non-finite training loss comes from: on one training batch, every block output's largest magnitude
    in the emulator (LoRA attached, as trained) and in the original (streamed), the loss, and after one backward
    the LoRA gradients that are not finite, by block. Evidence for RESULTS.md, not a stage."""
    from emloc_engine.images.anchors import anchored_block_names
    from emloc_engine.images.emulator import load_image_emulator
    from emloc_engine.images.placement import streamed
    from emloc_engine.images.training import without_cudnn_attention

    cache = ImageCache(cache_dir)
    sched = NoiseSchedule(info.kind, scheduler_config(info))
    gen = torch.Generator().manual_seed(1)
    idx = cache.indices("train")[:1]
    x0 = cache.latents(idx, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    ind = sched.sample_indices(1, gen)
    cond = {k: v.to(device, dtype) for k, v in cache.cond(idx).items()}
    out: dict[str, Any] = {"timestep_index": int(ind[0])}
    emu = load_image_emulator(emulator_dir, dtype=dtype, device=device)
    peft_model = attach_image_lora(emu, lora_targets(emulator_dir), 16, 16.0, str(info.folder))
    base = peft_model.get_base_model()
    base.enable_gradient_checkpointing()
    base.train()
    names = anchored_block_names(base)
    seen, handles = _block_probe(base, names)
    with without_cudnn_attention():  # as training does (its docstring: cuDNN's attention backward on FLUX.1-dev)
        loss = denoising_loss(info.kind, base, sched, x0.to(device, dtype), noise.to(device, dtype), ind, cond)
        loss.backward()
    for h in handles:
        h.remove()
    bad = sorted({n.split(".lora_")[0] for n, p in peft_model.named_parameters()
                  if p.grad is not None and not bool(torch.isfinite(p.grad).all())})
    out["emulator"] = {"loss": float(loss.detach()), "block_amax": [seen.get(n) for n in names],
                       "nonfinite_grads": len(bad), "first_nonfinite_grads": bad[:5]}
    del peft_model, base, emu, loss
    torch.cuda.empty_cache()
    original = load_denoiser(info, dtype=dtype, device=torch.device("cpu"))
    with streamed(original, device) as live, torch.no_grad():
        seen, handles = _block_probe(live, names)
        ref = denoising_loss(info.kind, live, sched, x0.to(device, dtype), noise.to(device, dtype), ind, cond)
        for h in handles:
            h.remove()
    out["original"] = {"loss": float(ref), "block_amax": [seen.get(n) for n in names]}
    out["blocks"] = names
    errors = {k: v["rel_error"] for k, v in read_emulator_meta(emulator_dir)["modules"].items()}
    worst = max(errors, key=lambda k: errors[k])
    out["emulator_rel_error"] = {"mean": sum(errors.values()) / len(errors), "max": errors[worst], "worst": worst}
    return out


def predicted(info: PipelineInfo, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The image planner's prediction for this benchmark's settings, to check against the measured peaks.

    ``predicted_allocated_gib`` leaves out the CUDA context (not in ``max_memory_allocated``, which the
    stages' ``peak_gib`` are); ``planned_ratio`` is the ρ the planner picks under ``--cap-gib`` as budget;
    ``stats_budget_gib`` is the plan's statistics budget per emulator pass, which the build then uses.
    """
    from dataclasses import replace

    from emloc_engine.images.planning import ImagePlanConfig, plan_images
    from emloc_engine.run.planning import PlannerConstants

    budget = int((args.cap_gib or 1024) * 2**30)
    cfg = ImagePlanConfig(
        info.folder,
        budget,
        resolution=args.resolution,
        rank=16,
        ratio=args.ratio,
        device=device.type,
        calibration_batch=args.batch,
        eval_batch=args.batch,
        sample_every=0,  # train_image_lora below draws no samples
    )
    plan = plan_images(cfg)
    context = PlannerConstants().cuda_context_bytes / 2**30 if device.type == "cuda" else 0.0
    peaks = plan.predicted_peaks_gib()
    if args.anchor:  # the anchored plan's train stage, as the train_anchored stage's prediction
        peaks["train_anchored"] = plan_images(replace(cfg, anchor="blocks")).predicted_peaks_gib()["train"]
    return {
        "predicted_gib": peaks,
        "predicted_allocated_gib": {k: round(v - context, 3) for k, v in peaks.items()},
        "planned_ratio": plan_images(replace(cfg, ratio=None)).ratio,
        "stats_budget_gib": plan.stats_budget_gib,  # the emulator build's, as the run takes it from its plan
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("flux-dev", "sdxl", "tiny-flux", "tiny-sdxl"), required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--cap-gib", type=float, default=None, help="GPU memory cap (default: none)")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1,
                    help="calibration and held-out forwards per batch (the run's default is 4; each batch "
                         "streams the original once)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--full-text-encoders", action="store_true")
    ap.add_argument("--skip", nargs="*", choices=STAGES, default=[],
                    help="stages not to measure (a stage a later one needs still runs unmeasured)")
    ap.add_argument("--anchor", action="store_true",
                    help="also measure anchored training (train_anchored: every block anchored to the original)")
    ap.add_argument("--from-stage", choices=STAGES, default="cache",
                    help="measure from this stage on; the earlier ones ran in an earlier call on this machine "
                         "(same --work; their numbers come from WORK/results-MODEL.json)")
    ap.add_argument("--last-stage", choices=STAGES, default=STAGES[-1],
                    help="stop after this stage, for a short device call")
    ap.add_argument("--probe", action="store_true",
                    help="when training stops on a non-finite loss, record where it came from (nan_probe)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    global PARTIAL
    kept = args.work / f"results-{args.model}.json"  # what a later call on this machine adds its stages to
    PARTIAL = [kept, *([args.out.with_suffix(".partial.json")] if args.out else [])]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "model": args.model,
        "resolution": args.resolution,
        "ratio": args.ratio,
        "cap_gib": args.cap_gib,
        "steps": args.steps,
    }
    if args.from_stage != "cache" and kept.is_file():  # a later call on this machine adds its stages
        results = {**json.loads(kept.read_text()), **results}
    t0 = time.monotonic()
    info = identify_pipeline(build_pipeline(args.model, work, args.full_text_encoders))
    results["build_s"] = round(time.monotonic() - t0, 1)
    if device.type == "cuda":
        results["device"] = torch.cuda.get_device_name(device)
        _cap(device, args.cap_gib)
    results.update(predicted(info, args, device))
    images = write_subject_images(work / "images", args.images, size=(args.resolution, args.resolution))
    items = scan_image_folder(ImageFolderConfig(images[0].parent, trigger="sks", min_side_px=16)).items
    run = work / f"run-{args.model}"
    first, last = STAGES.index(args.from_stage), STAGES.index(args.last_stage)
    # a training stage measured again on a machine that ran it before would resume from its finished checkpoint
    # and measure nothing (2026-12-07: 4 s and 17.6 GiB for FLUX.1-dev's 10 steps): it starts from scratch
    outputs = {"train": [run / CHECKPOINTS, run / ADAPTER], "train_anchored": [work / f"run-{args.model}-anchored"]}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        """Measure ``name`` when it is in --from-stage..--last-stage; before that range an earlier call on
        this machine made its outputs: a complete emulator (its ``emloc.json`` is written last) is reused, an
        incomplete one rebuilt unmeasured. (Until 2026-12-07 a later call always rebuilt it, in its own process,
        before the stages it measured: 118 s for FLUX.1-dev.)"""
        i = STAGES.index(name)
        if name in args.skip and name != "emulator":
            return None
        if i < first:
            return fn() if name == "emulator" and not (run / "emulator" / EMULATOR_META).is_file() else None
        if i > last:
            return None
        for path in outputs.get(name, []):
            shutil.rmtree(path, ignore_errors=True)
        return measure(name, fn, device, results)

    cache = stage(
        "cache",
        lambda: build_cache(
            CacheConfig(
                info,
                run / "cache",
                items,
                sample_prompts=(),
                resolution=args.resolution,
                max_sequence_length=512,
                device=args.device,
            )
        ),
    )
    cache_dir = run / "cache"
    stage("inference", lambda: inference(info, cache_dir, device, dtype))
    emu = stage(
        "emulator",
        lambda: build_image_emulator(
            ImageEmulatorConfig(
                info,
                cache_dir,
                run / "emulator",
                ratio=args.ratio,
                calibration_images=args.images,
                calibration_timesteps=4,
                calibration_batch=args.batch,
                stats_budget_gib=results["stats_budget_gib"],
                device=args.device,
            )
        ),
    )
    if emu is not None and first <= STAGES.index("emulator"):
        results["emulator"].update(
            params_kept=emu.params_kept, params_original=emu.params_original, passes=emu.passes
        )
    trained = stage(
        "train",
        lambda: train_image_lora(
            ImageTrainConfig(
                info,
                cache_dir,
                run / "emulator",
                run,
                steps=args.steps,
                rank=16,
                alpha=16.0,
                checkpoint_every=args.steps,
                device=args.device,
            )
        ),
    )
    if trained is not None:
        results["train"].update(losses=[round(x, 4) for x in trained.losses], resumed_from=trained.resumed_from)
    elif results.get("train", {}).get("peak_gib") == "error" and args.probe:
        results["train"]["probe"] = nan_probe(info, cache_dir, run / "emulator", device, dtype)
        for path in PARTIAL:
            path.write_text(json.dumps(results, indent=2) + "\n")
    if trained is not None or (run / "adapter").is_dir():
        stage(
            "correct",
            lambda: correct_image_adapter(
                ImageCorrectionConfig(
                    info,
                    cache_dir,
                    run / "emulator",
                    run / "adapter",
                    run / "adapter-corrected",
                    eval_images=args.images,
                    eval_batch=args.batch,
                    device=args.device,
                )
            ),
        )
    if (run / "emulator" / EMULATOR_META).is_file():  # --skip plain_lora leaves it out (stage() returns None)
        targets = lora_targets(run / "emulator")
        last_loss = stage("plain_lora", lambda: plain_lora(info, cache_dir, device, dtype, args.steps, targets))
        if last_loss is not None:
            results["plain_lora"]["last_loss"] = round(last_loss, 4)
        ran_now = first <= STAGES.index("plain_lora") <= last and "plain_lora" not in args.skip
        if ran_now and results.get("plain_lora", {}).get("peak_gib") == "oom" and device.type == "cuda":
            _cap(device, None)
            uncapped = measure(
                "plain_lora_uncapped",
                lambda: plain_lora(info, cache_dir, device, dtype, args.steps, targets),
                device,
                results,
            )
            if uncapped is not None:  # finite or not: whether the original's own gradients stay finite
                results["plain_lora_uncapped"]["last_loss"] = round(uncapped, 4)
            _cap(device, args.cap_gib)  # the stages after this one run under the cap again
    if args.anchor and (run / "emulator").is_dir():
        anchored = stage(
            "train_anchored",
            lambda: train_image_lora(
                ImageTrainConfig(
                    info,
                    cache_dir,
                    run / "emulator",
                    work / f"run-{args.model}-anchored",
                    steps=args.steps,
                    rank=16,
                    alpha=16.0,
                    checkpoint_every=args.steps,
                    device=args.device,
                    anchor="blocks",
                )
            ),
        )
        if anchored is not None:
            results["train_anchored"].update(
                losses=[round(x, 4) for x in anchored.losses], resumed_from=anchored.resumed_from
            )
    del cache
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    kept.write_text(text + "\n")


if __name__ == "__main__":
    main()
