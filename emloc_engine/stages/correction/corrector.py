"""Stage 3: LoRA correction: move what the adapter learned on the emulator onto the original model.

For a module with original weight ``W`` (out × in), emulator weight ``Wᴱ = u v`` and trained adapter
``Λ = s B A`` (``A``: r × in, ``B``: out × r, ``s = alpha/r`` or ``alpha/√r`` with rsLoRA), the
corrected adapter ``Λᶜ`` satisfies, for every ``x`` in the row space of ``A``,

    x (W + Λᶜ)ᵀ = x (Wᴱ + Λ)ᵀ.

1. Re-parametrise by the thin SVD ``Aᵀ = Q R Pᵀ`` (``Q``: in × m orthonormal, ``m = min(r, in)``):
   ``A' = Qᵀ``, ``B' = B P R``; then ``B' A' = B A``.
2. Gap on each basis direction: ``Δ = (W − Wᴱ) Q = W Q − u (v Q)`` (out × m), in fp64 from fp32
   copies of the stored tensors (``Wᴱ`` is never formed: two thin products instead of a big one).
   Biases are identical in both models and cancel.
3. Exact correction: ``B'ᶜ = B' − Δ / s`` (the reference code forgets ``/ s``).
4. Damping: with ``cᵢ = Δᵢ / s`` (column ``i``), if ``mean|cᵢ| > λ · mean|B'ᵢ|`` the column is scaled
   to exactly that bound. λ = ∞ is the exact identity; λ = 0 returns the adapter unchanged (the
   original ``A``, ``B``, bit for bit).

Directions where ``A`` is rank deficient (singular value ≤ ``σ_max · max(in, r) · eps``) and, when
``r > in``, the rows beyond ``in`` get no correction (they carry no input direction); ``A'``/``B'``
are zero-padded back to ``r`` so the adapter keeps its shapes and config.

λ is chosen on held-out data by default (``lambda_=None``): corrections are computed once per
module, each λ of ``lambda_grid`` is a cheap rescaling, and the original model plus each candidate
adapter is evaluated; the lowest loss wins (ties go to the smaller λ). Measured on a real 135M model
at ρ = 0.4, a fixed λ = 3 was worse than no correction, hence measuring.

Output: ``RUN_DIR/adapter-corrected/``, a new peft adapter (written to ``*.partial`` and renamed):
``adapter_config.json`` of the trained adapter with ``base_model_name_or_path`` = the original model,
``adapter_model.safetensors`` with every tensor in the trained adapter's stored dtype (peft trains
LoRA factors in fp32, so normally fp32), and ``emloc_correction.json`` (λ, λ table, source adapter
path and fingerprint, per-module report). An adapter that has ``emloc_correction.json`` is never
corrected again.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import time
from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from emloc_engine.core.architectures import num_blocks
from emloc_engine.core.atomic import atomic_dir
from emloc_engine.core.errors import ConfigError, MergeError, ModelNotFound, RunStateError, UnsupportedModel
from emloc_engine.core.layout import RunLayout
from emloc_engine.core.memory import HIDDEN_OFFLOAD
from emloc_engine.core.progress import NULL_PROGRESS, Progress, sub
from emloc_engine.core.version import __version__
from emloc_engine.machine import devices
from emloc_engine.stages.correction.evaluation import AdapterEvaluator, streamed_losses
from emloc_engine.stages.training.batches import ExampleLike as TokenExample  # CorrectionConfig's name for it
from emloc_engine.weights.adapters import (
    CORRECTION_META,
    LoraAdapter,
    fingerprint_adapter,
    is_corrected,
    read_adapter,
    write_adapter,
)
from emloc_engine.weights.checkpoint import Checkpoint
from emloc_engine.weights.headers import load_config
from emloc_engine.weights.lowrank import read_emulator_meta

if TYPE_CHECKING:
    from emloc_engine.data import DataConfig

from emloc_engine.machine.process_memory import gpu_peak_gib, reset_gpu_peak
from emloc_engine.stages.correction.options import CorrectionOptions

log = logging.getLogger(__name__)
CORRECTION_FORMAT = "emloc-correction"
_TIE_RTOL = 1e-9


# --------------------------------------------------------------------------------------------
# Pure maths
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreparedModule:
    """The λ-independent part of one module's correction (all tensors on the CPU).

    Attributes:
        A: the trained ``A`` (r × in), stored dtype, untouched.
        B: the trained ``B`` (out × r), stored dtype, untouched.
        scale: the LoRA scale ``s``.
        A_prime: ``A' = Qᵀ`` zero-padded to r × in; ``None`` when ``Δ = 0`` (module not compressed).
        B_prime: ``B' = B P R`` zero-padded to out × r; ``None`` when ``Δ = 0``.
        gap: ``c = Δ / s`` (out × r), zero on rank-deficient and padded directions; ``None`` when ``Δ = 0``.
        adapter_norm: ``‖Λ‖_F = s ‖B A‖_F``.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    adapter_norm: float
    A_prime: torch.Tensor | None = None
    B_prime: torch.Tensor | None = None
    gap: torch.Tensor | None = None

    @property
    def compressed(self) -> bool:
        return self.gap is not None


