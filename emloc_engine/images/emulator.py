"""Stage 1 for image models: the emulator of the denoiser (activation-aware SVD, ``METHOD.md`` Stage 1).

``build_image_emulator(ImageEmulatorConfig(...), progress) -> ImageEmulatorResult`` writes
``RUN/emulator/``: the denoiser's ``config.json``, ``emulator.safetensors`` (every tensor of the
denoiser, each compressed linear ``M`` stored as ``M.v.weight``, ``M.u.weight``, ``M.u.bias``: the
text emulator's file format) and ``emloc.json`` (``kind: "image-denoiser"``, the family, the source
pipeline and its fingerprint, and per module ρ, rank, shapes and relative error).
:func:`load_image_emulator` returns it as the diffusers model class with
:class:`~emloc_engine.weights.lowrank.LowRankLinear` under the original module names, so a LoRA
trained on it loads onto the original denoiser.

Calibration: the user's own cached images and captions (``calibration_images``, default 8) at a
spread of ``calibration_timesteps`` noise levels (default 4, :func:`~.families.fixed_timesteps`),
with fixed noise (``seed``): each (image, timestep) pair is one forward of the ORIGINAL denoiser,
batched per bucket. ``C = Σ XᵀX`` is summed at each compressed linear's input; linears that read the
same tensor inside a block (``to_q``/``to_k``/``to_v``; FLUX's single-block ``proj_mlp``) share one
statistic and its normalisation (found by tensor identity during the forward, so SDXL's ``attn2``,
whose ``to_k``/``to_v`` read the text, is handled right). The factorisation is the text engine's
:func:`~emloc_engine.stages.emulator.factorize.factorize`.

Memory: the original denoiser is in CPU memory and, on a GPU, streamed block by block
(:mod:`.placement`). Statistics for all modules at once would not fit a GPU (FLUX.1: about 64 GB
in fp32), so modules are processed in passes, whole blocks at a time, each pass holding at most
``stats_budget_gib`` of statistics; every pass reruns the calibration forwards (cheap next to
training). During a pass's factorisation a group's statistic and its normalised copy are freed after
the group's last module, so one normalised statistic is alive at a time (until 2026-12-06 all of them
stayed until the pass ended: twice the pass's statistics, 6.6 GiB of SDXL's 9.1 GiB build peak). Decision: no resume inside a build (a rerun rebuilds; ``emloc.json`` is written last and
marks a complete emulator, which later runs reuse).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emloc_engine.core.atomic import atomic_path, write_json_atomic
from emloc_engine.core.errors import ConfigError, ModelNotFound
from emloc_engine.core.progress import NULL_PROGRESS, Progress
from emloc_engine.core.ranks import rank_for_ratio
from emloc_engine.core.version import __version__
from emloc_engine.images.batches import calibration_batches, predict_batch
from emloc_engine.images.cache import ImageCache
from emloc_engine.images.families import NoiseSchedule
from emloc_engine.images.options import STATS_BUDGET_GIB
from emloc_engine.images.pipelines import (
    BLOCK_PATTERN,
    PipelineInfo,
    compressible_modules,
    load_denoiser,
    scheduler_config,
)
from emloc_engine.images.placement import streamed
from emloc_engine.machine import devices
from emloc_engine.machine.process_memory import gpu_peak_gib, reset_gpu_peak
from emloc_engine.stages.emulator.factorize import factorize
from emloc_engine.stages.emulator.writer import METHOD
from emloc_engine.weights.checkpoint import fingerprint_model
from emloc_engine.weights.lowrank import (
    EMULATOR_FORMAT,
    EMULATOR_FORMAT_VERSION,
    EMULATOR_META,
    replace_with_low_rank,
)

WEIGHTS = "emulator.safetensors"
EMULATOR_KIND = "image-denoiser"


@dataclass(frozen=True)
class ImageEmulatorConfig:
    pipeline: PipelineInfo = field(metadata={"help": "The identified pipeline (its denoiser is compressed)."})
    cache_dir: Path = field(metadata={"help": "The encoded images and captions (RUN/cache)."})
    out_dir: Path = field(metadata={"help": "Where the emulator goes (RUN/emulator)."})
    ratio: float = field(default=0.5, metadata={"help": "Keep-ratio ρ of the compressed linears."})
    calibration_images: int = field(
        default=8, metadata={"help": "Training images used to calibrate the emulator."}
    )
    calibration_timesteps: int = field(default=4, metadata={"help": "Noise levels per calibration image."})
    calibration_batch: int = field(default=4, metadata={"help": "Calibration forwards per batch."})
    stats_budget_gib: float = field(
        default=STATS_BUDGET_GIB, metadata={"help": "Most memory held by statistics in one pass (GiB)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the calibration noise."})
    device: str = field(default="auto", metadata={"help": "cuda, cuda:N, cpu or auto."})
    compute_dtype: str = field(
        default="auto", metadata={"help": "auto (bf16 on GPUs), float32, bfloat16, float16."}
    )
    full_rank: bool = field(
        default=False, metadata={"help": "Diagnostics: factorise at full rank (exact emulator)."}
    )

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.ratio <= 1.0:
            problems.append(f"ratio must be in (0, 1] (got {self.ratio})")
        for k in ("calibration_images", "calibration_timesteps", "calibration_batch"):
            if getattr(self, k) < 1:
                problems.append(f"{k} must be at least 1 (got {getattr(self, k)})")
        if not self.stats_budget_gib > 0:
            problems.append(f"stats_budget_gib must be positive (got {self.stats_budget_gib})")
        if problems:
            raise ConfigError("Invalid image emulator settings.", problems=problems)


@dataclass(frozen=True)
class ImageEmulatorResult:
    emulator_dir: Path
    modules: dict[str, dict[str, Any]]
    params_kept: int
    params_original: int
    passes: int
    wall_s: float
    peak_vram_gib: float


# ------------------------------------------------------------------------------------ statistics
class _PassDone(Exception):  # control flow: every module of this pass has seen its input
    pass


class _SharedStats:
    """``C = Σ XᵀX`` per module input; modules of one block that read the same tensor share one statistic.

    Once every module of the pass has run in a forward, the forward is stopped (:class:`_PassDone`):
    the later blocks would only cost time.
    """

    def __init__(self, model: nn.Module, names: list[str], stats_dtype: torch.dtype) -> None:
        self.stats: dict[str, torch.Tensor] = {}
        self.group_of: dict[str, str] = {}
        self._dtype = stats_dtype
        self._seen: list[tuple[torch.Tensor, str]] = []
        self._block = ""
        self._ran: set[str] = set()
        self._total = len(names)
        self._handles = [model.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self._accumulate(name, args[0])
            self._ran.add(name)
            if len(self._ran) == self._total:
                raise _PassDone

        return hook

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        m = BLOCK_PATTERN.match(name)
        block = m.group(1) if m else ""
        if block != self._block:
            self._seen.clear()
            self._block = block
        for tensor, group in self._seen:
            if tensor is x:
                self.group_of.setdefault(name, group)
                return
        self._seen.append((x, name))
        self.group_of.setdefault(name, name)
        group = self.group_of[name]
        x2 = x.reshape(-1, x.shape[-1]).to(self._dtype)
        prod = x2.T @ x2
        if group in self.stats:
            self.stats[group].add_(prod)
        else:
            self.stats[group] = prod

    def end_forward(self) -> None:
        self._ran.clear()
        self._seen.clear()
        self._block = ""

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._seen.clear()


def _passes(modules: dict[str, nn.Linear], budget_bytes: float, elem_bytes: int) -> list[list[str]]:
    """Module names in passes of whole blocks, each pass's statistics within the budget (≥ 1 block)."""
    blocks: dict[str, list[str]] = {}
    for name in modules:
        m = BLOCK_PATTERN.match(name)
        blocks.setdefault(m.group(1) if m else name, []).append(name)
    passes: list[list[str]] = []
    used = 0.0
    for names in blocks.values():
        size = sum(modules[n].in_features ** 2 * elem_bytes for n in names)
        if passes and used + size <= budget_bytes:
            passes[-1].extend(names)
            used += size
        else:
            passes.append(list(names))
            used = size
    return passes


