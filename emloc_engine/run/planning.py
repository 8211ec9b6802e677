"""Predict peak GPU memory of every stage and pick the compression ratio ρ: pure arithmetic, no torch.

Notation (all from :class:`~emloc_engine.catalog.model_facts.ModelFacts` and :class:`PlanConfig`):
``L`` blocks, ``h`` hidden size, ``I`` MLP width, ``a``/``g`` query/KV heads of width ``d``,
``V`` vocabulary, ``P`` parameters, ``b`` bytes per element of the compute dtype, ``B`` batch,
``T`` context length, ``r`` LoRA rank, ``n_L`` LoRA parameters ``= L·Σ r(in+out)`` over targets.

Peaks (bytes; each is a sum of named parts, which the app draws as a bar)::

    inference   = P·b + KV + max(act_layer, logits) + runtime
                  KV = 2·L·B·T·g·d·b;  act_layer = B·T·b·(c_h·h + c_I·I + c_q·(a+2g)·d);  logits = B·T·V·b
    train(ρ)    = W(ρ)·b + n_L·(p + p + 8) + ckpt + max(train_layer, min(B·T, chunk)·V·c_logits) + runtime
                  W(ρ) = dense + L·Σ k(out+in), k = floor(ρ·out·in/(out+in));  ckpt = L·B·T·h·b
    build       = block·b + ρ·block_lin·b + hidden + Σ_groups in²·4 + max(chunk forward, workspace) + runtime
                  (chunks and hidden states sized from the budget as emloc_engine.stages.emulator.memory_plan does)
    correct     = max(one module: 3·out·in·4,  λ evaluation: (P−E)·b + n_L·p + max(act_layer, T·V·c_eval),
                      text loading: P·b) + runtime   (E: an untied input-embedding table, kept in RAM)
    full LoRA   = train(ρ = 1) with the original weights and unchunked logits (plain peft + transformers)

``runtime = CUDA context + slack × tensors`` stands for what ``torch.cuda.max_memory_allocated``
does not see (context, cuBLAS workspaces, allocator rounding). :attr:`StagePeak.allocated_bytes`
is the prediction of ``max_memory_allocated``; :attr:`StagePeak.peak_bytes` what the GPU needs.

Every constant lives in :class:`PlannerConstants` so it can be recalibrated from
``benchmarks/bench_planner.py`` measurements without touching the formulas.

Fit rule: the budget is the GPU — the callers pass the card's free memory (or the ``--gpu-memory``
cap) less ``max(0.5 GiB, 5 %)`` (:mod:`emloc_engine.machine.budget`); with only a card size known it is
that size less the margin, with nothing known the inference peak. The ρ-dependent stages (emulator
build, training) must fit ``budget − safety_margin × (budget − CUDA context)`` (:func:`margin_limit`);
the margin absorbs prediction error, so it is taken from the predicted part only. Stages that use the
original resident (the λ search, the export verification, the first pass of anchored training) are
inference and are held to the budget itself. When that resident use does not fit the budget, the
plan streams the original (``MemoryPlan.stream_original``, :mod:`emloc_engine.run.plan_streaming`):
those stages are then counted as one block at a time plus the embeddings and head, held to the
margin-reduced limit, and timed from bytes / bandwidth. RAM (per stage) and disk (the run folder) are
checked when known; a shortfall of either, or a budget below the embeddings and head, makes the plan
say which resource is short and by how much (:class:`Shortfall`).
The chosen ρ is the largest on the grid ``min_ratio, min_ratio+step, … ≤ max_ratio`` that fits.
"""

from __future__ import annotations

import fnmatch
import functools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from emloc_engine.catalog.model_facts import ModelFacts
from emloc_engine.core.calibration_chunks import calibration_chunking, default_build_budget
from emloc_engine.core.dtypes import ELEMENT_BYTES
from emloc_engine.core.errors import ConfigError
from emloc_engine.core.memory import ANCHOR_GROUP_TOKENS, HIDDEN_OFFLOAD
from emloc_engine.core.ranks import rank_for_ratio
from emloc_engine.stages.correction.options import CorrectionOptions
from emloc_engine.stages.training.options import TrainOptions

GIB = 1024**3
DEFAULT_LOSS_CHUNK_BYTES = 64 * 1024**2
# The held-out evaluations without gradients (the correction's λ search, text and VLM) run the head on label
# positions only, this many tokens at a time: their logits are EVAL_CHUNK_TOKENS × vocab, whatever the length.
EVAL_CHUNK_TOKENS = 256
RUNTIME_LABEL = "CUDA context & allocator"


CPU_TRAIN_MFU = 0.22
"""LoRA training's share of ``cpu_matmul_flops`` on a CPU, measured: the demo's 60 steps took 267 s on the
2-core box, which this model predicts at 59.7 s × 1/CPU_TRAIN_MFU counting its ≤ 154-token samples (the GPU's
0.08 is kernel-launch bound at batch 1; a CPU's small GEMMs are not). Before it, a demo run on the CPU was
predicted at about 50 min for a measured 10."""


@dataclass(frozen=True)
class PlannerConstants:
    """Calibration constants of the memory and time model (one place; see module docstring).

    Activation coefficients count tensors of width ``h``, ``I`` or ``(a+2g)·d`` alive per token.
    The defaults are derived from what PyTorch keeps for a Llama block (bf16, SDPA/flash attention,
    peft LoRA with dropout, RMSNorm upcast to fp32) and checked against H200 measurements of
    Llama-3-8B (inference 15.2 GiB, full-model LoRA 17.2 GiB at B=1, T=1024, checkpointing).
    """

    cuda_context_bytes: int = 512 * 1024**2  # CUDA 12 context + cuBLAS/cuDNN handles on an H100/H200
    allocator_slack: float = 0.03  # caching-allocator rounding and fragmentation, fraction of tensors
    # cuBLAS's workspace, which torch takes from the caching allocator, so max_memory_allocated counts it: 32 MiB
    # on Hopper and newer (4096 KiB × 8), 8.1 MiB before (torch's CublasHandlePool). Counted in the streamed
    # passes' predictions, whose terms are otherwise exact; the calibrated resident stages absorb it.
    cublas_workspace_bytes: int = 32 * 1024**2
    infer_act_h: float = 4.0  # residual, norm out (fp32 + bf16), attention out
    infer_act_i: float = 3.0  # gate, up, act(gate)·up
    infer_act_qkv: float = 2.0  # q, k, v (+ rotary copies)
    infer_logits_bytes: float = 1.0  # × b: lm_head output in the compute dtype, no upcast
    train_act_h: float = 20.0  # recomputed block: norms (fp32), residuals, LoRA dropout copies, grads in flight
    train_act_i: float = 6.0  # gate, up, act, product, their grads
    train_act_qkv: float = 3.0  # q, k, v, attention output and its logsumexp
    train_logits_bytes: float = 14.0  # per logit: bf16 logits 2 + fp32 copy 4 + log-softmax 4 + its grad 4
    eval_logits_bytes: float = 10.0  # per logit, loss without grad: bf16 2 + fp32 4 + log-softmax 4
    loss_chunk_bytes: int = DEFAULT_LOSS_CHUNK_BYTES  # emloc_engine.stages.training.trainer sizes its checkpointed loss chunks to this (loss_chunk_tokens)
    lora_param_bytes: int = 4  # peft keeps adapter weights in fp32 (autocast_adapter_dtype)
    adam_state_bytes: int = 8  # AdamW exp_avg + exp_avg_sq in fp32
    stats_bytes: int = 4  # calibration statistics C = Σ XᵀX in fp32
    correction_module_copies: float = 3.0  # W fp32, Wᴱ = u·v fp32, W − Wᴱ
    # --- time model (rough: ±50%) ---
    # Calibrated 2026-11-29 on the H200 (Llama-3-8B shapes, batch 1, seq 1024): the engine's trainer
    # reached 2350 tokens/s on the ρ=0.4 emulator ≈ 7% of the dense bf16 peak (small GEMMs at batch 1).
    train_mfu: float = 0.08  # fraction of dense bf16 peak that LoRA training reaches
    # On the CPU the GEMMs of a small model run near the matmul rate (no kernel-launch overhead): the demo's
    # measured 60 steps (SmolLM2-135M, ρ 0.9, batch 4 of ≤ 154-token samples) took 267 s on the 2-core box
    # (benchmarks/RESULTS.md, 2026-11-29); counting those tokens, that is this fraction of cpu_matmul_flops.
    cpu_train_mfu: float = CPU_TRAIN_MFU
    infer_mfu: float = 0.5  # prefill/eval forward
    # Effective rate for the reference cost model below (eigh of every C + SVD of every W). Our
    # factoriser does one eigh of min(out, in) per module, so this is calibrated, not a hardware
    # rate: the 8B build's factorisation took 23.7 s on the H200 (2026-11-29).
    linalg_flops_gpu: float = 5e13
    stats_flops_gpu: float = 6e13  # Σ XᵀX GEMMs (fp32; TF32 for bf16 activations since, unmeasured)
    stats_flops_cpu: float = 1e11
    linalg_flops_cpu: float = 5e10
    cpu_matmul_flops: float = 5e11  # bf16/fp32 matmul on a desktop CPU
    unknown_gpu_flops: float = 1e14
    disk_bytes_per_s: float = 1.5e9  # NVMe sequential read
    # --- streaming the original (emloc_engine.run.plan_streaming) ---
    # Pinned RAM → GPU, measured on an H200 host (PCIe Gen5, Llama-2-13B shapes, 2026-12): 55 GB/s.
    h2d_bytes_per_s: float = 55e9
    # Weights read from disk when they do not stay in the page cache: deliberately conservative (a
    # mid-range NVMe SSD reads 2-3 GB/s, a SATA SSD 0.5): 1 GB/s.
    stream_disk_bytes_per_s: float = 1.0e9
    # Weights in the page cache, copied into pinned buffers by one reader thread: unmeasured, conservative.
    page_cache_bytes_per_s: float = 5e9
    stream_overhead: float = 1.3  # a streamed pass vs its transfer floor (the aim: within 1.3×)
    # Anchor offsets moved between the GPU and pageable RAM (emloc_engine.stages.training.anchor_chunks):
    # each visited example's offsets come to RAM once when its chunk is computed and go back once
    # in its micro-batch. Measured on an H100 host, Llama-3-8B shapes, 1,000 × 512 tokens
    # (benchmarks/RESULTS.md, 2026-12-06): 157 s of chunks for 127 GiB of offsets, 0.1 s per example
    # beyond the passes' compute, and 25 s more training than unanchored for the micro-batches. Both
    # with the code before the point-major layout removed a CPU pass from each direction: an upper bound.
    offsets_to_ram_bytes_per_s: float = 1.3e9
    offsets_to_gpu_bytes_per_s: float = 5.4e9
    process_ram_bytes: int = 3 * 1024**3  # Python, torch, CUDA libraries, tokenizer: the RSS before any tensor
    eigh_flop_coef: float = 10.0  # eigh(n) ≈ 10·n³
    svd_flop_coef: float = 8.0  # svd(m×n) ≈ 8·m·n·min(m,n)