@dataclass(frozen=True)
class ModuleCorrection:
    """One module's adapter after correction with a given λ.

    Attributes:
        lora_A: new ``A`` (r × in): ``A' = Qᵀ``, or the trained ``A`` itself when nothing is corrected.
        lora_B: new ``B`` (out × r): ``B' − correction``, or the trained ``B`` itself.
        correction: the column-wise correction subtracted from ``B'`` (out × r), after damping.
        damped: per rank-direction, whether damping cut its correction.
        lam: the λ used.
        correction_norm: ``‖Λᶜ − Λ‖_F = s ‖correction‖_F`` (rows of ``A'`` are orthonormal).
        adapter_norm: ``‖Λ‖_F = s ‖B A‖_F``.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    correction: torch.Tensor
    damped: tuple[bool, ...]
    lam: float
    correction_norm: float
    adapter_norm: float

    @property
    def relative_size(self) -> float:
        """``‖Λᶜ − Λ‖_F / ‖Λ‖_F`` (``inf`` when the adapter is zero but the correction is not)."""
        if self.adapter_norm > 0:
            return self.correction_norm / self.adapter_norm
        return 0.0 if self.correction_norm == 0 else math.inf


def _cast(t: torch.Tensor, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    # Move in the stored dtype (bf16: 2 bytes per element over PCIe), then upcast on the device.
    return t.to(device=device if device is not None else t.device).to(dtype)


def lora_norm(A: torch.Tensor, B: torch.Tensor, scale: float) -> float:
    """``‖s B A‖_F`` without forming ``B A``: ``‖B A‖_F² = Σ (BᵀB) ⊙ (A Aᵀ)`` (r × r Gram matrices, fp64)."""
    a, b = A.double(), B.double()
    return scale * math.sqrt(max(0.0, float(((b.T @ b) * (a @ a.T)).sum())))


def prepare_module(W: torch.Tensor, W_e: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None,
                   A: torch.Tensor, B: torch.Tensor, scale: float, *,
                   compute_dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
                   out_dtype: torch.dtype | None = None) -> PreparedModule:
    """Re-parametrise ``A`` and compute the scaled gap ``c = (W − Wᴱ) Q / s`` of one module.

    Args:
        W: original weight (out × in), any float dtype; upcast to ``compute_dtype``.
        W_e: emulator weight: a dense ``Wᴱ`` (out × in), a factor pair ``(u, v)`` with ``Wᴱ = u v``
            (never formed), or ``None`` when the module is not compressed (``Wᴱ = W``, ``Δ = 0``).
        A: LoRA ``A`` (r × in). B: LoRA ``B`` (out × r). scale: ``s`` (> 0).
        compute_dtype: dtype of the SVD and the gap (fp64 by default; fp32 where fp64 is missing).
        device: where to compute (default: where ``W`` is).
        out_dtype: dtype of the returned ``A'``, ``B'``, ``c`` (default ``compute_dtype``); they are on the CPU.

    Returns:
        The :class:`PreparedModule`.

    Raises:
        ConfigError: shapes disagree or ``scale`` is not positive.
    """
    out_f, in_f = W.shape
    r = A.shape[0]
    if A.shape != (r, in_f) or B.shape != (out_f, r):
        raise ConfigError(f"LoRA shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not fit W {tuple(W.shape)}.")
    if not scale > 0:
        raise ConfigError(f"The LoRA scale must be positive (got {scale}).")
    adapter_norm = lora_norm(A, B, scale)
    if W_e is None:
        return PreparedModule(A, B, scale, adapter_norm)
    dev = torch.device(device) if device is not None else W.device
    out_dtype = out_dtype or compute_dtype
    a = _cast(A, compute_dtype, dev)
    # Aᵀ = Q R Pᵀ; Q: in × m, R = diag(σ), Pᵀ: m × r, m = min(in, r). Computed as Aᵀ = Q₁R₁ (reduced QR),
    # R₁ = U₂ Σ Vᵀ (m × r, small): Q = Q₁U₂. Same factors as a direct SVD, backward stable, and much
    # faster for tall-thin matrices (LAPACK's thin SVD of 14336 × 16 is ~20× slower than QR + small SVD).
    q1, r1 = torch.linalg.qr(a.T)
    u2, sigma, p_t = torch.linalg.svd(r1, full_matrices=False)
    q = q1 @ u2
    m = sigma.shape[0]
    tol = (float(sigma.max()) if m else 0.0) * max(in_f, r) * torch.finfo(compute_dtype).eps
    keep = sigma > tol
    b_prime = (_cast(B, compute_dtype, dev) @ p_t.T) * sigma  # B P R
    w = _cast(W, compute_dtype, dev)
    if isinstance(W_e, tuple):
        u, v = (_cast(t, compute_dtype, dev) for t in W_e)
        delta = w @ q - u @ (v @ q)  # (W − u v) Q without forming u v
    else:
        delta = (w - _cast(W_e, compute_dtype, dev)) @ q
    gap = torch.where(keep, delta / scale, torch.zeros((), dtype=compute_dtype, device=dev))
    a_prime = q.T
    if m < r:  # r > in: pad with directions that read nothing
        a_prime = torch.cat([a_prime, a_prime.new_zeros(r - m, in_f)])
        b_prime = torch.cat([b_prime, b_prime.new_zeros(out_f, r - m)], dim=1)
        gap = torch.cat([gap, gap.new_zeros(out_f, r - m)], dim=1)
    return PreparedModule(A, B, scale, adapter_norm, *(t.to(out_dtype).cpu() for t in (a_prime, b_prime, gap)))


def apply_lambda(prep: PreparedModule, lam: float) -> ModuleCorrection:
    """Damp the prepared correction with λ and return the corrected factors.

    Per direction ``i``: ``bound = λ · mean|B'ᵢ|``; if ``mean|cᵢ| > bound`` then ``cᵢ ← cᵢ · bound / mean|cᵢ|``;
    ``B'ᶜᵢ = B'ᵢ − cᵢ``. λ = ∞ never damps; λ = 0 (or a module with ``Δ = 0``) returns ``A``, ``B`` themselves.

    Args:
        prep: output of :func:`prepare_module`.
        lam: λ ≥ 0, ``math.inf`` allowed.

    Returns:
        The :class:`ModuleCorrection` (tensors in ``prep``'s dtype).
    """
    a, b, s, adapter_norm = prep.A, prep.B, prep.scale, prep.adapter_norm
    if prep.gap is None or prep.A_prime is None or prep.B_prime is None:
        return ModuleCorrection(a, b, torch.zeros(b.shape, dtype=b.dtype), (False,) * a.shape[0], lam, 0.0,
                                adapter_norm)
    gap, b_prime = prep.gap, prep.B_prime
    mean_c = gap.abs().mean(dim=0)
    bound = lam * b_prime.abs().mean(dim=0) if math.isfinite(lam) else torch.full_like(mean_c, math.inf)
    over = mean_c > bound
    if lam == 0:
        return ModuleCorrection(a, b, torch.zeros_like(gap), tuple(bool(x) for x in over), lam, 0.0, adapter_norm)
    factor = torch.where(over, bound / torch.where(over, mean_c, torch.ones_like(mean_c)), torch.ones_like(mean_c))
    correction = gap * factor
    return ModuleCorrection(prep.A_prime, b_prime - correction, correction, tuple(bool(x) for x in over), lam,
                            s * float(torch.linalg.matrix_norm(correction.double())), adapter_norm)


def correct_module(W: torch.Tensor, W_e: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None,
                   A: torch.Tensor, B: torch.Tensor, scale: float, lam: float, *,
                   compute_dtype: torch.dtype = torch.float64) -> ModuleCorrection:
    """Correct one module's LoRA factors (pure; see the module docstring for the maths).

    Args:
        W: original weight (out × in). W_e: emulator weight, ``(u, v)`` factors, or ``None`` (= ``W``).
        A: LoRA ``A`` (r × in). B: LoRA ``B`` (out × r). scale: LoRA scale ``s``.
        lam: damping λ ≥ 0 (``math.inf``: exact; 0: unchanged).
        compute_dtype: dtype of all arithmetic and of the returned tensors (except λ = 0).

    Returns:
        The corrected factors and what damping did.
    """
    return apply_lambda(prepare_module(W, W_e, A, B, scale, compute_dtype=compute_dtype), lam)


def choose_lambda(table: Sequence[tuple[float, float]]) -> float:
    """The λ with the lowest loss; losses within a relative 1e-9 of the best tie and go to the smaller λ.

    Non-finite losses never win unless every loss is non-finite (then the smallest λ, i.e. the least change).
    """
    finite = [(lam, loss) for lam, loss in table if math.isfinite(loss)]
    if not finite:
        return min(lam for lam, _ in table)
    best = min(loss for _, loss in finite)
    return min(lam for lam, loss in finite if loss <= best + _TIE_RTOL * max(1.0, abs(best)))


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorrectionConfig(CorrectionOptions):
    """Settings of the LoRA correction (Stage 3): the options plus the folders, the eval data and the device."""

    run_dir: Path = field(metadata={"help": "Run folder holding emulator/ and adapter/."})
    model_dir: Path | None = field(default=None, metadata={
        "help": "Original model folder (default: the emulator's recorded source model)."})
    adapter_dir: Path | None = field(default=None, metadata={
        "help": "Trained adapter to correct (default: RUN_DIR/adapter)."})
    emulator_dir: Path | None = field(default=None, metadata={
        "help": "Emulator the adapter was trained on (default: RUN_DIR/emulator)."})
    out_dir: Path | None = field(default=None, metadata={
        "help": "Where the corrected adapter goes (default: RUN_DIR/adapter-corrected)."})
    data: DataConfig | None = field(default=None, metadata={
        "help": "Dataset whose eval split chooses λ (the run's dataset when run by the orchestrator)."})
    eval_examples: tuple[TokenExample, ...] = field(default=(), metadata={
        "help": "Pre-tokenised held-out examples for choosing λ (used instead of data when given)."})
    device: str = field(default="auto", metadata={"help": "Where to compute: auto, cpu, cuda, cuda:N."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing corrected adapter."})
    stream_original: bool = field(default=False, metadata={
        "help": "Score every λ in one pass with the original streamed block by block from its shards (it need "
                "not fit the GPU); off: load it whole and swap the LoRA weights per λ (faster where it fits)."})
    hidden_on_gpu_bytes: int = field(default=HIDDEN_OFFLOAD, metadata={
        "help": "With the original streamed, the λ search keeps every candidate's hidden states on the GPU up to "
                "this many bytes, else in CPU RAM (the planner gives 0 when keeping them would not fit the budget)."})


    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.device in ("auto", "cpu", "mps") or self.device.startswith("cuda")):
            raise ConfigError(f"Unknown device {self.device!r}.", hint="Use auto, cpu, cuda or cuda:N.")


@dataclass(frozen=True)
class ModuleReport:
    """What the correction did to one module (at the chosen λ)."""

    name: str
    compressed: bool
    rank: int
    scale: float
    correction_norm: float
    adapter_norm: float
    relative_size: float
    damped_directions: int

    @property
    def damped(self) -> bool:
        return self.damped_directions > 0


@dataclass(frozen=True)
class CorrectionResult:
    """Outcome of :func:`correct_lora`.

    Attributes:
        adapter_dir: the corrected adapter folder.
        source_adapter_dir: the trained adapter it came from.
        source_fingerprint: fingerprint of the trained adapter.
        lambda_: the λ used.
        lambda_mode: ``"auto"`` (chosen on held-out data) or ``"fixed"``.
        lambda_table: ``(λ, held-out loss)`` per candidate (empty when λ was fixed).
        modules: per-module report at the chosen λ.
        correction_s: seconds spent computing corrections (reading weights included).
        eval_s: seconds spent evaluating candidates.
        wall_s: total seconds.
        peak_vram_gib: peak GPU memory allocated (0 on CPU).
        compute_dtype: dtype of the correction arithmetic.
    """

    adapter_dir: Path
    source_adapter_dir: Path
    source_fingerprint: str
    lambda_: float
    lambda_mode: str
    lambda_table: tuple[tuple[float, float], ...]
    modules: tuple[ModuleReport, ...]
    correction_s: float
    eval_s: float
    wall_s: float
    peak_vram_gib: float
    compute_dtype: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary for the run manifest (λ = ∞ written as ``"inf"``)."""
        return {
            "adapter_dir": str(self.adapter_dir),
            "source_adapter_dir": str(self.source_adapter_dir),
            "source_fingerprint": self.source_fingerprint,
            "lambda": _json_float(self.lambda_),
            "lambda_mode": self.lambda_mode,
            "lambda_table": [{"lambda": _json_float(lam), "eval_loss": _json_float(loss)}
                             for lam, loss in self.lambda_table],
            "modules": len(self.modules),
            "modules_damped": sum(m.damped for m in self.modules),
            "correction_s": round(self.correction_s, 3),
            "eval_s": round(self.eval_s, 3),
            "wall_s": round(self.wall_s, 3),
            "peak_vram_gib": round(self.peak_vram_gib, 3),
        }


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf" if x < 0 else "nan")


@dataclass(frozen=True)
class _Paths:
    run_dir: Path
    model_dir: Path
    adapter_dir: Path
    emulator_dir: Path
    out_dir: Path


def _resolve_paths(cfg: CorrectionConfig) -> _Paths:
    layout = RunLayout(Path(cfg.run_dir))
    adapter_dir = Path(cfg.adapter_dir or layout.adapter)
    emulator_dir = Path(cfg.emulator_dir or layout.emulator)
    out_dir = Path(cfg.out_dir or layout.adapter_corrected)
    model_dir = cfg.model_dir
    if model_dir is None:
        meta = read_emulator_meta(emulator_dir)
        recorded = meta.get("source_model", {}).get("path")
        if not recorded:
            raise ModelNotFound(f"The emulator {emulator_dir} does not record its source model.",
                                hint="Pass the original model folder with --model.")
        model_dir = Path(recorded)
    if not Path(model_dir).is_dir():
        raise ModelNotFound(f"The original model folder {model_dir} does not exist.",
                            hint="Pass the original model folder with --model.")
    return _Paths(layout.root, Path(model_dir), adapter_dir, emulator_dir, out_dir)


def _check_state(paths: _Paths, overwrite: bool) -> None:
    if is_corrected(paths.adapter_dir):
        raise RunStateError(f"The adapter {paths.adapter_dir} is already corrected ({CORRECTION_META} is there).",
                            hint="Correct the trained adapter (RUN_DIR/adapter), never a corrected one.")
    if paths.out_dir.resolve() == paths.adapter_dir.resolve():
        raise RunStateError(f"The output {paths.out_dir} is the trained adapter itself.",
                            hint="Write the corrected adapter to its own folder (RUN_DIR/adapter-corrected).")
    if paths.out_dir.exists() and any(paths.out_dir.iterdir()) and not overwrite:
        raise RunStateError(f"{paths.out_dir} already holds a corrected adapter.",
                            hint="Pass --overwrite to replace it.")


def _check_fit(adapter: LoraAdapter, ckpt: Checkpoint, emu_modules: dict[str, Any]) -> None:
    problems = []
    for name in adapter.modules:
        key = f"{name}.weight"
        if key not in ckpt:
            problems.append(f"{name}: the original model has no {key}")
            continue
        shape = ckpt.info(key).shape
        want = (adapter.B(name).shape[0], adapter.A(name).shape[1])
        if tuple(shape) != want:
            problems.append(f"{name}: weight is {tuple(shape)} but the adapter expects {want}")
        spec = emu_modules.get(name)
        if spec is not None and (int(spec["out_features"]), int(spec["in_features"])) != want:
            problems.append(f"{name}: the emulator's module is {spec['out_features']}×{spec['in_features']}")
    if problems:
        raise UnsupportedModel("The adapter does not fit the original model or the emulator.",
                               problems=problems[:20],
                               hint="Correct with the model and emulator the adapter was trained on.")


def _load_module(name: str, ckpt: Checkpoint, emu: Checkpoint, compressed: bool
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    w = ckpt.get(f"{name}.weight")
    if not compressed:
        return w, None
    return w, (emu.get(f"{name}.u.weight"), emu.get(f"{name}.v.weight"))


def _prefetched(names: Sequence[str], load: Any) -> Generator[tuple[str, Any], None, None]:
    """Yield ``(name, load(name))`` with the next module read from disk while this one is computed."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: Future[Any] | None = pool.submit(load, names[0]) if names else None
        for i, name in enumerate(names):
            assert pending is not None
            item = pending.result()
            pending = pool.submit(load, names[i + 1]) if i + 1 < len(names) else None
            yield name, item


def _finite(prep: PreparedModule) -> bool:
    parts = [t for t in (prep.B_prime, prep.gap) if t is not None]
    return math.isfinite(prep.adapter_norm) and all(bool(torch.isfinite(t).all()) for t in parts)


def prepare_adapter(adapter: LoraAdapter, model_dir: Path, emulator_dir: Path, *,
                    device: torch.device, progress: Progress = NULL_PROGRESS) -> dict[str, PreparedModule]:
    """Stream every LoRA module: read ``W`` (original shards) and ``u``, ``v`` (emulator), prepare, free.

    The arithmetic is fp64 on :func:`~emloc_engine.machine.devices.linalg_device` (``device``, or the
    CPU for MPS, which has no fp64), which holds one module's ``W`` and factors at a time; results are
    kept on the CPU in fp32 (fp64 if the adapter is fp64): adapter-sized, about 3× the adapter.

    Raises:
        UnsupportedModel: the adapter does not fit the model or the emulator.
        MergeError: a module's correction is not finite (names the module).
    """
    meta = read_emulator_meta(emulator_dir)
    emu_modules: dict[str, Any] = meta.get("modules", {})
    ckpt, emu = Checkpoint(model_dir), Checkpoint(emulator_dir)
    _check_fit(adapter, ckpt, emu_modules)
    device = devices.linalg_device(device)
    store_dtype = torch.float64 if adapter.dtype == torch.float64 else torch.float32
    by_file = sorted(adapter.modules, key=lambda n: (str(ckpt.info(f"{n}.weight").file), n))
    prepared: dict[str, PreparedModule] = {}
    try:
        loads = _prefetched(by_file, lambda n: _load_module(n, ckpt, emu, n in emu_modules))
        with contextlib.closing(loads):
            for i, (name, (w, w_e)) in enumerate(loads):
                progress.check_cancelled()
                mod = adapter.modules[name]
                prep = prepare_module(w, w_e, adapter.A(name), adapter.B(name), mod.scale,
                                      device=device, out_dtype=store_dtype)
                if not _finite(prep):
                    raise MergeError(f"The correction of {name} is not finite (NaN or Inf).",
                                     hint="Check the original weights, the emulator and the adapter of this module.")
                prepared[name] = prep
                progress.update((i + 1) / len(by_file), f"corrected {i + 1}/{len(by_file)}: {name}")
    finally:
        ckpt.close()
        emu.close()
    return prepared


def corrected_weights(prepared: dict[str, PreparedModule], lam: float) -> dict[str, ModuleCorrection]:
    """Every module's :class:`ModuleCorrection` at one λ (cheap: no weights are read)."""
    return {name: apply_lambda(p, lam) for name, p in prepared.items()}


def _eval_examples(cfg: CorrectionConfig, paths: _Paths) -> tuple[TokenExample, ...]:
    if cfg.eval_examples:
        return tuple(cfg.eval_examples)
    data_cfg = cfg.data
    if data_cfg is None:
        raise ConfigError("Choosing λ automatically needs held-out data, and none was given or recorded "
                          "in the run's settings.",
                          hint="Pass --data DATA (the training dataset), or set λ: --lambda 0 (no correction), "
                               "3 (the paper's value) or inf (exact).")
    from emloc_engine.data import load_tokenizer, prepare_dataset

    examples = tuple(prepare_dataset(data_cfg, load_tokenizer(paths.model_dir)).eval)
    if not examples:
        raise ConfigError(f"The dataset {data_cfg.path} has no eval split to choose λ on.",
                          hint="Raise its eval fraction, or set λ by hand (--lambda 0|3|inf).")
    return examples


def _select_lambda(cfg: CorrectionConfig, paths: _Paths, prepared: dict[str, PreparedModule],
                   device: torch.device, progress: Progress) -> tuple[float, tuple[tuple[float, float], ...]]:
    examples = _eval_examples(cfg, paths)
    grid = sorted(set(float(x) for x in cfg.lambda_grid))
    table: list[tuple[float, float]] = []
    dtype = devices.compute_dtype(device, cfg.dtype)
    if cfg.stream_original:
        return _select_lambda_streamed(cfg, paths, prepared, grid, examples, device, dtype, progress)
    progress.update(0.0, f"loading the original model for λ selection ({len(examples)} eval examples)")
    with AdapterEvaluator(paths.model_dir, paths.adapter_dir, examples, device=device, dtype=dtype,
                          batch_size=cfg.eval_batch_size, max_batches=cfg.max_eval_batches) as ev:
        for i, lam in enumerate(grid):
            progress.check_cancelled()
            weights = {n: (c.lora_A, c.lora_B) for n, c in corrected_weights(prepared, lam).items()}
            loss = ev.loss(weights)
            if not math.isfinite(loss):
                log.warning("Held-out loss at λ=%s is not finite; it will not be chosen.", lam)
            table.append((lam, loss))
            progress.log("correct/eval_loss", loss, i)
            progress.update((i + 1) / len(grid), f"λ={lam:g}: held-out loss {loss:.4f}")
            log.info("λ=%s held-out loss %.5f (%d tokens)", lam, loss, ev.n_tokens)
    return choose_lambda(table), tuple(table)


def _select_lambda_streamed(cfg: CorrectionConfig, paths: _Paths, prepared: dict[str, PreparedModule],
                            grid: Sequence[float], examples: Sequence[TokenExample], device: torch.device,
                            dtype: torch.dtype, progress: Progress
                            ) -> tuple[float, tuple[tuple[float, float], ...]]:
    """:func:`_select_lambda` with the original streamed: every λ of the grid in one pass over the weights."""
    adapter = read_adapter(paths.adapter_dir)
    scales = {n: float(m.scale) for n, m in adapter.modules.items()}
    candidates = [{n: (c.lora_A, c.lora_B) for n, c in corrected_weights(prepared, lam).items()} for lam in grid]
    blocks = num_blocks(load_config(paths.model_dir))

    def on_block(b: int) -> None:
        progress.check_cancelled()
        progress.update((b + 1) / max(blocks, b + 1), f"λ search, streamed: block {b + 1} of the original")

    progress.update(0.0, f"λ search: {len(grid)} candidates, the original streamed ({len(examples)} eval examples)")
    losses, n_tokens = streamed_losses(paths.model_dir, candidates, scales, examples, device=device, dtype=dtype,
                                       batch_size=cfg.eval_batch_size, max_batches=cfg.max_eval_batches,
                                       on_block=on_block, hidden_on_gpu_bytes=cfg.hidden_on_gpu_bytes)
    table = []
    for i, (lam, loss) in enumerate(zip(grid, losses, strict=True)):
        if not math.isfinite(loss):
            log.warning("Held-out loss at λ=%s is not finite; it will not be chosen.", lam)
        table.append((lam, loss))
        progress.log("correct/eval_loss", loss, i)
        log.info("λ=%s held-out loss %.5f (%d tokens)", lam, loss, n_tokens)
    progress.update(1.0, "λ search done")
    return choose_lambda(table), tuple(table)


def _write_output(paths: _Paths, adapter: LoraAdapter, chosen: dict[str, ModuleCorrection],
                  reports: tuple[ModuleReport, ...], meta: dict[str, Any], overwrite: bool) -> None:
    tensors = dict(adapter.tensors)
    for name, c in chosen.items():
        mod = adapter.modules[name]
        tensors[mod.a_key] = c.lora_A.to(adapter.tensors[mod.a_key].dtype)
        tensors[mod.b_key] = c.lora_B.to(adapter.tensors[mod.b_key].dtype)
        if not (bool(torch.isfinite(tensors[mod.a_key]).all()) and bool(torch.isfinite(tensors[mod.b_key]).all())):
            raise MergeError(f"The corrected adapter of {name} is not finite in {adapter.dtype}.",
                             hint="Choose a smaller λ for this run.")
    config = dict(adapter.config)
    config["base_model_name_or_path"] = str(paths.model_dir)
    meta["modules"] = {r.name: {**asdict(r), "relative_size": _json_float(r.relative_size), "damped": r.damped}
                       for r in reports}
    try:
        with atomic_dir(paths.out_dir, overwrite=overwrite) as tmp:
            write_adapter(tmp, config, tensors, copy_from=paths.adapter_dir)
            (tmp / CORRECTION_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    except FileExistsError as exc:
        raise RunStateError(f"{paths.out_dir} already holds a corrected adapter.",
                            hint="Pass --overwrite to replace it.") from exc


def correct_lora(cfg: CorrectionConfig, progress: Progress = NULL_PROGRESS) -> CorrectionResult:
    """Correct a trained adapter for the emulator/original mismatch and write it as a new adapter.

    Args:
        cfg: the settings; λ is chosen on held-out data unless ``cfg.lambda_`` is set.
        progress: receives fractions, ``correct/eval_loss`` per grid λ, and honours cancel.

    Returns:
        The :class:`CorrectionResult` (paths, λ, λ table, per-module report, timings).

    Raises:
        RunStateError: the input is already a corrected adapter, or the output exists (without overwrite).
        ModelNotFound: the model, emulator or adapter is missing.
        UnsupportedModel: the adapter is not plain LoRA or does not fit the model.
        ConfigError: λ auto without held-out data.
        MergeError: a correction is not finite (names the module).
    """
    t0 = time.monotonic()
    paths = _resolve_paths(cfg)
    _check_state(paths, cfg.overwrite)
    adapter = read_adapter(paths.adapter_dir)
    source_fp = fingerprint_adapter(paths.adapter_dir)
    device = devices.resolve_device(cfg.device)
    reset_gpu_peak(device)
    auto = cfg.lambda_ is None
    try:
        progress.update(0.0, f"correcting {len(adapter.modules)} modules")
        prepared = prepare_adapter(adapter, paths.model_dir, paths.emulator_dir, device=device,
                                   progress=sub(progress, 0.0, 0.3 if auto else 0.9))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        t1 = time.monotonic()
        table: tuple[tuple[float, float], ...] = ()
        lam = float(cfg.lambda_) if cfg.lambda_ is not None else math.nan
        if auto:
            lam, table = _select_lambda(cfg, paths, prepared, device, sub(progress, 0.3, 0.9))
            log.info("Chose λ=%s from %s", lam, table)
        t2 = time.monotonic()
        progress.check_cancelled()
        chosen = corrected_weights(prepared, lam)
        reports = tuple(ModuleReport(n, prepared[n].compressed, adapter.modules[n].rank, adapter.modules[n].scale,
                                     c.correction_norm, c.adapter_norm, c.relative_size, sum(c.damped))
                        for n, c in chosen.items())
        peak = gpu_peak_gib(device)
        meta = {
            "format": CORRECTION_FORMAT, "format_version": 1, "engine_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "lambda": _json_float(lam), "lambda_mode": "auto" if auto else "fixed",
            "lambda_grid": [_json_float(x) for x in sorted(set(cfg.lambda_grid))] if auto else [],
            "lambda_table": [{"lambda": _json_float(x), "eval_loss": _json_float(v)} for x, v in table],
            "source_adapter": {"path": str(paths.adapter_dir), "fingerprint": source_fp},
            "model": {"path": str(paths.model_dir)}, "emulator": {"path": str(paths.emulator_dir)},
            "compute_dtype": "float64",
            "stored_dtype": str(adapter.dtype).removeprefix("torch."),
        }
        progress.update(0.95, "writing the corrected adapter")
        _write_output(paths, adapter, chosen, reports, meta, cfg.overwrite)
        progress.update(1.0, f"corrected adapter written (λ={lam:g})")
        return CorrectionResult(paths.out_dir, paths.adapter_dir, source_fp, lam, "auto" if auto else "fixed", table,
                                reports, t1 - t0, t2 - t1, time.monotonic() - t0, peak, "float64")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