# ------------------------------------------------------------------------------------ the build
def build_image_emulator(cfg: ImageEmulatorConfig, progress: Progress = NULL_PROGRESS) -> ImageEmulatorResult:
    """Build the denoiser's emulator into ``cfg.out_dir`` (module docstring).

    Raises:
        ConfigError: bad settings, or ``out_dir`` inside the pipeline folder.
        ModelNotFound: missing denoiser weights or cache.
        Cancelled: between calibration batches and modules.
    """
    t0 = time.monotonic()
    info = cfg.pipeline
    out_dir = Path(cfg.out_dir).resolve()
    if info.folder.resolve() in out_dir.parents:
        raise ConfigError(
            f"The emulator folder {out_dir} is inside the pipeline folder {info.folder}.",
            hint="Pick a run folder elsewhere; the pipeline folder is never written to.",
        )
    device = devices.resolve_device(cfg.device)
    dtype = devices.compute_dtype(device, cfg.compute_dtype)
    linalg = devices.linalg_device(device)
    stats_dtype = torch.float64 if device.type == "cpu" else torch.float32
    reset_gpu_peak(device)
    cache = ImageCache(cfg.cache_dir)
    schedule = NoiseSchedule(info.kind, scheduler_config(info))
    batches = calibration_batches(
        cache, schedule, cfg.calibration_images, cfg.calibration_timesteps, cfg.calibration_batch, cfg.seed
    )
    model = load_denoiser(info, dtype=dtype)
    targets = compressible_modules(info.kind, model)
    elem = 8 if stats_dtype == torch.float64 else 4
    passes = _passes(targets, cfg.stats_budget_gib * 2**30, elem)
    plan: dict[str, dict[str, Any]] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    n_done = 0
    with streamed(model, device) as live:
        for p, names in enumerate(passes):
            rec = _SharedStats(live, names, stats_dtype)
            try:
                for batch in batches:
                    with contextlib.suppress(_PassDone):
                        predict_batch(info.kind, live, schedule, batch, device, dtype)
                    rec.end_forward()
                    progress.check_cancelled()
            finally:
                rec.close()
            caches: dict[str, dict[str, torch.Tensor]] = {}
            last_of = {rec.group_of.get(n, n): n for n in names}  # a group's statistic is freed after its last module
            for name in names:
                progress.check_cancelled()
                lin = targets[name]
                group = rec.group_of.get(name)
                if group is None:
                    raise ModelNotFound(f"The calibration forward never reached {name}.")
                w = lin.weight.detach().to("cpu")
                out_f, in_f = w.shape
                full = min(out_f, in_f)
                rank = (
                    full
                    if cfg.full_rank or cfg.ratio >= 1.0
                    else min(rank_for_ratio(cfg.ratio, out_f, in_f), full)
                )
                f = factorize(
                    w.to(linalg), rec.stats[group].to(linalg), rank, cache=caches.setdefault(group, {})
                )
                factors[name] = (f.u.to(w.dtype).cpu(), f.v.to(w.dtype).cpu())
                plan[name] = {
                    "ratio": cfg.ratio,
                    "rank": f.rank,
                    "in_features": in_f,
                    "out_features": out_f,
                    "bias": lin.bias is not None,
                    "rel_error": f.rel_error,
                    "stat_group": group,
                }
                if last_of[group] == name:  # only one normalised statistic is alive at a time
                    caches.pop(group, None)
                    rec.stats.pop(group, None)
                n_done += 1
            del rec, caches
            progress.update(
                0.95 * n_done / len(targets),
                f"pass {p + 1}/{len(passes)}: {n_done}/{len(targets)} modules factorised",
            )
    peak = gpu_peak_gib(device)
    state = _emulator_state(model, factors)
    _write(cfg, out_dir, state, plan, len(batches), peak, device, dtype)
    params_original = sum(p.numel() for p in model.parameters())
    kept = sum(t.numel() for t in state.values() if t.is_floating_point())
    progress.update(
        1.0, f"emulator written ({kept / max(1, params_original):.0%} of the denoiser's parameters)"
    )
    return ImageEmulatorResult(out_dir, plan, kept, params_original, len(passes), time.monotonic() - t0, peak)