DEFAULT_CONSTANTS = PlannerConstants()

# Dense bf16 tensor-core peak (FLOP/s) by GPU name fragment; first match wins.
GPU_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("RTX 6000 Ada", 182e12), ("L4", 121e12), ("A10", 125e12), ("A6000", 155e12),
    ("RTX 5090", 210e12), ("RTX 4090", 165e12), ("RTX 4080", 97e12), ("RTX 3090", 71e12),
    ("RTX 3080", 60e12), ("V100", 125e12), ("T4", 65e12), ("MI300", 1307e12), ("MI250", 362e12),
    ("Apple", 1.5e13),
)

# Pinned RAM → GPU rate by GPU name fragment (first match wins); others: PlannerConstants.h2d_bytes_per_s
# (55 GB/s, measured on an H200 host, PCIe Gen5). PCIe 4.0 ×16 cards move ~25 GB/s (32 GB/s theoretical × 0.8).
GPU_H2D_BYTES_PER_S: tuple[tuple[str, float], ...] = (
    ("RTX 4090", 25e9), ("RTX 4080", 25e9), ("RTX 3090", 25e9), ("RTX 3080", 25e9), ("RTX 6000 Ada", 25e9),
    ("A6000", 25e9), ("A100", 25e9), ("L40", 25e9), ("A10", 25e9), ("L4", 25e9), ("V100", 12e9), ("T4", 12e9),
)

STAGES = ("emulator", "train", "correct", "export")


