"""Stage 1: build the emulator by activation-aware SVD, streaming one decoder block at a time.

``build_emulator(EmulatorConfig(...), progress) -> EmulatorResult`` writes ``RUN_DIR/emulator/``
(the layout: :mod:`emloc_engine.stages.emulator.writer`). The stage, with memory bounded by one
block (``METHOD.md`` Stage 1):

1. Plan: which decoder linear modules are compressed and at which rank (:func:`plan_modules`), the
   device and dtypes (:mod:`emloc_engine.machine.devices`), and how the calibration samples are
   chunked to fit the memory budget (:mod:`emloc_engine.stages.emulator.memory_plan`).
2. With ``allocation="spectral"`` (opt-in), a first streamed pass measures every module's whitened
   spectrum and redistributes the uniform ρ's parameter budget over the modules
   (:mod:`emloc_engine.stages.emulator.spectral`); the result is stored and reused.
3. The block loop (:mod:`emloc_engine.stages.emulator.block_loop`): the model skeleton is built on
   the meta device; only the input embedding is materialised, and the recorder layers of
   :mod:`emloc_engine.stages.emulator.calibration` capture the input of block 0; then each block is
   read, run on the calibration samples through the ORIGINAL weights while ``C = Σ XᵀX`` is summed
   once per input group (q/k/v share one, gate/up share one, Phi-3's fused projections are single
   modules), factorised (:func:`emloc_engine.stages.emulator.factorize.factorize`), written and freed.
4. The index and ``emloc.json`` are written last (:func:`emloc_engine.stages.emulator.writer.finish_emulator`).

Resume: each shard's metadata carries the build fingerprint (source model, plan, calibration ids,
device type, dtypes, solver, chunking). Blocks whose shard matches are not factorised again; their
original block is still run (forward only) so that the next block sees the same hidden states. On
one machine the result is bit-identical to an uninterrupted run.

Calibration size: fewer real tokens than the model's hidden size is a :class:`DataError` (``C`` of
the attention/MLP input would be singular by construction). Fewer than the widest input (the MLP's
intermediate size) is allowed and logged: the factoriser is exact on singular statistics, it just
cannot see the directions the samples never excite.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from emloc_engine.core.architectures import ArchSpec, arch_spec, num_blocks
from emloc_engine.core.errors import ConfigError, DataError, InsufficientMemory
from emloc_engine.core.progress import NULL_PROGRESS, Progress, sub
from emloc_engine.core.ranks import rank_for_ratio
from emloc_engine.machine import devices
from emloc_engine.machine.process_memory import gpu_peak_gib, reset_gpu_peak
from emloc_engine.stages.emulator.block_loop import BlockLoop
from emloc_engine.stages.emulator.build_context import BuildContext, ModulePlan, last_match
from emloc_engine.stages.emulator.memory_plan import plan_build_memory
from emloc_engine.stages.emulator.options import ALLOCATIONS, EmulatorOptions
from emloc_engine.stages.emulator.spectral import (
    ALLOCATION_VERSION,
    apply_allocation,
    free_modules,
    measure,
    read_allocation,
    save_allocation,
    spectral_allocation,
)
from emloc_engine.stages.emulator.writer import finish_emulator
from emloc_engine.weights.checkpoint import Checkpoint, fingerprint_model
from emloc_engine.weights.headers import load_config
from emloc_engine.weights.lowrank import EMULATOR_FORMAT_VERSION, EMULATOR_META

log = logging.getLogger(__name__)

_SPECTRA_SHARE = 0.25  # of the progress bar, for the spectra pass of allocation="spectral"


@dataclass(frozen=True)
class EmulatorConfig(EmulatorOptions):
    """Settings of Stage 1: the options plus the source model, the output folder, ρ and the device."""

    model_dir: Path = field(metadata={"help": "Snapshot folder of the source model (config.json + safetensors)."})
    out_dir: Path = field(metadata={"help": "Where the emulator goes (RUN_DIR/emulator)."})
    calibration_ids: tuple[tuple[int, ...], ...] = field(
        metadata={"help": "Token ids of the calibration samples (from the training data)."})
    ratio: float = field(default=0.5, metadata={
        "help": "Keep-ratio ρ in (0, 1): fraction of each compressed layer's parameters kept."})
    device: str = field(default="auto", metadata={"help": "cuda, cuda:N, cpu or auto (CUDA when present)."})
    memory_budget_bytes: int | None = field(default=None, metadata={
        "help": "Device memory the build may use; sizes the calibration chunks (default: 40% of the model's bytes)."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace a complete emulator built with other settings in out_dir."})
    factor_devices: tuple[str, ...] = field(default=(), metadata={
        "help": "More devices (cuda:1, cuda:2…) that factorise block b while the main device runs the forward "
                "of block b+1; each module's factors are the same as on one device."})

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "calibration_ids", tuple(tuple(int(t) for t in s) for s in self.calibration_ids))
        super().__post_init__()

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if not 0.0 < self.ratio < 1.0:
            problems.insert(0, f"ratio must be in (0, 1) (got {self.ratio}); 1 would keep everything dense.")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith(("cuda", "mps"))):
            problems.append(f"device must be auto, cpu, cuda or cuda:N (got {self.device!r})")
        problems += [f"factor device {d!r} must be cpu or cuda:N" for d in self.factor_devices
                     if not (d == "cpu" or d.startswith("cuda"))]
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            problems.append("memory_budget_bytes must be positive")
        return problems


@dataclass(frozen=True)
class EmulatorResult:
    """What Stage 1 produced.

    Attributes:
        emulator_dir: the complete emulator folder.
        modules: full module name -> ``{ratio, rank, in_features, out_features, bias, rel_error}``.
        params_kept: parameters of the emulator (every tensor).
        params_original: parameters of the source checkpoint.
        wall_s: wall time of this call.
        peak_vram_gib: peak allocated GPU memory of this call (0.0 on the CPU).
        resumed_blocks: blocks whose factors were reused from an earlier, interrupted build.
        calibration_tokens: real calibration tokens used.
        chunk_tokens: padded tokens per forward chunk.
        device: where it ran.
    """

    emulator_dir: Path
    modules: Mapping[str, Mapping[str, Any]]
    params_kept: int
    params_original: int
    wall_s: float
    peak_vram_gib: float
    resumed_blocks: tuple[int, ...]
    calibration_tokens: int
    chunk_tokens: int
    device: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for the run manifest)."""
        d = asdict(self)
        d["emulator_dir"] = str(self.emulator_dir)
        d["modules"] = len(self.modules)
        return d


