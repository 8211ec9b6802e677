"""Stage 1: build the emulator by activation-aware SVD, streaming one decoder block at a time.

``build_emulator(EmulatorConfig(...), progress) -> EmulatorResult`` writes ``RUN_DIR/emulator/``::

    blocks-00000.safetensors ...   one shard per decoder block: compressed modules as M.u.weight,
                                   M.v.weight (+ M.u.bias), every other tensor of the block copied
    rest.safetensors               every tensor outside the blocks (embeddings, final norm, lm_head)
    model.safetensors.index.json   weight map over the shards
    config.json, tokenizer*, ...   copied from the source model (never the weights)
    emloc.json                     written LAST: its presence marks a complete emulator

The loop (``METHOD.md`` Stage 1), with memory bounded by one block:

1. The model skeleton is built on the meta device; only the input embedding is materialised, and the
   recorder layers of :mod:`emloc_engine.stages.emulator.calibration` capture the input of block 0 and every
   layer's keyword arguments for each chunk of calibration samples.
2. For block ``i``: read only its tensors from the shards (a background thread prefetches block
   ``i+1`` into CPU RAM meanwhile), load them into the skeleton's layer, push every chunk through
   the ORIGINAL block while hooks sum ``C = Σ XᵀX`` once per input group (q/k/v share one, gate/up
   share one, Phi-3's fused projections are single modules), factorise every compressed module
   (:func:`emloc_engine.stages.emulator.factorize.factorize`), write the block's shard atomically, and free the block.
   Hidden states flow through original blocks only (no compressed-error propagation).

Rank allocation (``allocation="spectral"``, opt-in): before the loop above, a first streamed pass
runs the same capture and block forward with the same statistics, but instead of factorising it
keeps each module's whitened spectrum (eigenvalues of ``W C Wᵀ``, fp64) and frees the block; then
:func:`emloc_engine.stages.emulator.rank_allocation.allocate_ranks` redistributes the uniform ρ's parameter budget
over the modules (some become dense) and the normal loop builds that plan. The chosen ranks are
stored in ``ALLOCATION_FILE`` in the output folder, keyed by everything the pass depends on, so a
resumed or repeated build reuses them without a second pass (and would recompute the same ones:
the pass is deterministic on one machine).

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

import fnmatch
import hashlib
import json
import logging
import math
import queue
import shutil
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from emloc_engine.core.architectures import ArchSpec, arch_spec, num_blocks
from emloc_engine.core.atomic import atomic_path, write_json_atomic
from emloc_engine.core.dtypes import element_bytes
from emloc_engine.core.errors import ConfigError, DataError, InsufficientMemory
from emloc_engine.core.progress import NULL_PROGRESS, EtaClock, Progress, format_seconds, sub
from emloc_engine.core.ranks import rank_for_ratio
from emloc_engine.core.version import __version__
from emloc_engine.machine import devices
from emloc_engine.stages.emulator.calibration import (
    CalibrationChunk,
    capture_block_inputs,
    chunk_samples,
    decoder_layers,
    recording,
    run_block,
)
from emloc_engine.stages.emulator.factorize import SOLVERS, factorize
from emloc_engine.stages.emulator.rank_allocation import allocate_ranks, kept_parameters
from emloc_engine.weights.checkpoint import Checkpoint, fingerprint_model
from emloc_engine.weights.headers import load_config
from emloc_engine.weights.lowrank import EMULATOR_FORMAT, EMULATOR_FORMAT_VERSION, EMULATOR_META

log = logging.getLogger(__name__)

BLOCK_FILE = "blocks-{:05d}.safetensors"
REST_FILE = "rest.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ALLOCATION_FILE = "emloc-allocation.json"
ALLOCATIONS = ("uniform", "spectral")
_ALLOCATION_VERSION = 1
_SPECTRA_SHARE = 0.25  # of the progress bar, for the spectra pass of allocation="spectral"
METHOD = "activation-aware-svd"
WHITENING = ("projection onto the top-k left singular vectors of W·S: eigh of W·C̃·Wᵀ when out ≤ in; "
             "fp64 Cholesky root of C̃ + δI (δ from 1e-10, ×100 until PD) and eigh of (WS)ᵀ(WS) when out > in; "
             "C̃ = C / mean eigenvalue")
_DTYPES = devices.DTYPES
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt"}


@dataclass(frozen=True)
class EmulatorConfig:
    """Settings of Stage 1."""

    model_dir: Path = field(metadata={"help": "Snapshot folder of the source model (config.json + safetensors)."})
    out_dir: Path = field(metadata={"help": "Where the emulator goes (RUN_DIR/emulator)."})
    calibration_ids: tuple[tuple[int, ...], ...] = field(
        metadata={"help": "Token ids of the calibration samples (from the training data)."})
    ratio: float = field(default=0.5, metadata={
        "help": "Keep-ratio ρ in (0, 1): fraction of each compressed layer's parameters kept."})
    ratio_overrides: tuple[tuple[str, float], ...] = field(default=(), metadata={
        "help": "(pattern, ρ) on full module names (fnmatch; last match wins); ρ ≥ 1 keeps the module dense."})
    dense_patterns: tuple[str, ...] = field(default=(), metadata={
        "help": "Module name patterns (fnmatch on full names, e.g. '*.31.mlp.down_proj') kept dense."})
    rank_overrides: tuple[tuple[str, int], ...] = field(default=(), metadata={
        "help": "(pattern, k) fixing the rank of matching modules (clamped to min(out, in))."})
    device: str = field(default="auto", metadata={"help": "cuda, cuda:N, cpu or auto (CUDA when present)."})
    compute_dtype: str = field(default="auto", metadata={
        "help": "dtype of the block forward: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16, float64."})
    linalg_dtype: str = field(default="auto", metadata={
        "help": "dtype of the factorisation: auto (fp32 on CUDA, fp64 on CPU), float32 or float64."})
    solver: str = field(default="eigh", metadata={
        "help": "eigh (exact) or randomized (subspace iteration; faster on big layers, slightly worse)."})
    memory_budget_bytes: int | None = field(default=None, metadata={
        "help": "Device memory the build may use; sizes the calibration chunks (default: 40% of the model's bytes)."})
    chunk_tokens: int | None = field(default=None, metadata={
        "help": "Padded tokens per forward chunk (default: from the memory budget)."})
    min_calibration_tokens: int | None = field(default=None, metadata={
        "help": "Fewest real calibration tokens accepted (default: the model's hidden size)."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace a complete emulator built with other settings in out_dir."})
    factor_devices: tuple[str, ...] = field(default=(), metadata={
        "help": "More devices (cuda:1, cuda:2…) that factorise block b while the main device runs the forward "
                "of block b+1; each module's factors are the same as on one device."})
    allocation: str = field(default="uniform", metadata={
        "help": "uniform: every module at k = floor(ρ·out·in/(out+in)). spectral: a first streamed pass measures "
                "each module's whitened spectrum and the same parameter budget is redistributed where it removes "
                "the most relative error (some modules become dense); better transfer at ρ ≥ 0.4, worse at 0.25. "
                "User settings combine: dense patterns and ρ ≥ 1 overrides stay dense and are outside the budget, "
                "rank overrides are kept as given and outside the budget, other ρ overrides set their module's "
                "share of the budget."})

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "calibration_ids", tuple(tuple(int(t) for t in s) for s in self.calibration_ids))
        problems = []
        if not 0.0 < self.ratio < 1.0:
            problems.append(f"ratio must be in (0, 1) (got {self.ratio}); 1 would keep everything dense.")
        problems += [f"ratio override {p!r} must be > 0 (got {r})" for p, r in self.ratio_overrides if not r > 0]
        problems += [f"rank override {p!r} must be >= 1 (got {k})" for p, k in self.rank_overrides if k < 1]
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith(("cuda", "mps"))):
            problems.append(f"device must be auto, cpu, cuda or cuda:N (got {self.device!r})")
        if self.compute_dtype != "auto" and self.compute_dtype not in _DTYPES:
            problems.append(f"compute_dtype must be auto or one of {', '.join(_DTYPES)} (got {self.compute_dtype!r})")
        if self.linalg_dtype not in ("auto", "float32", "float64"):
            problems.append(f"linalg_dtype must be auto, float32 or float64 (got {self.linalg_dtype!r})")
        if self.allocation not in ALLOCATIONS:
            problems.append(f"allocation must be one of {', '.join(ALLOCATIONS)} (got {self.allocation!r})")
        if self.solver not in SOLVERS:
            problems.append(f"solver must be one of {', '.join(SOLVERS)} (got {self.solver!r})")
        problems += [f"factor device {d!r} must be cpu or cuda:N" for d in self.factor_devices
                     if not (d == "cpu" or d.startswith("cuda"))]
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            problems.append("memory_budget_bytes must be positive")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            problems.append("chunk_tokens must be >= 1")
        if problems:
            raise ConfigError("Invalid emulator settings.", problems=problems)


@dataclass(frozen=True)
class ModulePlan:
    """How one decoder linear module is compressed."""

    name: str
    block: int
    path: str
    ratio: float
    rank: int
    in_features: int
    out_features: int
    bias: bool


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


# -- plan ------------------------------------------------------------------------------------------
def _last_match(name: str, pairs: tuple[tuple[str, Any], ...]) -> Any:
    found = None
    for pattern, value in pairs:
        if fnmatch.fnmatchcase(name, pattern):
            found = value
    return found


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
            ratio = _last_match(name, cfg.ratio_overrides)
            ratio = cfg.ratio if ratio is None else float(ratio)
            if ratio >= 1.0:
                continue
            out_f, in_f = ckpt.info(f"{name}.weight").shape
            rank = _last_match(name, cfg.rank_overrides)
            rank = rank_for_ratio(ratio, out_f, in_f) if rank is None else int(rank)
            plan[name] = ModulePlan(name, b, path, ratio, min(rank, out_f, in_f), in_f, out_f,
                                    f"{name}.bias" in ckpt)
    if not plan:
        raise ConfigError("The compression plan compresses no module.",
                          hint="Remove dense patterns or ρ ≥ 1 overrides that cover every decoder module.")
    return plan


# -- small helpers -----------------------------------------------------------------------------------
def _resolve_dtypes(cfg: EmulatorConfig, device: torch.device) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """(compute, statistics, linear algebra) dtypes.

    Compute: :func:`~emloc_engine.machine.devices.compute_dtype`. Statistics are summed on the
    device, in fp64 on the CPU (or with an fp64 forward), else fp32. The factorisation runs on
    :func:`~emloc_engine.machine.devices.linalg_device`, in fp64 when that is the CPU, else fp32.
    """
    compute = devices.compute_dtype(device, cfg.compute_dtype)
    stats = torch.float64 if device.type == "cpu" or compute == torch.float64 else torch.float32
    cpu_linalg = devices.linalg_device(device).type == "cpu"
    linalg = _DTYPES[cfg.linalg_dtype] if cfg.linalg_dtype != "auto" else (torch.float64 if cpu_linalg else torch.float32)
    return compute, stats, linalg


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def calibration_fingerprint(ids: tuple[tuple[int, ...], ...]) -> str:
    """sha256 prefix of the calibration token ids (order and content)."""
    return _sha([list(s) for s in ids])


def source_revision(model_dir: Path) -> str | None:
    """The commit of an HF-cache snapshot folder (its name), else None."""
    return model_dir.name if model_dir.parent.name == "snapshots" else None


@dataclass(frozen=True)
class MemoryLayout:
    """How the build fits its budget: tokens per forward chunk and where hidden states live."""

    budget_bytes: int
    chunk_tokens: int
    offload_hidden: bool


def plan_build_memory(cfg: EmulatorConfig, hf_config: Any, ckpt: Checkpoint, device: torch.device,
                      lengths: list[int], elem: int) -> MemoryLayout:
    """Chunking from the memory budget, with an explicit account of what stays resident.

    Budget (default): 40% of the checkpoint's bytes, at least 2 GiB, at most the device's total,
    so construction peaks well under half of the model's inference peak. Resident: the hidden states
    of every sample (``tokens × hidden × elem``), the group statistics (``Σ in² × 4``), one block
    twice (stored + compute copy) and the factorisation temporaries (``≈ 3 · widest_in² × 4``).
    The rest goes to activations of one chunk, about ``(8·intermediate + 16·hidden)`` bytes per
    token in bf16. When that leaves less than one sample, the hidden states move to (pinned) CPU
    memory. Depends only on settings and checkpoint (never on free memory right now), so a resumed
    build chunks exactly like the interrupted one.
    """
    max_len = max(lengths)
    h = int(hf_config.hidden_size)
    inter = int(getattr(hf_config, "intermediate_size", 4 * h) or 4 * h)
    per_token = (8 * inter + 16 * h) * max(elem, 2) // 2
    if cfg.memory_budget_bytes is not None:
        budget = cfg.memory_budget_bytes
    else:
        budget = max(2 << 30, int(0.4 * sum(i.nbytes for i in ckpt.infos())))
        if device.type == "cuda":
            budget = min(budget, torch.cuda.get_device_properties(device).total_memory)
    blocks = max(1, num_blocks(hf_config))
    block_bytes = sum(i.nbytes for i in ckpt.infos() if ".layers." in i.name) // blocks
    fixed = 4 * (3 * h * h + inter * inter) + 2 * block_bytes * max(1, elem // 2) + 3 * 4 * max(h, inter) ** 2
    hidden = sum(lengths) * h * elem
    offload = device.type == "cuda" and budget - fixed - hidden < per_token * max_len
    room = budget - fixed - (0 if offload else hidden)
    if cfg.chunk_tokens is not None:
        chunk = max(cfg.chunk_tokens, max_len)
    else:
        chunk = max(max_len, min(room // per_token, 1 << 17))
        if room < per_token * max_len:
            log.warning("memory budget of %.1f GiB is tight for %d-token samples; running one sample at a time",
                        budget / 2**30, max_len)
    return MemoryLayout(int(budget), int(chunk), bool(offload))


def _shard_build_id(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        return meta.get("emloc_build")
    except Exception:  # an unreadable leftover is simply rebuilt
        return None


def _block_tensors(ckpt: Checkpoint, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of one block, CPU, stored dtype, keyed by its name inside the block."""
    return {n[len(prefix):]: ckpt.get(n) for n in ckpt.with_prefix(prefix)}


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
    hf_dict = load_config(model_dir)
    spec = arch_spec(hf_dict)
    blocks = num_blocks(hf_dict)
    ckpt = Checkpoint(model_dir)
    plan = plan_modules(cfg, spec, ckpt, blocks)
    device = devices.resolve_device(cfg.device)
    compute, stats_dtype, linalg = _resolve_dtypes(cfg, device)

    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model_dir)
    samples = _check_calibration(cfg, hf_config)
    n_tokens = sum(len(s) for s in samples)
    layout = plan_build_memory(cfg, hf_config, ckpt, device, [len(x) for x in samples],
                               torch.finfo(compute).bits // 8)
    chunk_tokens = layout.chunk_tokens
    calib_fp = calibration_fingerprint(samples)
    source_fp = fingerprint_model(model_dir)
    meta_path = out_dir / EMULATOR_META
    allocation: dict[str, Any] | None = None
    build_progress = progress
    if cfg.allocation == "spectral":
        key = _sha({"version": _ALLOCATION_VERSION, "format": EMULATOR_FORMAT_VERSION, "source": source_fp,
                    "calibration": calib_fp, "plan": {n: p.rank for n, p in plan.items()},
                    "free": sorted(_free_modules(cfg, plan)), "device": device.type, "compute": str(compute),
                    "stats": str(stats_dtype), "chunk_tokens": chunk_tokens})
        allocation = _read_allocation(out_dir, key)
        if allocation is None:
            if meta_path.exists() and not cfg.overwrite and \
                    json.loads(meta_path.read_text(encoding="utf-8")).get("spectral_allocation", {}).get("key") != key:
                raise ConfigError(f"{out_dir} already holds an emulator built with other settings.",
                                  hint="Pass overwrite (--overwrite) or choose another run folder.")
            allocation = _spectral_allocation(cfg, spec, ckpt, plan, device, compute, stats_dtype, blocks,
                                              hf_config, samples, layout, key, sub(progress, 0.0, _SPECTRA_SHARE))
            out_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out_dir / ALLOCATION_FILE, allocation)
            build_progress = sub(progress, _SPECTRA_SHARE, 1.0)
        plan = _apply_allocation(plan, allocation)
    build_id = _sha({"format": EMULATOR_FORMAT_VERSION, "source": source_fp, "calibration": calib_fp,
                     "plan": {n: p.rank for n, p in plan.items()}, "device": device.type, "compute": str(compute),
                     "stats": str(stats_dtype), "linalg": str(linalg), "solver": cfg.solver,
                     "chunk_tokens": chunk_tokens,
                     **({"allocation": cfg.allocation} if cfg.allocation != "uniform" else {})})
    progress = build_progress

    if meta_path.exists():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        if old.get("build_id") == build_id:
            log.info("emulator in %s is complete and matches the settings; nothing to do", out_dir)
            progress.update(1.0, "emulator already built")
            return _result(out_dir, old, ckpt, time.monotonic() - t0, 0.0, tuple(range(blocks)), n_tokens,
                           chunk_tokens, device)
        if not cfg.overwrite:
            raise ConfigError(f"{out_dir} already holds an emulator built with other settings.",
                              hint="Pass overwrite (--overwrite) or choose another run folder.")
        meta_path.unlink()  # from now on the folder is incomplete until the new emloc.json lands
    out_dir.mkdir(parents=True, exist_ok=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    progress.update(0.0, f"emulator: {len(plan)} modules in {blocks} blocks, {n_tokens} calibration tokens")
    state = _BuildState(cfg, spec, ckpt, plan, device, compute, stats_dtype, linalg, build_id, blocks)
    try:
        resumed = state.run(hf_config, samples, layout, progress)
    except torch.OutOfMemoryError as exc:
        raise InsufficientMemory(
            f"Out of GPU memory while building the emulator: {exc}".splitlines()[0],
            hint="Lower --calib or --max-length, or set a smaller memory budget / chunk_tokens so that "
                 "fewer tokens go through a block at once.") from exc
    finally:
        state.close()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    meta = _finish(cfg, out_dir, model_dir, spec, blocks, plan, samples, n_tokens, calib_fp, source_fp, build_id,
                   allocation, dict(device=str(device), compute_dtype=str(compute), statistics_dtype=str(stats_dtype),
                        linalg_dtype=str(linalg), solver=cfg.solver, chunk_tokens=chunk_tokens,
                        memory_budget_bytes=layout.budget_bytes, offload_hidden=layout.offload_hidden,
                        wall_s=round(time.monotonic() - t0, 3), peak_vram_gib=round(peak, 3),
                        timings_s={k: round(v, 3) for k, v in state.timings.items()}))
    progress.update(1.0, f"emulator written to {out_dir}")
    return _result(out_dir, meta, ckpt, time.monotonic() - t0, peak, resumed, n_tokens, chunk_tokens, device)


def _free_modules(cfg: EmulatorConfig, plan: dict[str, ModulePlan]) -> list[str]:
    """Planned modules whose rank the spectral allocation may choose: those without a user rank override."""
    return [n for n in plan if _last_match(n, cfg.rank_overrides) is None]


def _read_allocation(out_dir: Path, key: str) -> dict[str, Any] | None:
    """The stored spectral allocation of this build's inputs, or None (absent, unreadable or stale)."""
    try:
        data = json.loads((out_dir / ALLOCATION_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def _apply_allocation(plan: dict[str, ModulePlan], allocation: Mapping[str, Any]) -> dict[str, ModulePlan]:
    """The plan with the allocation's ranks, without the modules it keeps dense."""
    ranks = {str(n): int(k) for n, k in allocation["rank_overrides"]}
    dense = set(allocation["dense"])
    out = {}
    for name, p in plan.items():
        if name in dense:
            continue
        k = ranks.get(name)
        out[name] = p if k is None else ModulePlan(p.name, p.block, p.path, p.ratio,
                                                   min(k, p.out_features, p.in_features), p.in_features,
                                                   p.out_features, p.bias)
    if not out:
        raise ConfigError("The spectral allocation keeps every module dense: nothing is compressed.",
                          hint="Use a lower ratio or allocation uniform.")
    return out


def whitened_spectrum(w: torch.Tensor, c: torch.Tensor, device: torch.device | None = None) -> list[float]:
    """Descending ``σ_i²`` of ``W S`` (``S Sᵀ = C``), fp64, clamped at 0; ``min(out, in)`` values.

    ``out ≤ in``: eigenvalues of ``W C Wᵀ``. ``out > in``: with ``W = Q R`` (thin QR), those of
    ``R C Rᵀ`` (in × in), which are the nonzero ones of ``W C Wᵀ = Q (R C Rᵀ) Qᵀ``. No root of ``C``
    is formed, so a singular ``C`` is fine.

    Raises:
        DataError: ``C`` holds NaN or Inf (the activations overflowed).
    """
    w64 = w.to(device=device, dtype=torch.float64)
    c64 = c.to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(c64).all()):
        raise DataError("A calibration statistic holds NaN or Inf.",
                        hint="The activations overflowed; use compute_dtype float32.")
    if w64.shape[0] > w64.shape[1]:
        w64 = torch.linalg.qr(w64, mode="r").R
    m = w64 @ c64 @ w64.T
    ev = torch.linalg.eigvalsh((m + m.T) / 2).flip(0).clamp_min(0.0)
    return [float(x) for x in ev.cpu().tolist()]


def _spectral_allocation(cfg: EmulatorConfig, spec: ArchSpec, ckpt: Checkpoint, plan: dict[str, ModulePlan],
                         device: torch.device, compute: torch.dtype, stats: torch.dtype, blocks: int,
                         hf_config: Any, samples: tuple[tuple[int, ...], ...], layout: MemoryLayout, key: str,
                         progress: Progress) -> dict[str, Any]:
    """The spectra pass and the greedy allocation over the free modules (a JSON-ready record)."""
    t0 = time.monotonic()
    free = _free_modules(cfg, plan)
    progress.update(0.0, f"rank allocation: measuring the spectra of {len(free)} modules")
    spectra = _measure(cfg, spec, ckpt, plan, device, compute, stats, blocks, hf_config, samples, layout,
                       set(free), progress)
    shapes = {n: (plan[n].out_features, plan[n].in_features) for n in free}
    budget = sum(plan[n].rank * (plan[n].out_features + plan[n].in_features) for n in free)
    overrides, dense = allocate_ranks({n: spectra[n] for n in free}, shapes, cfg.ratio, budget=budget)
    spent = kept_parameters(shapes, overrides, dense)
    wall = time.monotonic() - t0
    log.info("spectral rank allocation: %d modules, %d kept dense, %d of %d parameters, %.1f s",
             len(free), len(dense), spent, budget, wall)
    progress.update(1.0, f"rank allocation: {len(dense)} of {len(free)} modules dense, "
                         f"{spent:,} of {budget:,} parameters")
    return {"key": key, "allocation": "spectral", "version": _ALLOCATION_VERSION, "budget": budget,
            "params_spent": spent, "spectra_wall_s": round(wall, 3),
            "rank_overrides": [[n, k] for n, k in overrides], "dense": list(dense)}


def _measure(cfg: EmulatorConfig, spec: ArchSpec, ckpt: Checkpoint, plan: dict[str, ModulePlan],
             device: torch.device, compute: torch.dtype, stats: torch.dtype, blocks: int, hf_config: Any,
             samples: tuple[tuple[int, ...], ...], layout: MemoryLayout, modules: set[str],
             progress: Progress) -> dict[str, list[float]]:
    if not modules:
        return {}
    state = _BuildState(cfg, spec, ckpt, plan, device, compute, stats, torch.float64, "", blocks)
    try:
        return state.spectra(hf_config, samples, layout, modules, progress)
    except torch.OutOfMemoryError as exc:
        raise InsufficientMemory(
            f"Out of GPU memory while measuring spectra for the rank allocation: {exc}".splitlines()[0],
            hint="Lower --calib or --max-length, or set a smaller memory budget / chunk_tokens.") from exc
    finally:
        state.close()


def measure_spectra(cfg: EmulatorConfig, progress: Progress = NULL_PROGRESS) -> dict[str, list[float]]:
    """The whitened spectrum (:func:`whitened_spectrum`) of every module the plan of ``cfg`` compresses,
    streamed exactly like the build's statistics (the first pass of ``allocation="spectral"``).
    Reads the model block by block and writes nothing.

    Raises:
        ConfigError, DataError, UnsupportedModel, ModelNotFound, InsufficientMemory, Cancelled:
            as :func:`build_emulator`.
    """
    hf_dict = load_config(cfg.model_dir)
    spec = arch_spec(hf_dict)
    blocks = num_blocks(hf_dict)
    ckpt = Checkpoint(cfg.model_dir)
    plan = plan_modules(cfg, spec, ckpt, blocks)
    device = devices.resolve_device(cfg.device)
    compute, stats_dtype, _ = _resolve_dtypes(cfg, device)
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(cfg.model_dir)
    samples = _check_calibration(cfg, hf_config)
    layout = plan_build_memory(cfg, hf_config, ckpt, device, [len(x) for x in samples],
                               torch.finfo(compute).bits // 8)
    return _measure(cfg, spec, ckpt, plan, device, compute, stats_dtype, blocks, hf_config, samples, layout,
                    set(plan), progress)


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


class _BuildState:
    """The block loop of :func:`build_emulator` and the resources it must release.

    Two helper threads keep the GPU busy: a reader prefetches block ``i+1`` from the shards while
    block ``i`` computes, and a writer saves finished shards (and the non-block tensors) while the
    next block computes. Each thread has its own :class:`Checkpoint` and closes it after every
    block, so the shards' memory maps never pin more than one block in RAM.
    """

    def __init__(self, cfg: EmulatorConfig, spec: ArchSpec, ckpt: Checkpoint, plan: dict[str, ModulePlan],
                 device: torch.device, compute: torch.dtype, stats: torch.dtype, linalg: torch.dtype,
                 build_id: str, blocks: int) -> None:
        self.cfg, self.spec, self.ckpt, self.plan = cfg, spec, ckpt, plan
        self.device, self.compute, self.stats, self.linalg = device, compute, stats, linalg
        self.build_id, self.blocks = build_id, blocks
        self.out_dir = cfg.out_dir.resolve()
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emloc-read")
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emloc-write")
        self.writes: list[Future[None]] = []
        # Several devices: block b is factorised on a free factor device while the main device
        # already runs block b+1 (the forward only needs the ORIGINAL blocks, never the factors).
        self.factor_devices: queue.Queue[torch.device] = queue.Queue()
        for d in cfg.factor_devices:
            self.factor_devices.put(torch.device(d))
        self.factor_pool = (ThreadPoolExecutor(max_workers=len(cfg.factor_devices), thread_name_prefix="emloc-factor")
                            if cfg.factor_devices else None)
        self.factor_jobs: list[Future[list[tuple[int, float]]]] = []
        self.chunks: list[CalibrationChunk] = []
        self.timings: dict[str, float] = {"read_wait": 0.0, "load": 0.0, "forward": 0.0, "factorize": 0.0,
                                          "write_wait": 0.0}

    def close(self) -> None:
        if self.factor_pool is not None:
            self.factor_pool.shutdown(wait=True)
        self.reader.shutdown(wait=True, cancel_futures=True)
        self.writer.shutdown(wait=True)  # finished blocks always land: a rerun resumes after them
        self.chunks = []
        self.ckpt.close()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _tick(self, name: str, t: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] += now - t
        return now

    def _skeleton(self, hf_config: Any) -> Any:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=self.compute)
        model.eval()
        return model

    def _read(self, b: int) -> dict[str, torch.Tensor]:
        ckpt = Checkpoint(self.ckpt.model_dir)
        try:
            return _block_tensors(ckpt, self._prefix(b))
        finally:
            ckpt.close()

    def _drain_writes(self, wait_all: bool) -> None:
        """Re-raise a failed write; with ``wait_all`` also wait for the pending ones."""
        t = time.perf_counter()
        for fut in list(self.writes):
            if wait_all or fut.done():
                fut.result()
                self.writes.remove(fut)
        self.timings["write_wait"] += time.perf_counter() - t

    def run(self, hf_config: Any, samples: tuple[tuple[int, ...], ...], layout: MemoryLayout,
            progress: Progress) -> tuple[int, ...]:
        """Capture block inputs, then build every block; returns the blocks reused from disk."""
        progress.check_cancelled()
        self.writes.append(self.writer.submit(self._write_rest))
        model = self._capture(hf_config, samples, layout)
        progress.update(0.03, f"captured the input of block 0 ({len(self.chunks)} chunks)")
        layers = decoder_layers(model, self.spec)
        resumed: list[int] = []
        clock = EtaClock()
        pending: Future[dict[str, torch.Tensor]] = self.reader.submit(self._read, 0)
        for b in range(self.blocks):
            progress.check_cancelled()
            self._drain_writes(wait_all=False)
            t = time.perf_counter()
            tensors = pending.result()
            self.timings["read_wait"] += time.perf_counter() - t
            if b + 1 < self.blocks:
                pending = self.reader.submit(self._read, b + 1)
            done = _shard_build_id(self.out_dir / BLOCK_FILE.format(b)) == self.build_id
            errors = [(b, e) for e in self._block(layers[b], b, tensors, reuse=done)]
            errors += self._drain_factor_jobs(wait_all=b == self.blocks - 1)
            layers[b].to("meta")
            del tensors
            if done:
                resumed.append(b)
            frac = (b + 1) / self.blocks
            for blk, e in errors:
                progress.log("emulator/rel_error", e, blk)
            if self.device.type == "cuda":
                progress.log("gpu/peak_gib", torch.cuda.max_memory_allocated(self.device) / 2**30, b)
            progress.update(0.03 + 0.95 * frac, f"block {b + 1}/{self.blocks} {'reused' if done else 'factorised'}, "
                                                f"ETA {format_seconds(clock.eta_s(frac))}")
        self._drain_writes(wait_all=True)
        return tuple(resumed)

    def _capture(self, hf_config: Any, samples: tuple[tuple[int, ...], ...], layout: MemoryLayout) -> Any:
        """The model skeleton, with ``self.chunks`` holding the input of block 0 for every chunk."""
        model = self._skeleton(hf_config)
        embed_name = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
        embed = self.ckpt.get(embed_name, dtype=self.compute, device=self.device)
        self.ckpt.close()
        pad = hf_config.pad_token_id if isinstance(getattr(hf_config, "pad_token_id", None), int) else 0
        self.chunks = capture_block_inputs(model, self.spec, embed, samples,
                                           chunk_samples([len(s) for s in samples], layout.chunk_tokens),
                                           device=self.device, dtype=self.compute, pad_id=pad,
                                           offload=layout.offload_hidden)
        return model

    def spectra(self, hf_config: Any, samples: tuple[tuple[int, ...], ...], layout: MemoryLayout,
                modules: set[str], progress: Progress) -> dict[str, list[float]]:
        """The whitened spectrum of every module in ``modules``: the build's capture, block forward and
        statistics, but no factorisation and nothing written; stops after the last block it needs."""
        progress.check_cancelled()
        model = self._capture(hf_config, samples, layout)
        progress.update(0.05, f"rank allocation: captured the input of block 0 ({len(self.chunks)} chunks)")
        layers = decoder_layers(model, self.spec)
        last = max(self.plan[n].block for n in modules)
        linalg_device = devices.linalg_device(self.device)
        out: dict[str, list[float]] = {}
        clock = EtaClock()
        pending: Future[dict[str, torch.Tensor]] = self.reader.submit(self._read, 0)
        for b in range(last + 1):
            progress.check_cancelled()
            t = time.perf_counter()
            tensors = pending.result()
            self.timings["read_wait"] += time.perf_counter() - t
            if b < last:
                pending = self.reader.submit(self._read, b + 1)
            layer = layers[b]
            self._load(layer, tensors)
            mods = {p.path: p for p in self.plan.values() if p.block == b and p.name in modules}
            groups = {g.name: g for g in self.spec.groups if any(m in mods for m in g.modules)}
            t = time.perf_counter()
            with recording(layer, {n: g.modules[0] for n, g in groups.items()}, self.stats) as rec:
                run_block(layer, b, self.chunks, self.device, recorder=rec, keep_output=b < last)
                stats = rec.stats
            t = self._tick("forward", t)
            for gname, group in groups.items():
                c = stats.pop(gname)
                for path in group.modules:
                    if path in mods:
                        out[mods[path].name] = whitened_spectrum(tensors[f"{path}.weight"], c, linalg_device)
                del c
            self._tick("factorize", t)
            layer.to("meta")
            del tensors, stats
            frac = (b + 1) / (last + 1)
            progress.update(0.05 + 0.9 * frac, f"rank allocation: block {b + 1}/{last + 1} measured, "
                                               f"ETA {format_seconds(clock.eta_s(frac))}")
        return out

    def _load(self, layer: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Materialise one block's tensors in ``layer`` on the compute device; returns them on that device."""
        dev = {k: v.to(self.device, non_blocking=True) for k, v in tensors.items()}
        layer.load_state_dict({k: v.to(self.compute) for k, v in dev.items()}, assign=True, strict=True)
        layer.to(self.device)
        return dev

    def _drain_factor_jobs(self, wait_all: bool) -> list[tuple[int, float]]:
        """Errors of finished factor jobs (re-raising a failed one); waits while every device is busy."""
        out: list[tuple[int, float]] = []
        limit = 0 if wait_all else len(self.cfg.factor_devices)  # one job in flight per device
        t = time.perf_counter()
        while self.factor_jobs and (len(self.factor_jobs) > limit or self.factor_jobs[0].done()):
            out += self.factor_jobs.pop(0).result()
        self.timings["factorize_wait"] = self.timings.get("factorize_wait", 0.0) + time.perf_counter() - t
        return out

    def _factorize_groups(self, b: int, groups: dict[str, Any], mods: dict[str, ModulePlan],
                          weights: dict[str, torch.Tensor], stats: dict[str, torch.Tensor],
                          device: torch.device) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
        """Factorise every compressed module of block ``b`` on ``device`` (weights and C moved there)."""
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        errors: dict[str, float] = {}
        for gname, group in groups.items():
            c = stats.pop(gname).to(device)
            shared: dict[str, torch.Tensor] = {}
            for path in group.modules:
                if path not in mods:
                    continue
                w = weights[f"{path}.weight"].to(device)
                try:
                    f = factorize(w, c, mods[path].rank, dtype=self.linalg, solver=self.cfg.solver, cache=shared)
                except FloatingPointError as exc:
                    hint = ("The activations overflowed; use compute_dtype float32." if "NaN" in str(exc) else
                            "Σ XᵀX cannot be indefinite: the statistics GEMM was computed wrongly. Run again with "
                            "EMLOC_STATS_TF32=0 (plain fp32 GEMMs), or compute_dtype float32.")
                    raise DataError(f"Statistics of {mods[path].name} are unusable: {exc}.", hint=hint) from exc
                factors[path] = (f.u.to(w.dtype).cpu(), f.v.to(w.dtype).cpu())
                errors[path] = f.rel_error
            del c, shared
        return factors, errors

    def _factor_job(self, b: int, groups: dict[str, Any], mods: dict[str, ModulePlan],
                    tensors: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> list[tuple[int, float]]:
        device = self.factor_devices.get()
        try:
            factors, errors = self._factorize_groups(b, groups, mods, tensors, stats, device)
        finally:
            self.factor_devices.put(device)
        self.writes.append(self.writer.submit(self._write_block, b, tensors, factors, errors))
        return [(b, e) for e in errors.values()]

    def _prefix(self, b: int) -> str:
        return f"{self.spec.block_prefix}.{b}."

    def _block(self, layer: torch.nn.Module, b: int, tensors: dict[str, torch.Tensor], reuse: bool) -> list[float]:
        """Run block ``b`` over the calibration chunks; factorise and write it unless ``reuse``."""
        t = time.perf_counter()
        dev = self._load(layer, tensors)
        t = self._tick("load", t)
        last = b == self.blocks - 1
        mods = {p.path: p for p in self.plan.values() if p.block == b}
        if reuse or not mods:
            run_block(layer, b, self.chunks, self.device, keep_output=not last)
            self._tick("forward", t)
            if not reuse:
                self.writes.append(self.writer.submit(self._write_block, b, tensors, {}, {}))
            return []
        groups = {g.name: g for g in self.spec.groups if any(m in mods for m in g.modules)}
        with recording(layer, {n: g.modules[0] for n, g in groups.items()}, self.stats) as rec:
            run_block(layer, b, self.chunks, self.device, recorder=rec, keep_output=not last)
            stats = rec.stats
        t = self._tick("forward", t)
        if self.factor_pool is not None:
            # C leaves the main device with the job; the job owns the CPU copies of the weights.
            self.factor_jobs.append(self.factor_pool.submit(self._factor_job, b, groups, mods, tensors, dict(stats)))
            return []
        factors, errors = self._factorize_groups(b, groups, mods, dev, stats, devices.linalg_device(self.device))
        self._tick("factorize", t)
        self.writes.append(self.writer.submit(self._write_block, b, tensors, factors, errors))
        return list(errors.values())

    def _write_block(self, b: int, tensors: dict[str, torch.Tensor],
                     factors: dict[str, tuple[torch.Tensor, torch.Tensor]], errors: dict[str, float]) -> None:
        prefix = self._prefix(b)
        out: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            module, _, leaf = key.rpartition(".")
            if module in factors:
                if leaf == "bias":
                    out[f"{prefix}{module}.u.bias"] = t.contiguous()
                continue
            out[prefix + key] = t.contiguous()
        for module, (u, v) in factors.items():
            out[f"{prefix}{module}.u.weight"] = u
            out[f"{prefix}{module}.v.weight"] = v
        meta = {"format": "pt", "emloc_build": self.build_id, "emloc_block": str(b),
                "emloc_errors": json.dumps({prefix + m: e for m, e in errors.items()})}
        with atomic_path(self.out_dir / BLOCK_FILE.format(b)) as tmp:
            save_file(out, str(tmp), metadata=meta)

    def _write_rest(self) -> None:
        target = self.out_dir / REST_FILE
        if _shard_build_id(target) == self.build_id:
            return
        ckpt = Checkpoint(self.ckpt.model_dir)
        try:
            inside = f"{self.spec.block_prefix}."
            tensors = {n: ckpt.get(n).contiguous() for n in ckpt.names() if not n.startswith(inside)}
        finally:
            ckpt.close()
        with atomic_path(target) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "emloc_build": self.build_id})


def _finish(cfg: EmulatorConfig, out_dir: Path, model_dir: Path, spec: ArchSpec, blocks: int,
            plan: dict[str, ModulePlan], samples: tuple[tuple[int, ...], ...], n_tokens: int, calib_fp: str,
            source_fp: str, build_id: str, allocation: Mapping[str, Any] | None,
            build: dict[str, Any]) -> dict[str, Any]:
    """Copy config/tokenizer files, write the index, then ``emloc.json`` (last)."""
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES and not f.name.endswith(".index.json") \
                and f.name != EMULATOR_META:
            with atomic_path(out_dir / f.name) as tmp:
                shutil.copyfile(f, tmp)
    files = [REST_FILE, *(BLOCK_FILE.format(b) for b in range(blocks))]
    weight_map: dict[str, str] = {}
    errors: dict[str, float] = {}
    total = 0
    for name in files:
        with safe_open(str(out_dir / name), framework="pt") as fh:
            errors.update(json.loads((fh.metadata() or {}).get("emloc_errors", "{}")))
            for key in fh.keys():  # noqa: SIM118 - safe_open handles are not mappings
                weight_map[key] = name
                sl = fh.get_slice(key)
                total += math.prod(sl.get_shape()) * element_bytes(sl.get_dtype())
    write_json_atomic(out_dir / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    modules = {n: {"ratio": p.ratio, "rank": p.rank, "in_features": p.in_features, "out_features": p.out_features,
                   "bias": p.bias, "rel_error": errors.get(n)} for n, p in plan.items()}
    meta = {
        "format": EMULATOR_FORMAT,
        "format_version": EMULATOR_FORMAT_VERSION,
        "engine_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source_model": {"path": str(model_dir), "revision": source_revision(model_dir), "fingerprint": source_fp},
        "method": METHOD,
        "whitening": WHITENING,
        "ratio": cfg.ratio,
        "plan": {"ratio_overrides": [list(x) for x in cfg.ratio_overrides], "dense_patterns": list(cfg.dense_patterns),
                 "rank_overrides": [list(x) for x in cfg.rank_overrides]},
        "allocation": cfg.allocation,
        **({"spectral_allocation": {k: allocation[k] for k in ("key", "version", "budget", "params_spent",
                                                                "spectra_wall_s", "dense")}}
           if allocation is not None else {}),
        "calibration": {"samples": len(samples), "tokens": n_tokens, "fingerprint": calib_fp,
                        "max_length": max(len(s) for s in samples)},
        "build_id": build_id,
        "build": build,
        "dense_modules": [spec.module_name(b, m) for b in range(blocks) for m in spec.linear_modules
                          if spec.module_name(b, m) not in plan],
        "modules": modules,
    }
    write_json_atomic(out_dir / EMULATOR_META, meta)
    return meta


def _result(out_dir: Path, meta: dict[str, Any], ckpt: Checkpoint, wall_s: float, peak: float,
            resumed: tuple[int, ...], n_tokens: int, chunk_tokens: int, device: torch.device) -> EmulatorResult:
    original = ckpt.num_parameters()
    kept = original
    for spec in meta["modules"].values():
        o, i, k = int(spec["out_features"]), int(spec["in_features"]), int(spec["rank"])
        kept += k * (o + i) - o * i
    return EmulatorResult(out_dir, meta["modules"], kept, original, wall_s, peak, resumed, n_tokens,
                          chunk_tokens, str(device))


__all__ = ["ALLOCATIONS", "EmulatorConfig", "EmulatorResult", "ModulePlan", "build_emulator", "measure_spectra",
           "plan_modules", "whitened_spectrum"]