def _emulator_state(
    model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in factors:
            if leaf == "bias":
                state[f"{module}.u.bias"] = t.detach().cpu().contiguous()
            continue
        state[key] = t.detach().cpu().contiguous()
    for module, (u, v) in factors.items():
        state[f"{module}.u.weight"] = u.contiguous()
        state[f"{module}.v.weight"] = v.contiguous()
    return state


def _write(
    cfg: ImageEmulatorConfig,
    out_dir: Path,
    state: dict[str, torch.Tensor],
    plan: dict[str, Any],
    n_batches: int,
    peak: float,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    import shutil

    from safetensors.torch import save_file

    info = cfg.pipeline
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / EMULATOR_META).unlink(missing_ok=True)  # an old emulator is incomplete from here on
    with atomic_path(out_dir / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    shutil.copyfile(info.denoiser_dir / "config.json", out_dir / "config.json")
    write_json_atomic(
        out_dir / EMULATOR_META,
        {
            "format": EMULATOR_FORMAT,
            "format_version": EMULATOR_FORMAT_VERSION,
            "engine_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "kind": EMULATOR_KIND,
            "family": info.kind,
            "denoiser_class": info.components[info.denoiser][1],
            "source_model": {
                "path": str(info.folder),
                "denoiser_dir": str(info.denoiser_dir),
                "fingerprint": fingerprint_model(info.denoiser_dir),
            },
            "method": METHOD,
            "ratio": cfg.ratio,
            "full_rank": cfg.full_rank,
            "calibration": {
                "images": cfg.calibration_images,
                "timesteps": cfg.calibration_timesteps,
                "batches": n_batches,
                "seed": cfg.seed,
            },
            "build": {"device": str(device), "compute_dtype": str(dtype), "peak_vram_gib": peak},
            "modules": plan,
        },
    )


def load_image_emulator(
    emulator_dir: Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Any:
    """An emulator folder as its diffusers denoiser class with low-rank compressed linears (eval mode).

    Raises:
        ModelNotFound: not an image emulator, or its tensors do not match its config.
    """
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    from emloc_engine.weights.lowrank import read_emulator_meta

    emulator_dir = Path(emulator_dir)
    meta = read_emulator_meta(emulator_dir)
    if meta.get("kind") != EMULATOR_KIND:
        raise ModelNotFound(f"{emulator_dir} is not the emulator of an image denoiser.")
    import diffusers

    cls = getattr(diffusers, meta["denoiser_class"])
    config = cls.load_config(str(emulator_dir))
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config)
        replace_with_low_rank(model, meta["modules"], dtype=dtype)
    state = {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in load_file(str(emulator_dir / WEIGHTS)).items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ModelNotFound(
            f"Emulator {emulator_dir} does not match its config.",
            problems=[f"missing tensor {m}" for m in missing[:20]]
            + [f"unexpected tensor {u}" for u in unexpected[:20]],
            hint="Rebuild the emulator (delete RUN/emulator and rerun).",
        )
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()


__all__ = [
    "EMULATOR_KIND",
    "ImageEmulatorConfig",
    "ImageEmulatorResult",
    "build_image_emulator",
    "load_image_emulator",
]