@dataclass(frozen=True)
class PlanConfig:
    """What to plan for. Every field has help text (CLI help and GUI tooltip)."""

    budget_bytes: int | None = field(default=None, metadata={
        "help": "GPU memory every stage must keep to; default: the GPU's size less max(0.5 GiB, 5%) when known, "
                "else what inference of the original model needs (the run passes its free-memory default)."})
    gpu_total_bytes: int | None = field(default=None, metadata={
        "help": "Memory of the GPU (or RAM for the CPU); a budget above it is lowered to it."})
    context_length: int = field(default=512, metadata={"help": "Tokens per training sequence (T)."})
    batch_size: int = field(default=1, metadata={"help": "Sequences per optimizer micro-step (B)."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r; adapter memory grows linearly with it."})
    ratio: float | None = field(default=None, metadata={
        "help": "Keep-ratio ρ of the emulator; None = the largest that fits."})
    safety_margin: float = field(default=0.1, metadata={
        "help": "Fraction of the budget kept free to absorb prediction error (0.1 = 10%)."})
    target_modules: tuple[str, ...] = field(default=(), metadata={
        "help": "LoRA targets (leaf names like q_proj, or fnmatch patterns); empty = every block linear."})
    dense_modules: tuple[str, ...] = field(default=(), metadata={
        "help": "fnmatch patterns of full module names kept dense in the emulator."})
    grad_checkpointing: bool = field(default=True, metadata={"help": "Recompute block activations in backward."})
    compute_dtype: str = field(default="auto", metadata={
        "help": "bfloat16 | float16 | float32; auto = storage dtype if 16-bit, else bfloat16."})
    device: str = field(default="cuda", metadata={"help": "cuda | rocm | mps | cpu (no CUDA context on cpu/mps)."})
    gpu_name: str | None = field(default=None, metadata={"help": "GPU name, for the time estimates."})
    calibration_samples: int = field(default=64, metadata={"help": "Calibration sequences for the emulator."})
    train_steps: int = field(default=100, metadata={"help": "Optimizer steps, for the time estimate."})
    sample_tokens: int | None = field(default=None, metadata={
        "help": "Tokens of a typical padded training sample, for the time estimate (memory always plans "
                "for context_length); default: context_length."})
    auto_lambda: bool = field(default=True, metadata={
        "help": "Correction chooses λ on held-out data (runs the original model, like inference)."})
    anchored: bool = field(default=True, metadata={
        "help": "Anchored training (emloc_engine.stages.training.anchoring): the micro-batch's block offsets on the GPU, and "
                "one pass of the original, then of the emulator, over the visited examples (one GPU only)."})
    anchor_linears: bool = field(default=False, metadata={
        "help": "Anchors at every linear layer (--anchor linears) instead of every block: offsets of every "
                "linear's output width per token on the GPU."})
    # The stages' own defaults (settings defined once): `emloc plan` plans what `emloc run` runs.
    eval_batches: int = field(default=CorrectionOptions().max_eval_batches, metadata={
        "help": "Held-out batches per λ candidate, at most (the correction's max_eval_batches)."})
    train_eval_batches: int = field(default=TrainOptions().max_eval_batches, metadata={
        "help": "Eval micro-batches of the training stage, at most (their anchors are one more chunk)."})
    eval_batch_size: int = field(default=CorrectionOptions().eval_batch_size, metadata={
        "help": "Held-out sequences per batch of the λ search (the correction's eval_batch_size)."})
    eval_sequences: int | None = field(default=None, metadata={
        "help": "Held-out sequences the data has, when known; None = the worst case up to "
                "eval_batches × eval_batch_size (a streamed λ search keeps them on the GPU up to 1 GiB)."})
    lambda_candidates: int = field(default=len(CorrectionOptions().lambda_grid), metadata={
        "help": "Number of λ values tried (the correction's grid)."})
    min_ratio: float = field(default=0.05, metadata={"help": "Smallest ρ considered."})
    max_ratio: float = field(default=0.9, metadata={"help": "Largest ρ considered."})
    ratio_step: float = field(default=0.05, metadata={"help": "Grid step of the ρ search."})
    constants: PlannerConstants = field(default=DEFAULT_CONSTANTS, metadata={"help": "Calibration constants."})
    ram_bytes: int | None = field(default=None, metadata={
        "help": "RAM of the machine (its total: what other programs hold now can be closed); a stage needing "
                "more cannot run here. Also sizes the page cache that keeps streamed weights. None = not checked."})
    disk_free_bytes: int | None = field(default=None, metadata={
        "help": "Free disk space where the run folder goes; None = not checked."})
    anchor_ram_bytes: int = field(default=4 * GIB, metadata={
        "help": "Most RAM the anchors' offsets take at once (--anchor-ram-gib); more are computed a chunk at a time."})
    stream_original: bool | None = field(default=None, metadata={
        "help": "Stream the original block by block in every stage that uses it; None = when its resident use "
                "(weights + activations) does not fit the budget."})
    export_formats: tuple[str, ...] = field(default=(), metadata={
        "help": "The exports, for the disk check and the export's time (merged, adapter, gguf)."})
    num_gpus: int = field(default=1, metadata={
        "help": "GPUs that train data-parallel (emloc train --gpus N); peaks are per GPU. Each holds the "
                "whole emulator and a ⌈B/N⌉-sequence share of every micro-batch; training time is divided by N."})

    def __post_init__(self) -> None:
        problems = []
        for name in ("context_length", "batch_size", "lora_rank", "calibration_samples", "train_steps",
                     "eval_batches", "train_eval_batches", "eval_batch_size", "lambda_candidates", "num_gpus"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be at least 1 (got {getattr(self, name)}).")
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            problems.append(f"ratio must be in (0, 1] (got {self.ratio}).")
        if not 0.0 < self.min_ratio <= self.max_ratio <= 1.0:
            problems.append(f"need 0 < min_ratio ≤ max_ratio ≤ 1 (got {self.min_ratio}, {self.max_ratio}).")
        if not 0.0 < self.ratio_step < 1.0:
            problems.append(f"ratio_step must be in (0, 1) (got {self.ratio_step}).")
        if not 0.0 <= self.safety_margin < 1.0:
            problems.append(f"safety_margin must be in [0, 1) (got {self.safety_margin}).")
        if self.anchor_ram_bytes <= 0:
            problems.append(f"anchor_ram_bytes must be positive (got {self.anchor_ram_bytes}).")
        for name in ("budget_bytes", "gpu_total_bytes", "ram_bytes"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                problems.append(f"{name} must be positive (got {v}).")
        if self.compute_dtype not in ("auto", "bfloat16", "float16", "float32"):
            problems.append(f"compute_dtype must be auto, bfloat16, float16 or float32 (got {self.compute_dtype!r}).")
        if self.device not in ("cuda", "rocm", "mps", "cpu"):
            problems.append(f"device must be cuda, rocm, mps or cpu (got {self.device!r}).")
        if problems:
            raise ConfigError("Invalid memory plan settings.", problems=problems)


@dataclass(frozen=True)
class StagePeak:
    """Predicted peak of one stage: the named parts add up to ``peak_bytes``.

    Attributes:
        limit_bytes: what this stage must stay under; ``fits`` says whether it does.
        est_seconds: rough wall time (see :class:`PlannerConstants` for the FLOP-rate assumptions).
    """

    name: str
    peak_bytes: int
    parts: tuple[tuple[str, int], ...]
    est_seconds: float = 0.0
    limit_bytes: int | None = None
    device: str = "cuda"
    ram_bytes: int = 0
    streamed: bool = False
    hidden_on_gpu_bytes: int = HIDDEN_OFFLOAD
    """A streamed pass's hidden-state threshold as planned (0: offloaded to RAM to fit the budget)."""
    anchor_group_tokens: int = ANCHOR_GROUP_TOKENS
    """The streamed anchor pass's group size as planned (one example's length when larger groups do not fit)."""

    @property
    def fits(self) -> bool:
        return self.limit_bytes is None or self.peak_bytes <= self.limit_bytes

    @property
    def allocated_bytes(self) -> int:
        """The prediction of ``torch.cuda.max_memory_allocated`` (runtime overhead excluded)."""
        return self.peak_bytes - sum(b for label, b in self.parts if label == RUNTIME_LABEL)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "peak_bytes": self.peak_bytes, "allocated_bytes": self.allocated_bytes,
                "parts": [[label, b] for label, b in self.parts], "est_seconds": round(self.est_seconds, 1),
                "limit_bytes": self.limit_bytes, "fits": self.fits, "device": self.device,
                "ram_bytes": self.ram_bytes, "streamed": self.streamed}


def _size_text(n_bytes: int) -> str:
    """``"12.3 GiB"``, or ``"300 MiB"`` below 1 GiB (a shortfall of 30 MiB must not read "0.0 GiB")."""
    return f"{n_bytes / GIB:.1f} GiB" if abs(n_bytes) >= GIB else f"{n_bytes / 2**20:.0f} MiB"


@dataclass(frozen=True)
class Shortfall:
    """A resource the run cannot do without, and by how much it is short (``need − have``).

    ``resource``: ``"GPU budget"`` (below what the embeddings and head alone take), ``"RAM"`` or ``"disk"``.
    """

    resource: str
    need_bytes: int
    have_bytes: int
    what: str

    @property
    def short_bytes(self) -> int:
        return self.need_bytes - self.have_bytes

    @property
    def short_text(self) -> str:
        """How much is missing, in words (``"2.5 GiB"``; below 1 GiB in MiB, so it never reads "0.0 GiB")."""
        return _size_text(self.short_bytes)

    @property
    def message(self) -> str:
        return (f"{self.resource}: {self.what} needs {_size_text(self.need_bytes)}, there is "
                f"{_size_text(self.have_bytes)} (short by {self.short_text}).")

    def to_dict(self) -> dict[str, Any]:
        return {"resource": self.resource, "need_bytes": self.need_bytes, "have_bytes": self.have_bytes,
                "what": self.what, "message": self.message}


@dataclass(frozen=True)
class MemoryPlan:
    """The outcome: the ratio, whether everything fits, per-stage peaks, and what to change if not."""

    ratio: float | None
    fits: bool
    budget_bytes: int
    limit_bytes: int
    stages: tuple[StagePeak, ...]
    inference: StagePeak
    full_lora: StagePeak
    reason: str
    suggestions: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    model_name: str = ""
    config: PlanConfig = field(default_factory=PlanConfig)
    stream_original: bool = False
    shortfalls: tuple[Shortfall, ...] = ()
    anchor_ram_bytes: int = 0
    anchor_chunks: int = 0

    @property
    def ram_bytes(self) -> int:
        """The most RAM one stage needs (the run needs this much; the page cache comes on top)."""
        return max((s.ram_bytes for s in self.stages), default=0)

    @property
    def total_seconds(self) -> float:
        return sum(s.est_seconds for s in self.stages)

    @property
    def inference_peak_bytes(self) -> int:
        return self.inference.peak_bytes

    @property
    def full_lora_peak_bytes(self) -> int:
        return self.full_lora.peak_bytes

    @property
    def est_seconds(self) -> dict[str, float]:
        return {s.name: s.est_seconds for s in self.stages}

    def stage(self, name: str) -> StagePeak:
        for s in (*self.stages, self.inference, self.full_lora):
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name, "ratio": self.ratio, "fits": self.fits, "budget_bytes": self.budget_bytes,
            "limit_bytes": self.limit_bytes, "safety_margin": self.config.safety_margin,
            "context_length": self.config.context_length, "batch_size": self.config.batch_size,
            "lora_rank": self.config.lora_rank, "inference": self.inference.to_dict(),
            "full_lora": self.full_lora.to_dict(), "stages": [s.to_dict() for s in self.stages],
            "reason": self.reason, "suggestions": list(self.suggestions), "notes": list(self.notes),
            "stream_original": self.stream_original, "ram_bytes": self.ram_bytes,
            "total_seconds": round(self.total_seconds, 1), "anchor_ram_bytes": self.anchor_ram_bytes,
            "anchor_chunks": self.anchor_chunks, "shortfalls": [f.to_dict() for f in self.shortfalls],
        }


# ------------------------------------------------------------------------------------------------
# building blocks


def compute_bytes(facts: ModelFacts, cfg: PlanConfig) -> int:
    """Bytes per element of the compute dtype (``auto``: storage dtype if 16-bit, else bf16)."""
    if cfg.compute_dtype != "auto":
        return ELEMENT_BYTES[cfg.compute_dtype]
    return facts.dtype_bytes if facts.dtype in ("bfloat16", "float16") else 2


def _targets(facts: ModelFacts, cfg: PlanConfig) -> list[tuple[int, int]]:
    """(out, in) of every LoRA-targeted module of one block."""
    if not cfg.target_modules:
        return [(m.out_features, m.in_features) for m in facts.modules]
    out = []
    for m in facts.modules:
        leaf = m.name.rsplit(".", 1)[-1]
        if any(fnmatch.fnmatchcase(leaf, p) or fnmatch.fnmatchcase(m.name, p) for p in cfg.target_modules):
            out.append((m.out_features, m.in_features))
    return out


def lora_parameters(facts: ModelFacts, cfg: PlanConfig) -> int:
    """``n_L = L · Σ_targets r·(in + out)``."""
    return facts.num_layers * sum(cfg.lora_rank * (o + i) for o, i in _targets(facts, cfg))


def emulator_parameters(facts: ModelFacts, ratio: float, dense_modules: tuple[str, ...] = ()) -> int:
    """Parameters of the emulator at keep-ratio ρ: dense part + ``Σ k·(out+in)`` (≈ ρ × linear)."""
    if ratio >= 1.0:
        return facts.num_parameters
    total = facts.dense_parameters
    for m in facts.modules:
        per = rank_for_ratio(ratio, m.out_features, m.in_features) * (m.out_features + m.in_features)
        if not dense_modules:
            total += facts.num_layers * per
            continue
        for i in range(facts.num_layers):
            full = f"model.layers.{i}.{m.name}"
            dense = any(fnmatch.fnmatchcase(full, p) for p in dense_modules)
            total += m.numel if dense or per >= m.numel else per
    return total


def loss_chunk_tokens(vocab_size: int, chunk_bytes: int = DEFAULT_LOSS_CHUNK_BYTES) -> int:
    """Tokens per checkpointed loss chunk of :func:`emloc_engine.stages.training.trainer.lm_loss_sum`.

    The largest power of two in [32, 1024] whose logits (bf16 + fp32 copy + log-softmax + its grad,
    14 bytes per logit) stay within ``chunk_bytes``: 64 tokens for a 49k vocabulary, 32 for 128k+.
    Shared by the trainer and the planner so the prediction is the code's.
    """
    tokens = 1024
    while tokens > 32 and tokens * vocab_size * 14 > chunk_bytes:
        tokens //= 2
    return tokens


def margin_limit(budget: int, cfg: PlanConfig) -> int:
    """What the ρ-dependent stages may use: the budget less the safety margin of its predicted part.

    The margin absorbs prediction error, so it applies to what is predicted from tensor sizes, not
    to the CUDA context, which inference (the budget) and training pay alike. On a 135M model the
    context is two thirds of the inference peak; a margin on it left no room for training at all.
    """
    fixed = min(budget, _runtime(0, cfg))
    return int(budget - cfg.safety_margin * (budget - fixed))


def _runtime(tensor_bytes: int, cfg: PlanConfig) -> int:
    c = cfg.constants
    context = c.cuda_context_bytes if cfg.device in ("cuda", "rocm") else 0
    return int(context + c.allocator_slack * tensor_bytes)


def _stage(name: str, parts: list[tuple[str, int]], cfg: PlanConfig, seconds: float,
           device: str | None = None) -> StagePeak:
    tensors = sum(b for _, b in parts)
    dev = device or cfg.device
    runtime = _runtime(tensors, replace(cfg, device=dev)) if tensors else 0
    full = [(label, int(b)) for label, b in parts] + [(RUNTIME_LABEL, runtime)]
    return StagePeak(name, sum(b for _, b in full), tuple(full), est_seconds=seconds, device=dev)


def _layer_act(facts: ModelFacts, tokens: int, b: int, ch: float, ci: float, cq: float) -> int:
    qkv = (facts.num_heads + 2 * facts.num_kv_heads) * facts.head_dim
    return int(tokens * b * (ch * facts.hidden_size + ci * facts.intermediate_size + cq * qkv))


def flops_per_second(cfg: PlanConfig) -> float:
    """Dense bf16 peak of the planned device (see :data:`GPU_PEAK_FLOPS`)."""
    if cfg.device == "cpu":
        return cfg.constants.cpu_matmul_flops
    name = (cfg.gpu_name or "").upper()
    for frag, flops in GPU_PEAK_FLOPS:
        if frag.upper() in name:
            return flops
    return cfg.constants.unknown_gpu_flops


def _forward_flops(facts: ModelFacts, params: int, tokens: int, context: int) -> float:
    """``2·P_active + 4·L·T·a·d`` per token (matmuls + attention scores/values; embeddings excluded)."""
    active = params - facts.embedding_parameters
    return tokens * (2.0 * active + 4.0 * facts.num_layers * context * facts.num_heads * facts.head_dim)


# ------------------------------------------------------------------------------------------------
# stage peaks


def inference_peak(facts: ModelFacts, cfg: PlanConfig) -> StagePeak:
    """Inference of the original model: one forward of ``B×T`` tokens with a KV cache.

    ``P·b + 2·L·B·T·g·d·b + max(act_layer, B·T·V·b) + runtime``.
    """
    c, b = cfg.constants, compute_bytes(facts, cfg)
    tokens = cfg.batch_size * cfg.context_length
    weights = facts.num_parameters * b
    kv = 2 * facts.num_layers * tokens * facts.num_kv_heads * facts.head_dim * b
    act = _layer_act(facts, tokens, b, c.infer_act_h, c.infer_act_i, c.infer_act_qkv)
    logits = int(tokens * facts.vocab_size * b * c.infer_logits_bytes + tokens * facts.hidden_size * b)
    seconds = _forward_flops(facts, facts.num_parameters, tokens, cfg.context_length) / (
        flops_per_second(cfg) * c.infer_mfu) + weights / c.disk_bytes_per_s
    return _stage("inference", [("weights", weights), ("KV cache", kv),
                                ("activations & logits", max(act, logits))], cfg, seconds)


def training_peak(facts: ModelFacts, cfg: PlanConfig, ratio: float, name: str = "train",
                  chunked_loss: bool = True, streamed: bool = False, limit: int | None = None) -> StagePeak:
    """LoRA training on the emulator at ρ (ρ = 1: on the original model).

    ``limit``: what the stage must stay under; a streamed anchor pass whose hidden states would not fit
    on the GPU is planned with them in RAM (:func:`emloc_engine.run.plan_streaming.keep_or_offload`).

    ``W(ρ)·b + n_L·(2p + 8) + L·B·T·h·b + max(train_layer, n_logit·V·c_logits) + runtime`` where
    ``n_logit = min(B·T, loss_chunk_tokens(V))`` for our trainer (the loss is computed in
    checkpointed chunks, :func:`emloc_engine.stages.training.trainer.lm_loss_sum`) and ``B·T`` for plain
    peft/transformers training (``chunked_loss=False``, the full-model LoRA comparison). With
    gradient checkpointing off, every block's activations are kept: ``L·train_layer``.

    Anchored (``name == "train"``), the time includes computing the offsets a chunk at a time and the RAM
    their cap (:func:`emloc_engine.run.plan_streaming.anchor_schedule`); with the original ``streamed``,
    the peak is the larger of the loop's and the streamed anchor pass's.
    """
    from emloc_engine.run import plan_streaming as ps

    c, b = cfg.constants, compute_bytes(facts, cfg)
    # Data-parallel (emloc_engine.stages.training.distributed): every GPU holds the whole emulator and its share of the batch.
    tokens = math.ceil(cfg.batch_size / cfg.num_gpus) * cfg.context_length
    params = emulator_parameters(facts, ratio, cfg.dense_modules)
    n_lora = lora_parameters(facts, cfg)
    layer = _layer_act(facts, tokens, b, c.train_act_h, c.train_act_i, c.train_act_qkv)
    chunk = loss_chunk_tokens(facts.vocab_size, c.loss_chunk_bytes)
    logit_rows = min(tokens, chunk) if chunked_loss else tokens
    logits = int(logit_rows * facts.vocab_size * c.train_logits_bytes)
    if chunked_loss and tokens > chunk:  # the final hidden states feed every chunk
        logits += tokens * facts.hidden_size * b
    if cfg.grad_checkpointing:
        kept = facts.num_layers * tokens * facts.hidden_size * b
        transient = max(layer, logits)
    else:
        kept = facts.num_layers * layer
        transient = logits
    label = "weights" if ratio >= 1.0 else f"emulator weights (ρ={ratio:.2f})"
    parts = [(label, params * b), ("LoRA weights + grads (fp32)", n_lora * 2 * c.lora_param_bytes),
             ("AdamW states (fp32)", n_lora * c.adam_state_bytes),
             ("checkpointed activations" if cfg.grad_checkpointing else "activations", kept),
             ("logits & loss" if transient == logits else "block recompute", transient)]
    # time: samples are padded to the batch's longest, usually shorter than the context (sample_tokens)
    length = min(cfg.sample_tokens or cfg.context_length, cfg.context_length)
    step_tokens = math.ceil(cfg.batch_size / cfg.num_gpus) * length
    flops = 3.0 * _forward_flops(facts, params, step_tokens, length) * (4 / 3 if cfg.grad_checkpointing else 1)
    mfu = c.cpu_train_mfu if cfg.device == "cpu" else c.train_mfu
    seconds = cfg.train_steps * flops / (flops_per_second(cfg) * mfu) + params * b / c.disk_bytes_per_s
    anchored, anchor_ram, chunks, _ = ps.anchor_schedule(facts, cfg) if name == "train" else (False, 0, 0, 0)
    if anchored:
        parts.append(("anchors of the micro-batch", facts.num_layers * tokens * ps.anchor_width(facts, cfg) * b))
        seconds += ps.anchor_seconds(facts, cfg, ratio, streamed, chunks)
    ram = ps.stage_ram(facts, cfg, "train", ratio=ratio, streamed=streamed, anchor_ram=anchor_ram)
    loop = replace(_stage(name, parts, cfg, seconds), ram_bytes=ram, streamed=streamed and anchored)
    if anchored and streamed:
        # kept on the GPU in groups of ANCHOR_GROUP_TOKENS; else offloaded; else also one example at a time
        options = [(HIDDEN_OFFLOAD, ANCHOR_GROUP_TOKENS), (0, ANCHOR_GROUP_TOKENS), (0, cfg.context_length)]
        anchor_pass = ps.leanest_fit(limit, [
            functools.partial(ps.streamed_anchor_peak, facts, cfg, ratio, seconds, ram, keep_bytes=keep,
                              group_tokens=group)
            for keep, group in options])
        if anchor_pass.peak_bytes > loop.peak_bytes:
            return anchor_pass
        return replace(loop, hidden_on_gpu_bytes=anchor_pass.hidden_on_gpu_bytes,
                       anchor_group_tokens=anchor_pass.anchor_group_tokens)
    return loop


def anchored_training(cfg: PlanConfig) -> bool:
    """Whether the train stage is planned anchored (any number of GPUs, any dataset size: the offsets are
    held a chunk at a time under ``anchor_ram_bytes``; plain full LoRA never is)."""
    return cfg.anchored


def build_chunk(facts: ModelFacts, cfg: PlanConfig, budget_bytes: int | None = None) -> tuple[int, bool]:
    """The padded tokens of the emulator build's largest forward chunk and whether its hidden states wait in RAM.

    The builder's own rule (:func:`~emloc_engine.core.calibration_chunks.calibration_chunking`, called by
    :func:`~emloc_engine.stages.emulator.memory_plan.plan_build_memory`) for ``calibration_samples`` samples of
    ``context_length`` tokens; a chunk holds whole samples (``calibration.chunk_samples``).
    """
    b = compute_bytes(facts, cfg)
    on_cuda = cfg.device in ("cuda", "rocm")
    n_tokens = cfg.calibration_samples * cfg.context_length
    budget = budget_bytes if budget_bytes is not None else default_build_budget(
        facts.num_parameters * facts.dtype_bytes, cfg.gpu_total_bytes if on_cuda else None)
    chunking = calibration_chunking(
        hidden_size=facts.hidden_size, intermediate_size=facts.intermediate_size,
        block_bytes=facts.block_parameters * facts.dtype_bytes, elem=b, budget_bytes=budget,
        max_len=cfg.context_length, total_tokens=n_tokens, on_cuda=on_cuda)
    samples = min(max(1, chunking.chunk_tokens // cfg.context_length), cfg.calibration_samples)
    return samples * cfg.context_length, chunking.offload_hidden


def _factor_workspace(out_f: int, in_f: int, lb: int) -> int:
    """Device bytes :func:`~emloc_engine.stages.emulator.factorize.factorize` holds for one module besides the group's
    statistic C: the normalised C̃ (in²), W in the linear-algebra dtype (out·in), for out > in its QR factors
    (out·in + in²), then the larger of ``W C̃`` with the product it feeds (out·in + s²) and the eigen step
    (the product, its symmetrised copy and ``linalg.eigh``'s input copy, vectors and workspace: 7·s²,
    s = min(out, in)). Traced on an H100 for a Qwen2.5-14B down_proj (2026-12-06): eigh took 5.0·s²."""
    s2 = min(out_f, in_f) ** 2
    qr = out_f * in_f + in_f**2 if out_f > in_f else 0
    return lb * (in_f**2 + out_f * in_f + qr + max(out_f * in_f + s2, 7 * s2))


def emulator_build_peak(facts: ModelFacts, cfg: PlanConfig, ratio: float, budget_bytes: int | None = None) -> StagePeak:
    """Streaming emulator construction (:mod:`emloc_engine.stages.emulator.builder`): one block on the GPU at a time.

    The larger of two phases, each what the build's code holds (an allocator trace of a Qwen2.5-14B build on an
    H100, 2026-12-06, ``benchmarks/device/emulator_peak_trace.py``, named every term):

    * forward, at the statistics hook of the widest input ``W`` (down_proj's, ``I``) in the largest chunk of ``T``
      tokens (:func:`build_chunk`, the builder's own rule): the block, every group's ΣXᵀX, every sample's hidden
      state (one chunk's when they wait in RAM), and the chunk's residual and norm output (``2·T·h·b``), the MLP
      product and its copy in the statistics dtype (``T·W·(b + 4)``), the product ``XᵀX`` before it is added
      when there are several chunks (``W²·4``), the rotary tables (``T·d_head·8``);
    * factorise: the block, the chunks' outputs, the statistics not yet used and one module's workspace
      (:func:`_factor_workspace`).

    The capture of block 0's input (embeddings + hidden states) is a third, usually smaller, phase; the input
    embedding is released once the calibration tokens are embedded.
    """
    from emloc_engine.core.architectures import arch_spec
    from emloc_engine.run.plan_streaming import cublas_workspace, stage_ram

    c, b = cfg.constants, compute_bytes(facts, cfg)
    on_cpu = cfg.device == "cpu"
    sb = 8 if on_cpu else c.stats_bytes  # the builder keeps statistics in fp64 on the CPU
    lb = 8 if on_cpu else 4  # and factorises in fp64 there
    n_tokens = cfg.calibration_samples * cfg.context_length
    h = facts.hidden_size
    chunk_tokens, offload = build_chunk(facts, cfg, budget_bytes)
    chunks = math.ceil(n_tokens / chunk_tokens)
    block = facts.block_parameters * facts.dtype_bytes + (facts.block_parameters * b if b != facts.dtype_bytes else 0)
    hidden = (chunk_tokens if offload else n_tokens) * h * b
    shapes = {m.name: m for m in facts.modules}
    try:
        groups = [[shapes[n] for n in g.modules if n in shapes] for g in arch_spec({"model_type": facts.model_type}).groups]
    except Exception:
        groups = [[m] for m in facts.modules]
    groups = [g for g in groups if g]
    group_stats = [g[0].in_features ** 2 * sb for g in groups]
    stats = sum(group_stats)
    widest = max(g[0].in_features for g in groups)
    forward = (chunk_tokens * (2 * h * b + widest * (b + sb) + facts.head_dim * 8)
               + (widest**2 * sb if chunks > 1 else 0))
    factor = max(sum(group_stats[i:]) - stats + max(_factor_workspace(m.out_features, m.in_features, lb) for m in g)
                 for i, g in enumerate(groups))  # beyond the statistics counted with the forward's
    embed = facts.embedding_parameters * b  # materialised once, to embed the calibration tokens
    lin_flops = sum(c.eigh_flop_coef * g[0].in_features ** 3 for g in groups) + sum(
        c.svd_flop_coef * m.numel * min(m.out_features, m.in_features) for m in facts.modules)
    linalg = c.linalg_flops_cpu if on_cpu else c.linalg_flops_gpu
    fwd = _forward_flops(facts, facts.num_parameters, n_tokens, cfg.context_length)
    stats_flops = facts.num_layers * n_tokens * sum(2 * g[0].in_features ** 2 for g in groups)
    stats_rate = c.stats_flops_cpu if on_cpu else c.stats_flops_gpu
    seconds = (facts.num_layers * lin_flops / linalg + fwd / (flops_per_second(cfg) * c.infer_mfu)
               + stats_flops / stats_rate + facts.num_parameters * facts.dtype_bytes / c.disk_bytes_per_s)
    if cfg.num_gpus > 1:
        # GPUs 1..N-1 factorise finished blocks (each holds one block's W and C plus the workspace);
        # GPU 0 keeps one more block's statistics in flight and only the forward's transient memory,
        # and the linear algebra overlaps the forward of the next block.
        factor = 0
        stats *= 2
        seconds -= min(facts.num_layers * lin_flops / linalg, fwd / (flops_per_second(cfg) * c.infer_mfu)
                       + stats_flops / stats_rate)
    common = block + stats + hidden
    if embed + hidden > common + max(forward, factor):
        parts = [("embeddings (capture)", embed), ("calibration hidden states", hidden)]
    else:
        phase = (("calibration forward", forward) if forward >= factor else ("factorisation workspace", factor))
        parts = [("one block (original)", block), (f"statistics ΣXᵀX (fp{8 * sb})", stats), ("calibration hidden states", hidden),
                 phase]
    parts.append(("cuBLAS workspace", cublas_workspace(cfg)))
    ram = stage_ram(facts, cfg, "emulator", ratio=ratio, streamed=True,
                    hidden_offloaded=2 * n_tokens * h * b if offload else 0)
    return replace(_stage("emulator", parts, cfg, seconds), ram_bytes=ram, streamed=True)


def correction_peak(facts: ModelFacts, cfg: PlanConfig, ratio: float, streamed: bool = False,
                    limit: int | None = None) -> StagePeak:
    """LoRA correction: one module at a time, then (``auto_lambda``) held-out loss per λ with the original model.

    ``max(3·out·in·4, P·b + n_L·p + max(act_layer, T·V·c_eval)) + runtime`` (eval batch 1). With the
    original ``streamed``, one pass scores every λ: :func:`emloc_engine.run.plan_streaming.streamed_pass_peak`,
    its hidden states kept on the GPU unless only offloading them fits ``limit``
    (:func:`emloc_engine.run.plan_streaming.keep_or_offload`).
    """
    from emloc_engine.run import plan_streaming as ps

    c, b = cfg.constants, compute_bytes(facts, cfg)
    n_lora = lora_parameters(facts, cfg)
    largest = max(m.numel for m in facts.modules)
    module = int(c.correction_module_copies * largest * 4 + n_lora * c.lora_param_bytes / facts.num_layers)
    flops = facts.num_layers * sum(2.0 * m.numel * (rank_for_ratio(ratio, m.out_features, m.in_features)
                                                    + cfg.lora_rank) for m in facts.modules)
    seconds = flops / (flops_per_second(cfg) * c.train_mfu) + facts.num_parameters * facts.dtype_bytes / c.disk_bytes_per_s
    ram = ps.stage_ram(facts, cfg, "correct", ratio=ratio, streamed=streamed)
    one_module = replace(_stage("correct", [("one module (fp32)", module)], cfg, seconds), ram_bytes=ram)
    if not cfg.auto_lambda:
        return one_module
    if streamed:
        most = cfg.eval_batches * cfg.eval_batch_size
        sequences = min(most, cfg.eval_sequences) if cfg.eval_sequences is not None else most
        tokens = cfg.lambda_candidates * sequences * cfg.context_length
        # the loss runs the head on EVAL_CHUNK_TOKENS label positions at a time (hidden_loss_sum): bf16 + fp32 + log-softmax
        logits = int(min(cfg.context_length, EVAL_CHUNK_TOKENS) * facts.vocab_size * c.eval_logits_bytes)
        passed = ps.keep_or_offload(limit, lambda keep: ps.streamed_pass_peak(
            facts, cfg, "correct", sequences=sequences, variants=cfg.lambda_candidates,
            batch=min(cfg.eval_batch_size, sequences), head_logits=logits, extra=[], adapter=True,
            known_sequences=cfg.eval_sequences is not None, seconds=seconds + ps.pass_seconds(facts, cfg, tokens),
            ram_bytes=ram, keep_bytes=keep))
        if passed.peak_bytes >= one_module.peak_bytes:
            return passed
        return replace(one_module, est_seconds=passed.est_seconds, ram_bytes=passed.ram_bytes,
                       hidden_on_gpu_bytes=passed.hidden_on_gpu_bytes)
    t = cfg.context_length
    act = _layer_act(facts, t, b, c.infer_act_h, c.infer_act_i, c.infer_act_qkv)
    logits = int(min(t, EVAL_CHUNK_TOKENS) * facts.vocab_size * c.eval_logits_bytes)
    seconds += cfg.lambda_candidates * cfg.eval_batches * _forward_flops(facts, facts.num_parameters, t, t) / (
        flops_per_second(cfg) * c.infer_mfu)
    # an untied embedding table stays in RAM during the λ evaluation (:mod:`emloc_engine.weights.cpu_embeddings`);
    # a text model is loaded whole onto the GPU first (a VLM is loaded on the CPU and moved without it)
    in_ram = 0 if facts.tie_word_embeddings else facts.embedding_parameters * b
    weights = facts.num_parameters * b - in_ram
    loading = facts.num_parameters * b if facts.vision is None else 0
    evaluation = weights + n_lora * c.lora_param_bytes + max(act, logits)
    if module >= max(evaluation, loading):
        return replace(one_module, est_seconds=seconds)
    if loading > evaluation:
        return replace(_stage("correct", [("weights (loading, before the embeddings go to RAM)", loading)], cfg,
                              seconds), ram_bytes=ram)
    return replace(_stage("correct", [("weights (λ evaluation; input embeddings in RAM)", weights),
                                      ("adapter", n_lora * c.lora_param_bytes),
                                      ("activations & loss", max(act, logits))], cfg, seconds), ram_bytes=ram)


def export_peak(facts: ModelFacts, cfg: PlanConfig, streamed: bool = False, budget_bytes: int | None = None) -> StagePeak:
    """Merge (on the CPU, tensor by tensor), then the verification of every export, loaded back.

    The verification runs where :func:`~emloc_engine.stages.export.verify_budget.verify_placement`
    puts it under the budget: on the GPU in fp32 or the storage dtype, or on the CPU (0 GPU memory,
    its model in RAM); with the original ``streamed``, one streamed pass per model (original, merged,
    GGUF) carries every comparison.
    """
    from emloc_engine.run import plan_streaming as ps
    from emloc_engine.stages.export.verify_budget import verify_placement

    c = cfg.constants
    seconds = 3.0 * facts.num_parameters * facts.dtype_bytes / c.disk_bytes_per_s
    passes = 3 if "gguf" in cfg.export_formats else 2
    on_gpu = cfg.device in ("cuda", "rocm")
    if streamed and on_gpu:
        seconds += passes * ps.pass_seconds(facts, cfg, ps.EXPORT_PROMPT_TOKENS)
        ram = ps.stage_ram(facts, cfg, "export", ratio=1.0, streamed=True)
        # one prompt per batch; its logits as bf16, then fp32 (model.logits(h).float()) before going to the CPU
        logits = ps.EXPORT_PROMPT_LENGTH * facts.vocab_size * (compute_bytes(facts, cfg) + 4)
        return ps.streamed_pass_peak(facts, cfg, "export", sequences=ps.EXPORT_PROMPTS, variants=ps.EXPORT_VARIANTS,
                                     batch=1, head_logits=logits, extra=[], adapter=True, merged_variants=True,
                                     known_sequences=True, seq_tokens=ps.EXPORT_PROMPT_LENGTH, seconds=seconds,
                                     ram_bytes=ram)
    seconds += passes * ps.stored_weights_bytes(facts) / c.disk_bytes_per_s
    room = budget_bytes if budget_bytes is not None else (cfg.gpu_total_bytes or 0)
    place = verify_placement(facts.num_parameters, facts.dtype_bytes, on_gpu=on_gpu, free_bytes=room,
                             budget_bytes=budget_bytes if on_gpu else None, ram_free_bytes=cfg.ram_bytes)
    weights = facts.num_parameters * (4 if place.fp32 else facts.dtype_bytes)
    if place.device == "cpu":
        ram = ps.stage_ram(facts, cfg, "export", ratio=1.0, streamed=False, cpu_verify_bytes=weights)
        return StagePeak("export", 0, (("GPU not used (merge and verification on the CPU)", 0),), est_seconds=seconds,
                         device="cpu", ram_bytes=ram)
    ram = ps.stage_ram(facts, cfg, "export", ratio=1.0, streamed=False)
    logits = int(ps.EXPORT_PROMPT_TOKENS * facts.vocab_size * 4 * 2)
    label = "weights (verification, fp32)" if place.fp32 else "weights (verification, as stored)"
    return replace(_stage("export", [(label, weights), ("logits", logits)], cfg, seconds), ram_bytes=ram)


# ------------------------------------------------------------------------------------------------
# choosing ρ


def _ratio_grid(cfg: PlanConfig) -> list[float]:
    n = math.floor((cfg.max_ratio - cfg.min_ratio) / cfg.ratio_step + 1e-9)
    return [round(cfg.min_ratio + i * cfg.ratio_step, 6) for i in range(n, -1, -1)]


def emulator_budget_bytes(limit: int, inference_peak_bytes: int) -> int:
    """The memory budget the emulator build sizes its chunks to: the limit, at most half the inference
    peak (so the GPU stays usable meanwhile). :func:`emloc_engine.run.plan.plan_run` gives the build
    this budget, and the planner predicts the build with it."""
    return int(min(limit, 0.5 * inference_peak_bytes))


def _stages_at(facts: ModelFacts, cfg: PlanConfig, ratio: float, limit: int, budget: int | None,
               streamed: bool = False) -> tuple[StagePeak, ...]:
    build_budget = emulator_budget_bytes(limit, inference_peak(facts, cfg).peak_bytes) if limit else None
    build = replace(emulator_build_peak(facts, cfg, ratio, budget_bytes=build_budget), limit_bytes=limit)
    train = replace(training_peak(facts, cfg, ratio, streamed=streamed, limit=limit), limit_bytes=limit)
    # A resident original (λ evaluation, verification) is inference: held to the budget, not the margin-reduced
    # limit; streamed passes are our own predictions, so the margin applies to them like to training.
    original_limit = limit if streamed else budget
    correct_limit = original_limit if cfg.auto_lambda else limit
    correct = replace(correction_peak(facts, cfg, ratio, streamed=streamed, limit=correct_limit),
                      limit_bytes=correct_limit)
    export = export_peak(facts, cfg, streamed=streamed, budget_bytes=budget)
    export = replace(export, limit_bytes=original_limit if export.device != "cpu" else None)
    return build, train, correct, export


def leaner_passes_note(stages: tuple[StagePeak, ...]) -> str | None:
    """What the plan made leaner in the original's streamed passes to fit the budget, in words (None: nothing)."""
    what = {"train": "the anchor pass", "correct": "the λ search", "export": "the export verification"}
    parts = []
    for s in stages:
        if not s.streamed or s.name not in what:
            continue
        steps = (["keeps its hidden states in RAM"] if s.hidden_on_gpu_bytes == 0 else []) + (
            ["runs one example at a time"] if s.anchor_group_tokens < ANCHOR_GROUP_TOKENS else [])
        if steps:
            parts.append(f"{what[s.name]} {' and '.join(steps)}")
    if not parts:
        return None
    return ("The original's streamed passes, to fit the budget: " + "; ".join(parts)
            + " (a little slower: more copies over PCIe, smaller batches).")


def plan_memory(facts: ModelFacts, cfg: PlanConfig | None = None) -> MemoryPlan:
    """Predict every stage's peak and choose the largest ρ whose stages all fit the budget.

    The original need not fit: when its resident use exceeds the budget the plan streams it
    (``stream_original``, :mod:`emloc_engine.run.plan_streaming`) and the streamed stages are counted
    as one block at a time. Without a budget the default is the GPU's memory less
    :func:`~emloc_engine.machine.budget.budget_margin_bytes` (the callers pass the *free* memory's
    default, :func:`~emloc_engine.machine.budget.default_budget_bytes`), or the inference peak when
    no device size is known.

    Args:
        facts: shapes of the model (:func:`model_facts`).
        cfg: what to plan for; ``cfg.ratio`` set = evaluate that ratio only.

    Returns:
        A :class:`MemoryPlan`. ``fits`` is False (with ``reason``, ``suggestions`` and ``shortfalls``)
        when no ρ on the grid fits, when RAM or disk is too small, or when the given ratio does not fit.
    """
    from emloc_engine.run.vision_planning import vlm_plan_config  # VLMs: image tokens + vision tower

    return _plan(facts, vlm_plan_config(facts, cfg or PlanConfig()), suggest=True)


def _plan(facts: ModelFacts, cfg: PlanConfig, *, suggest: bool) -> MemoryPlan:
    from emloc_engine.machine.budget import default_budget_bytes
    from emloc_engine.run import plan_streaming as ps

    inference = inference_peak(facts, cfg)
    full = training_peak(facts, cfg, 1.0, name="full_lora", chunked_loss=False)
    notes: list[str] = []
    if cfg.budget_bytes is not None:
        budget = cfg.budget_bytes
    elif cfg.gpu_total_bytes is not None:
        budget = default_budget_bytes(cfg.gpu_total_bytes)
    else:
        budget = inference.peak_bytes
    if cfg.gpu_total_bytes is not None and budget > cfg.gpu_total_bytes:
        device = "the GPU" if cfg.device != "cpu" else "this machine's RAM"
        notes.append(f"Budget {budget / GIB:.1f} GiB is more than {device} ({cfg.gpu_total_bytes / GIB:.1f} GiB); "
                     f"planning for {device} instead.")
        budget = cfg.gpu_total_bytes
    limit = margin_limit(budget, cfg)
    streamed = ps.decide_streaming(facts, cfg, budget)
    anchored, anchor_ram, chunks, anchor_need = ps.anchor_schedule(facts, cfg)
    inference = replace(inference, limit_bytes=cfg.gpu_total_bytes)
    full = replace(full, limit_bytes=limit)
    grid = [cfg.ratio] if cfg.ratio is not None else _ratio_grid(cfg)
    if streamed:
        resident = ps.resident_original_peak(facts, cfg)
        where = "RAM (page cache) → GPU" if ps.weights_cached(facts, cfg) else "the disk"
        notes.append(f"The original does not fit the budget ({resident / GIB:.1f} GiB resident > {budget / GIB:.1f} GiB): "
                     f"runs offloaded here. Anchors, the λ search and the export verification stream it block by "
                     f"block from {where}, {ps.pass_seconds(facts, cfg, cfg.context_length):.1f} s per pass.")
    if cfg.anchored and not anchored:
        notes.append(f"Anchors off: one step's offsets ({anchor_need / GIB:.1f} GiB) exceed the anchor RAM cap "
                     f"({cfg.anchor_ram_bytes / GIB:.1f} GiB); raise --anchor-ram-gib to anchor.")
    elif anchored and chunks > 1:
        notes.append(f"Anchors: {anchor_need / GIB:.1f} GiB of offsets over the run, computed in {chunks} chunks "
                     f"of at most {cfg.anchor_ram_bytes / GIB:.1f} GiB of RAM (one pass of the original per chunk).")

    def make(ratio: float | None, fits: bool, stages: tuple[StagePeak, ...], reason: str,
             suggestions: tuple[str, ...] = (), short: tuple[Shortfall, ...] = ()) -> MemoryPlan:
        extra = list(notes)
        lean = leaner_passes_note(stages)
        if lean:
            extra.append(lean)
        if full.fits:
            extra.append(f"Plain LoRA on the full model ({full.peak_gib:.1f} GiB) also fits this budget.")
        return MemoryPlan(ratio, fits, budget, limit, stages, inference, full, reason, suggestions, tuple(extra),
                          facts.name, cfg, streamed, short, anchor_ram, chunks)

    floor = ps.gpu_floor_shortfall(facts, cfg, limit)
    if floor is not None:
        stages = _stages_at(facts, cfg, grid[-1], limit, budget, streamed)
        reason = f"{facts.name} cannot be trained within this budget: {floor.message}"
        return make(None, False, stages, reason, _suggest(facts, cfg) if suggest else (),
                    (floor, *ps.shortfalls(facts, cfg, stages, grid[-1])))
    last: tuple[StagePeak, ...] = ()
    for ratio in grid:
        stages = _stages_at(facts, cfg, ratio, limit, budget, streamed)
        last = stages
        if all(s.fits for s in stages):
            train = stages[1]
            lacking = tuple(ps.shortfalls(facts, cfg, stages, ratio))
            if lacking:
                reason = f"{facts.name} cannot be trained on this machine: " + " ".join(f.message for f in lacking)
                return make(ratio, False, stages, reason, (), lacking)
            reason = (f"ρ = {ratio:.2f}: training on the emulator needs {train.peak_gib:.2f} GiB of the "
                      f"{limit / GIB:.2f} GiB allowed ({budget / GIB:.2f} GiB budget − {cfg.safety_margin:.0%} margin "
                      f"on its predicted part).")
            return make(ratio, True, stages, reason)
    worst = max((s for s in last if not s.fits), key=lambda s: s.peak_bytes - (s.limit_bytes or 0))
    at = grid[-1]
    big = max(worst.parts, key=lambda p: p[1])
    reason = (f"Nothing fits: at ρ = {at:.2f} the {worst.name} stage needs {worst.peak_gib:.1f} GiB but only "
              f"{(worst.limit_bytes or 0) / GIB:.1f} GiB is allowed ({budget / GIB:.1f} GiB budget − "
              f"{cfg.safety_margin:.0%} margin on its predicted part); its largest part is {big[0]} ({big[1] / GIB:.1f} GiB).")
    short = Shortfall("GPU budget", _budget_needed(worst, cfg), budget, f"the {worst.name} stage at ρ = {at:.2f}")
    return make(None, False, last, reason, _suggest(facts, cfg) if suggest else (),
                (short, *ps.shortfalls(facts, cfg, last, at)))


def _budget_needed(stage: StagePeak, cfg: PlanConfig) -> int:
    """The budget whose margin-reduced limit holds ``stage`` (inverse of :func:`margin_limit`)."""
    fixed = _runtime(0, cfg)
    return int(fixed + (stage.peak_bytes - fixed) / (1.0 - cfg.safety_margin))


def _suggest(facts: ModelFacts, cfg: PlanConfig) -> tuple[str, ...]:
    """Variants of the settings that would fit, cheapest change first."""
    out: list[str] = []
    budget_cfg = replace(cfg, ratio=None, budget_bytes=cfg.budget_bytes, gpu_total_bytes=cfg.gpu_total_bytes)
    variants: list[tuple[str, PlanConfig]] = []
    if cfg.batch_size > 1:
        variants.append(("batch size 1", replace(budget_cfg, batch_size=1)))
    t = cfg.context_length // 2
    while t >= 128:
        variants.append((f"context {t} tokens", replace(budget_cfg, context_length=t)))
        t //= 2
    for r in (8, 4):
        if r < cfg.lora_rank:
            variants.append((f"LoRA rank {r}", replace(budget_cfg, lora_rank=r)))
    if cfg.ratio is not None:
        variants.insert(0, ("an automatic ratio", budget_cfg))
    if cfg.auto_lambda:
        variants.append(("a fixed λ (no held-out search)", replace(budget_cfg, auto_lambda=False)))
    if cfg.gpu_total_bytes and (cfg.budget_bytes or 0) < cfg.gpu_total_bytes:
        variants.append((f"the whole GPU ({cfg.gpu_total_bytes / GIB:.1f} GiB) as the budget",
                         replace(budget_cfg, budget_bytes=cfg.gpu_total_bytes)))
    for label, v in variants:
        p = _plan(facts, v, suggest=False)
        if p.fits:
            out.append(f"With {label} it fits at ρ = {p.ratio:.2f}.")
            if len(out) >= 3:
                break
    floor = _stages_at(facts, replace(cfg, ratio=None), cfg.min_ratio, 0, None)
    peak = max(s.peak_bytes for s in floor[:2])
    fixed = _runtime(0, cfg)
    need = int(fixed + (peak - fixed) / (1.0 - cfg.safety_margin))
    dense = (facts.embedding_parameters + facts.lm_head_parameters) * compute_bytes(facts, cfg)
    out.append(f"Or a smaller model, or a budget of at least {need / GIB:.1f} GiB with these settings "
               f"(embeddings and lm_head alone take {dense / GIB:.1f} GiB; logits grow with context × vocabulary).")
    return tuple(out)


def model_facts(model_dir: Path) -> ModelFacts:
    """:class:`ModelFacts` of a model folder from config and safetensors headers only (no weights).

    Raises:
        ModelNotFound: missing/bad config or shard headers.
        UnsupportedModel: unknown architecture.
    """
    from emloc_engine.catalog.model_facts import read_model_facts

    return read_model_facts(Path(model_dir))


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a text table (``emloc plan``): GPU peak, limit, RAM and time of every stage."""
    from emloc_engine.core.progress import format_seconds

    rows = [("stage", "peak GiB", "limit GiB", "fits", "RAM GiB", "time", "largest parts")]
    for s in (plan.inference, *plan.stages, plan.full_lora):
        top = sorted((p for p in s.parts if p[1] > 0), key=lambda p: -p[1])[:3]
        name = s.name + (" (streamed)" if s.streamed and s.name != "emulator" else "")
        rows.append((name, f"{s.peak_gib:.2f}", f"{s.limit_bytes / GIB:.2f}" if s.limit_bytes else "-",
                     "yes" if s.fits else "NO", f"{s.ram_bytes / GIB:.1f}" if s.ram_bytes else "-",
                     format_seconds(s.est_seconds), ", ".join(f"{label} {b / GIB:.2f}" for label, b in top)))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:6], widths)) + "  " + r[6] for r in rows]
    head = (f"{plan.model_name}: budget {plan.budget_bytes / GIB:.2f} GiB, allowed {plan.limit_bytes / GIB:.2f} GiB "
            f"(margin {plan.config.safety_margin:.0%}); T={plan.config.context_length}, B={plan.config.batch_size}, "
            f"r={plan.config.lora_rank}, steps={plan.config.train_steps}")
    tail = [f"Chosen ρ: {plan.ratio:.2f}" if plan.ratio is not None else "Chosen ρ: none", plan.reason]
    if plan.ratio is not None:
        where = "the GPU" if plan.config.device in ("cuda", "rocm") else plan.config.device.upper()
        tail.append(f"Original: {'streamed block by block' if plan.stream_original else 'loaded whole on ' + where}; "
                    f"about {format_seconds(plan.total_seconds)} for all four stages, RAM up to "
                    f"{plan.ram_bytes / GIB:.1f} GiB" + (f" (anchors {plan.anchor_ram_bytes / GIB:.1f} GiB in "
                                                          f"{plan.anchor_chunks} chunk{'s' if plan.anchor_chunks != 1 else ''})"
                                                          if plan.anchor_chunks else "") + ".")
    tail += [f"Cannot train: {f.message}" for f in plan.shortfalls]
    tail += [f"  - {s}" for s in plan.suggestions] + [f"Note: {n}" for n in plan.notes]
    return "\n".join([head, *lines, *tail])