# -- the plan ------------------------------------------------------------------------------------------
def plan_modules(cfg: EmulatorConfig, spec: ArchSpec, ckpt: Checkpoint, blocks: int) -> dict[str, ModulePlan]:
    """Which decoder linear modules are compressed, with ρ and rank ``k = floor(ρ·out·in/(out+in))``.

    Raises:
        ConfigError: the plan compresses nothing.
        ModelNotFound: a block weight is missing from the checkpoint.
    """
    plan: dict[str, ModulePlan] = {}
    for b in range(blocks):
        for path in spec.linear_modules:
            name = spec.module_name(b, path)
            if any(fnmatch.fnmatchcase(name, p) for p in cfg.dense_patterns):
                continue
            ratio = last_match(name, cfg.ratio_overrides)
            ratio = cfg.ratio if ratio is None else float(ratio)
            if ratio >= 1.0:
                continue
            out_f, in_f = ckpt.info(f"{name}.weight").shape
            rank = last_match(name, cfg.rank_overrides)
            rank = rank_for_ratio(ratio, out_f, in_f) if rank is None else int(rank)
            plan[name] = ModulePlan(name, b, path, ratio, min(rank, out_f, in_f), in_f, out_f,
                                    f"{name}.bias" in ckpt)
    if not plan:
        raise ConfigError("The compression plan compresses no module.",
                          hint="Remove dense patterns or ρ ≥ 1 overrides that cover every decoder module.")
    return plan


def _resolve_dtypes(cfg: EmulatorConfig, device: torch.device) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """(compute, statistics, linear algebra) dtypes.

    Compute: :func:`~emloc_engine.machine.devices.compute_dtype`. Statistics are summed on the
    device, in fp64 on the CPU (or with an fp64 forward), else fp32. The factorisation runs on
    :func:`~emloc_engine.machine.devices.linalg_device`, in fp64 when that is the CPU, else fp32.
    """
    compute = devices.compute_dtype(device, cfg.compute_dtype)
    stats = torch.float64 if device.type == "cpu" or compute == torch.float64 else torch.float32
    cpu_linalg = devices.linalg_device(device).type == "cpu"
    linalg = devices.DTYPES[cfg.linalg_dtype] if cfg.linalg_dtype != "auto" else (torch.float64 if cpu_linalg else torch.float32)
    return compute, stats, linalg


def _check_calibration(cfg: EmulatorConfig, hf_config: Any) -> tuple[tuple[int, ...], ...]:
    samples = tuple(s for s in cfg.calibration_ids if s)
    if not samples:
        raise DataError("There are no calibration samples.", hint="Give the builder samples of your training data.")
    vocab = int(hf_config.vocab_size)
    bad = [i for i, s in enumerate(samples) if max(s) >= vocab or min(s) < 0]
    if bad:
        raise DataError(f"Calibration samples {bad[:10]} hold token ids outside the vocabulary (size {vocab}).",
                        hint="Tokenize the data with this model's tokenizer.")
    n_tokens = sum(len(s) for s in samples)
    need = cfg.min_calibration_tokens if cfg.min_calibration_tokens is not None else int(hf_config.hidden_size)
    if n_tokens < need:
        raise DataError(f"The calibration samples hold {n_tokens} tokens; at least {need} are needed.",
                        hint="Use more calibration samples (--calib) or longer ones (--max-length).")
    widest = int(getattr(hf_config, "intermediate_size", 0) or 0)
    if n_tokens < widest:
        log.warning("only %d calibration tokens for MLP inputs of width %d: the down-projection statistic "
                    "is singular; more samples give a better emulator", n_tokens, widest)
    return samples


def _context(cfg: EmulatorConfig) -> BuildContext:
    """Read the model's config and headers and resolve every setting into a :class:`BuildContext`.

    Raises:
        ConfigError, DataError, UnsupportedModel, ModelNotFound: as :func:`build_emulator`.
    """
    model_dir = cfg.model_dir.resolve()
    hf_dict = load_config(model_dir)
    spec = arch_spec(hf_dict)
    blocks = num_blocks(hf_dict)
    ckpt = Checkpoint(model_dir)
    plan = plan_modules(cfg, spec, ckpt, blocks)
    device = devices.resolve_device(cfg.device)
    compute, stats, linalg = _resolve_dtypes(cfg, device)

    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    samples = _check_calibration(cfg, hf_config)
    layout = plan_build_memory(hf_config, ckpt, device, [len(x) for x in samples], torch.finfo(compute).bits // 8,
                               budget_bytes=cfg.memory_budget_bytes, chunk_tokens=cfg.chunk_tokens)
    return BuildContext(model_dir=model_dir, out_dir=cfg.out_dir.resolve(), spec=spec, ckpt=ckpt, hf_config=hf_config,
                        blocks=blocks, plan=plan, samples=samples, layout=layout, device=device, compute=compute,
                        stats=stats, linalg=linalg, solver=cfg.solver, factor_devices=cfg.factor_devices)


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def calibration_fingerprint(ids: tuple[tuple[int, ...], ...]) -> str:
    """sha256 prefix of the calibration token ids (order and content)."""
    return _sha([list(s) for s in ids])


def _built_with_other_settings(out_dir: Path) -> ConfigError:
    return ConfigError(f"{out_dir} already holds an emulator built with other settings.",
                       hint="Pass overwrite (--overwrite) or choose another run folder.")


# -- the stage ------------------------------------------------------------------------------------------
def build_emulator(cfg: EmulatorConfig, progress: Progress = NULL_PROGRESS) -> EmulatorResult:
    """Build the activation-aware SVD emulator of ``cfg.model_dir`` into ``cfg.out_dir``.

    Args:
        cfg: the settings.
        progress: receives one update per block (with ETA), ``emulator/rel_error`` and
            ``gpu/peak_gib`` per block, and is asked for cancel between blocks. With
            ``allocation="spectral"`` the spectra pass takes the first quarter of the bar (messages
            start with "rank allocation") unless its result is already stored in ``out_dir``.

    Returns:
        An :class:`EmulatorResult`.

    Raises:
        ConfigError: bad settings, an empty plan, ``out_dir`` inside the source folder, or a complete
            emulator with other settings in ``out_dir`` without ``overwrite``.
        DataError: no calibration samples, token ids outside the vocabulary, too few tokens, or
            statistics that overflowed.
        UnsupportedModel: an architecture the engine does not know.
        ModelNotFound: the model folder or a tensor is missing or unreadable.
        InsufficientMemory: CUDA ran out of memory; the hint names the setting to lower.
        Cancelled: between blocks; finished blocks are kept and a rerun resumes after them.
    """
    t0 = time.monotonic()
    model_dir, out_dir = cfg.model_dir.resolve(), cfg.out_dir.resolve()
    if out_dir == model_dir or model_dir in out_dir.parents:
        raise ConfigError(f"The emulator folder {out_dir} is inside the source model folder {model_dir}.",
                          hint="Pick a run folder elsewhere; the source model is never written to.")
    ctx = _context(cfg)
    calib_fp = calibration_fingerprint(ctx.samples)
    source_fp = fingerprint_model(model_dir)
    allocation: dict[str, Any] | None = None
    if cfg.allocation == "spectral":
        allocation, progress = _allocate(cfg, ctx, source_fp, calib_fp, progress)
        ctx = dataclasses.replace(ctx, plan=apply_allocation(ctx.plan, allocation))
    device, layout = ctx.device, ctx.layout
    build_id = _sha({"format": EMULATOR_FORMAT_VERSION, "source": source_fp, "calibration": calib_fp,
                     "plan": {n: p.rank for n, p in ctx.plan.items()}, "device": device.type,
                     "compute": str(ctx.compute), "stats": str(ctx.stats), "linalg": str(ctx.linalg),
                     "solver": cfg.solver, "chunk_tokens": layout.chunk_tokens,
                     **({"allocation": cfg.allocation} if cfg.allocation != "uniform" else {})})

    meta_path = out_dir / EMULATOR_META
    if meta_path.exists():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        if old.get("build_id") == build_id:
            log.info("emulator in %s is complete and matches the settings; nothing to do", out_dir)
            progress.update(1.0, "emulator already built")
            return _result(ctx, old, wall_s=time.monotonic() - t0, peak_gib=0.0, resumed=tuple(range(ctx.blocks)))
        if not cfg.overwrite:
            raise _built_with_other_settings(out_dir)
        meta_path.unlink()  # from now on the folder is incomplete until the new emloc.json lands
    out_dir.mkdir(parents=True, exist_ok=True)

    reset_gpu_peak(device)
    progress.update(0.0, f"emulator: {len(ctx.plan)} modules in {ctx.blocks} blocks, {ctx.n_tokens} calibration tokens")
    loop = BlockLoop(ctx, build_id)
    try:
        resumed = loop.run(progress)
    except torch.OutOfMemoryError as exc:
        raise InsufficientMemory(
            f"Out of GPU memory while building the emulator: {exc}".splitlines()[0],
            hint="Lower --calib or --max-length, or set a smaller memory budget / chunk_tokens so that "
                 "fewer tokens go through a block at once.") from exc
    finally:
        loop.close()
    peak = gpu_peak_gib(device)
    build = dict(device=str(device), compute_dtype=str(ctx.compute), statistics_dtype=str(ctx.stats),
                 linalg_dtype=str(ctx.linalg), solver=cfg.solver, chunk_tokens=layout.chunk_tokens,
                 memory_budget_bytes=layout.budget_bytes, offload_hidden=layout.offload_hidden,
                 wall_s=round(time.monotonic() - t0, 3), peak_vram_gib=round(peak, 3),
                 timings_s={k: round(v, 3) for k, v in loop.timings.items()})
    meta = finish_emulator(ctx, settings=_settings(cfg), source_fp=source_fp, calib_fp=calib_fp, build_id=build_id,
                           allocation=allocation, build=build)
    progress.update(1.0, f"emulator written to {out_dir}")
    return _result(ctx, meta, wall_s=time.monotonic() - t0, peak_gib=peak, resumed=resumed)


def _allocate(cfg: EmulatorConfig, ctx: BuildContext, source_fp: str, calib_fp: str,
              progress: Progress) -> tuple[dict[str, Any], Progress]:
    """The spectral allocation of this build's inputs (stored, or measured now) and the rest of the bar."""
    free = free_modules(ctx.plan, cfg.rank_overrides)
    key = _sha({"version": ALLOCATION_VERSION, "format": EMULATOR_FORMAT_VERSION, "source": source_fp,
                "calibration": calib_fp, "plan": {n: p.rank for n, p in ctx.plan.items()},
                "free": sorted(free), "device": ctx.device.type, "compute": str(ctx.compute),
                "stats": str(ctx.stats), "chunk_tokens": ctx.layout.chunk_tokens})
    allocation = read_allocation(ctx.out_dir, key)
    if allocation is not None:
        return allocation, progress
    meta_path = ctx.out_dir / EMULATOR_META
    if meta_path.exists() and not cfg.overwrite and \
            json.loads(meta_path.read_text(encoding="utf-8")).get("spectral_allocation", {}).get("key") != key:
        raise _built_with_other_settings(ctx.out_dir)
    allocation = spectral_allocation(ctx, free=free, ratio=cfg.ratio, key=key,
                                     progress=sub(progress, 0.0, _SPECTRA_SHARE))
    save_allocation(ctx.out_dir, allocation)
    return allocation, sub(progress, _SPECTRA_SHARE, 1.0)


def _settings(cfg: EmulatorConfig) -> dict[str, Any]:
    """The user's plan settings as ``emloc.json`` records them."""
    return {"ratio": cfg.ratio,
            "plan": {"ratio_overrides": [list(x) for x in cfg.ratio_overrides],
                     "dense_patterns": list(cfg.dense_patterns),
                     "rank_overrides": [list(x) for x in cfg.rank_overrides]},
            "allocation": cfg.allocation}


def _result(ctx: BuildContext, meta: Mapping[str, Any], *, wall_s: float, peak_gib: float,
            resumed: tuple[int, ...]) -> EmulatorResult:
    original = ctx.ckpt.num_parameters()
    kept = original
    for m in meta["modules"].values():
        o, i, k = int(m["out_features"]), int(m["in_features"]), int(m["rank"])
        kept += k * (o + i) - o * i
    return EmulatorResult(ctx.out_dir, meta["modules"], kept, original, wall_s, peak_gib, resumed, ctx.n_tokens,
                          ctx.layout.chunk_tokens, str(ctx.device))


def measure_spectra(cfg: EmulatorConfig, progress: Progress = NULL_PROGRESS) -> dict[str, list[float]]:
    """The whitened spectrum (:func:`~emloc_engine.stages.emulator.factorize.whitened_spectrum`) of every
    module the plan of ``cfg`` compresses, streamed exactly like the build's statistics (the first pass
    of ``allocation="spectral"``). Reads the model block by block and writes nothing.

    Raises:
        ConfigError, DataError, UnsupportedModel, ModelNotFound, InsufficientMemory, Cancelled:
            as :func:`build_emulator`.
    """
    ctx = _context(cfg)
    return measure(ctx, set(ctx.plan), progress)


__all__ = ["ALLOCATIONS", "EmulatorConfig", "EmulatorResult", "build_emulator", "calibration_fingerprint",
           "measure_spectra", "plan_modules"]
