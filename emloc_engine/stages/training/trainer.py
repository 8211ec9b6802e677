"""Stage 2: LoRA fine-tuning on the emulator.

``train_lora(TrainConfig, progress) -> TrainResult`` loads ``RUN_DIR/emulator`` (bf16 on GPUs
that have it, fp16 on older GPUs, fp32 on the CPU), attaches a standard peft LoRA to the whole
composite ``u·v`` of every targeted module (:mod:`emloc_engine.stages.training.lora_layers`), trains it on the
user's data and writes ``RUN_DIR/adapter/``: a normal peft adapter with the ORIGINAL model's
module names and ``base_model_name_or_path`` = the original model's folder.

The loop is our own ~100 lines in torchtune's style rather than ``transformers.Trainer``: every
step boundary is explicit, so cancel stops exactly there, a checkpoint holds exactly what an
uninterrupted run would have in memory at that point (adapter, AdamW moments, scheduler, loss
scaler, RNG states, data position), and resume reproduces the uninterrupted loss curve. The
parts are the ordinary ones: AdamW, warmup + cosine/linear schedule, gradient accumulation with
the loss normalised by the number of label tokens of the whole optimizer step, gradient clipping,
non-reentrant gradient checkpointing, autocast to bf16 (fp16 with a loss scaler) on CUDA.

Memory: the language-model head is evaluated on label positions only, in chunks of
``planning.loss_chunk_tokens(vocab)`` tokens (≤ 64 MiB of logits: 32 tokens for a 128k vocabulary,
64 for 49k) under activation checkpointing, so the ``tokens × vocab`` logits (0.5 GiB per 1024
tokens of a 128k vocabulary, in fp32) never exist for the whole batch at once.

Checkpoints: ``RUN_DIR/checkpoints/step-N/`` holds ``adapter_config.json``,
``adapter_model.safetensors`` (itself a loadable adapter) and ``training_state.pt``; each folder is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.utils.checkpoint
from torch import nn

from emloc_engine.core.atomic import atomic_dir
from emloc_engine.core.errors import Cancelled, ConfigError, InsufficientMemory
from emloc_engine.core.layout import RunLayout
from emloc_engine.core.memory import ANCHOR_GROUP_TOKENS, HIDDEN_OFFLOAD
from emloc_engine.core.progress import NULL_PROGRESS, EtaClock, Progress, format_seconds
from emloc_engine.machine.devices import compute_dtype, resolve_device
from emloc_engine.stages.training.activation_checkpointing import enable_activation_checkpointing
from emloc_engine.stages.training.anchoring import (
    Anchors,
    anchor_bytes,
    anchor_width,
    anchors_for_training,
    resolve_mode,
)
from emloc_engine.stages.training.batches import (
    IGNORE_INDEX,
    ExampleLike,
    collate,
    label_tokens,
    micro_batch_indices,
    visited_examples,
)

if TYPE_CHECKING:
    from emloc_engine.data import DataConfig

from emloc_engine.machine.process_memory import gpu_peak_gib, reset_gpu_peak
from emloc_engine.stages.training.options import TrainOptions

log = logging.getLogger(__name__)

TRAINING_META = "emloc_training.json"
STATE_FILE = "training_state.pt"
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class DataParallel(Protocol):
    """Hooks of data-parallel training (:mod:`emloc_engine.stages.training.distributed`); ``None`` means one process.

    Every rank runs this same loop over the same global micro-batches. ``begin_step`` returns this
    rank's share of one optimizer step's examples (and seeds the rank's dropout RNG for the step);
    ``all_reduce_`` sums tensors over the ranks in place. Only rank 0 writes files.
    Every hook and the workers' ``progress.check_cancelled`` are collective operations: the loop
    must reach them at the same points on every rank (no rank-dependent branches around them).
    """

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def begin_step(self, step: int, micro_batches: list[list[int]]) -> list[list[int]]: ...

    def all_reduce_(self, tensors: Sequence[torch.Tensor]) -> None: ...


@dataclass(frozen=True)
class TrainConfig(TrainOptions):
    """Settings of Stage 2: the options plus the run folder, the data, the device and the seed."""

    run_dir: Path = field(metadata={"help": "Run folder: reads emulator/, writes adapter/ and checkpoints/."})
    data: DataConfig = field(metadata={"help": "The training data (file, format, max length, split)."})
    emulator_dir: Path | None = field(default=None, metadata={"help": "Emulator folder (default RUN_DIR/emulator)."})
    resume: bool = field(default=True, metadata={
        "help": "Continue from the newest checkpoint in RUN_DIR/checkpoints (off = start over and delete them)."})
    device: str = field(default="auto", metadata={"help": "auto, cuda, cuda:N, mps or cpu."})
    seed: int = field(default=0, metadata={"help": "Seed of the LoRA initialisation, dropout and data order."})
    stream_original: bool = field(default=False, metadata={
        "help": "Run the original block by block from its shards for the anchors (it need not fit the GPU); "
                "off: load it whole when all the anchors are computed at once (faster where it fits)."})
    hidden_on_gpu_bytes: int = field(default=HIDDEN_OFFLOAD, metadata={
        "help": "With the original streamed, the anchor pass keeps its hidden states on the GPU up to this many "
                "bytes, else in CPU RAM (the planner gives 0 when keeping them would not fit the budget)."})
    anchor_group_tokens: int = field(default=ANCHOR_GROUP_TOKENS, metadata={
        "help": "With the original streamed, the anchor pass runs examples together in groups of at most this many "
                "padded tokens (the planner gives one example's length when larger groups would not fit)."})

    def _problems(self) -> list[str]:
        device_ok = bool(_DEVICE_RE.match(self.device))
        return [*super()._problems(),
                *([] if device_ok else [f"device must be auto, cpu, mps, cuda or cuda:N (got {self.device!r})."])]

    @property
    def layout(self) -> RunLayout:
        return RunLayout(Path(self.run_dir))

    @property
    def resolved_emulator_dir(self) -> Path:
        return Path(self.emulator_dir) if self.emulator_dir is not None else self.layout.emulator

    def effective_warmup(self) -> int:
        """``warmup_steps``, or a tenth of ``steps`` when warmup would not end before training does."""
        return self.warmup_steps if self.warmup_steps < self.steps else self.steps // 10


@dataclass(frozen=True)
class TrainResult:
    """What training produced and measured (histories are ``(step, value)`` pairs)."""

    adapter_dir: Path
    steps_done: int
    loss_history: tuple[tuple[int, float], ...]
    eval_history: tuple[tuple[int, float], ...]
    final_eval_loss: float | None
    peak_vram_gib: float
    tokens_per_s: float
    wall_s: float
    resumed_from_step: int | None
    lr_history: tuple[tuple[int, float], ...] = ()
    grad_norm_history: tuple[tuple[int, float], ...] = ()
    target_modules: tuple[str, ...] = ()
    trainable_params: int = 0
    checkpoint_dir: Path | None = None
    anchor: str = "none"
    anchor_note: str = ""
    anchor_s: float = 0.0
    anchor_peak_bytes: int = 0  # most RAM the offsets held at once (anchor_chunks)
    anchor_chunks: int = 0  # chunks of offsets computed (1: all at once)

    def summary(self) -> dict[str, Any]:
        """JSON-ready record for the run manifest."""
        return {"adapter_dir": str(self.adapter_dir), "steps": self.steps_done,
                "final_eval_loss": self.final_eval_loss, "loss_history": [list(x) for x in self.loss_history],
                "eval_history": [list(x) for x in self.eval_history], "tokens_per_s": self.tokens_per_s,
                "wall_s": self.wall_s, "peak_vram_gib": self.peak_vram_gib,
                "resumed_from_step": self.resumed_from_step, "target_modules": list(self.target_modules),
                "trainable_params": self.trainable_params, "anchor": self.anchor, "anchor_note": self.anchor_note,
                "anchor_s": self.anchor_s, "anchor_peak_bytes": self.anchor_peak_bytes,
                "anchor_chunks": self.anchor_chunks}


def train_lora(cfg: TrainConfig, progress: Progress = NULL_PROGRESS) -> TrainResult:
    """Train a LoRA on the emulator with the data of ``cfg.data``; see the module docstring.

    Args:
        cfg: the settings.
        progress: receives ``update``/``log`` calls; ``check_cancelled`` is called once per step.

    Returns:
        The adapter folder, loss/eval histories, measured peak VRAM, tokens/s and wall time.

    Raises:
        DataError: the dataset cannot be used (raised before the model is loaded).
        ConfigError: a setting is invalid or contradicts the checkpoint being resumed.
        ModelNotFound: the emulator folder is missing or incomplete.
        InsufficientMemory: the GPU ran out of memory; the message names the setting to lower.
        Cancelled: the user cancelled; a resumable checkpoint has been written.
    """
    from emloc_engine.data import load_tokenizer, prepare_dataset
    from emloc_engine.weights.lowrank import read_emulator_meta

    meta = read_emulator_meta(cfg.resolved_emulator_dir)  # a missing emulator says "emloc build", not "no tokenizer"
    tokenizer = load_tokenizer(cfg.resolved_emulator_dir)
    data = prepare_dataset(cfg.data, tokenizer)
    anchors, note, seconds = prepare_anchors(cfg, meta, data.train, progress, data.eval)
    result = train_on_examples(cfg, data.train, data.eval, progress, pad_id=pad_token_id(tokenizer),
                               data_fingerprint=str(getattr(data.report, "fingerprint", "")), anchors=anchors)
    return replace(result, **anchor_record(anchors, note, seconds))


def prepare_anchors(cfg: TrainConfig, emulator_meta: dict[str, Any], train: Sequence[ExampleLike],
                    progress: Progress = NULL_PROGRESS,
                    eval_: Sequence[ExampleLike] = (), *, processes: int = 1,
                    rank: int = 0) -> tuple[Anchors | None, str, float]:
    """The anchors ``cfg.anchor`` asks for (:mod:`emloc_engine.stages.training.anchoring`), the decision's note, seconds.

    The eval examples that :meth:`_Session.evaluate` scores get offsets too (keyed after the training
    examples, ``Anchors.eval_base``), so the eval loss is that of the anchored emulator: on those
    examples the original plus the adapter as the emulator sees it, not the bare emulator's loss,
    which anchored training no longer lowers.

    When every visited example's offsets fit ``cfg.anchor_ram_gib`` (one process, original not
    streamed) they are computed here, all at once, with the original loaded whole. Otherwise the
    returned :class:`Anchors` is empty with a :class:`~emloc_engine.stages.training.anchor_chunks.AnchorFeed`
    that computes each chunk when training reaches it, with the original streamed; with
    ``processes`` ranks each holds at most ``anchor_ram_gib / processes``, and rank ``rank`` keeps the
    offsets of the eval batches it scores.
    """
    from transformers import AutoConfig

    from emloc_engine.stages.training.anchor_chunks import AnchorFeed
    from emloc_engine.stages.training.anchoring import points_for_config

    if cfg.anchor == "none":
        return None, "anchoring off", 0.0
    source = Path(str(emulator_meta.get("source_model", {}).get("path") or ""))
    can, why = True, ""
    if not (source / "config.json").is_file():
        can, why = False, f"the emulator's source model folder {str(source) or '(not recorded)'} is not readable"
    device, weight_dtype, _ = resolve_device_dtype(cfg.device, cfg.dtype)
    n_eval = min(len(eval_), cfg.batch_size * cfg.max_eval_batches)
    examples = [*train, *eval_[:n_eval]] if n_eval else train
    visited = visited_examples(len(train), cfg.batch_size, cfg.seed, cfg.steps * cfg.grad_accum)
    visited += [len(train) + j for j in range(n_eval)]
    cap = int(cfg.anchor_ram_gib * 2**30 / processes)
    total = {"linears": 0, "blocks": 0}
    step = dict(total)
    widths: dict[str, int] = {}
    config: Any = None
    size = torch.tensor([], dtype=weight_dtype).element_size()
    if can:
        config = AutoConfig.from_pretrained(cfg.resolved_emulator_dir, trust_remote_code=False)
        longest = max((len(e.input_ids) for e in examples), default=0)
        per_step = min(len(examples), -(-cfg.batch_size * cfg.grad_accum // processes))
        widths = {p: anchor_width(config, p) for p in total}
        total = {p: anchor_bytes(examples, visited, widths[p], size) for p in total}
        step = {p: widths[p] * size * longest * max(per_step, cfg.batch_size if n_eval else 0) for p in total}
    mode, note = resolve_mode(cfg.anchor, step, cap, can_anchor=can, why_not=why, total_bytes=total)
    log.info("Training: %s.", note)
    if mode == "none":
        return None, note, 0.0
    t0 = time.perf_counter()
    if processes == 1 and not cfg.stream_original and total[mode] <= cap:
        progress.update(0.0, f"anchoring: the original's hidden states on {len(visited)} examples")
        anchors = anchors_for_training(source, cfg.resolved_emulator_dir, examples, visited, where=mode,
                                       device=device, dtype=weight_dtype)
    else:
        mine = range(0, n_eval, cfg.batch_size)[rank::processes]  # the eval batches this rank scores
        sticky = [len(train) + j for start in mine for j in range(start, min(start + cfg.batch_size, n_eval))]
        if not (0 < cfg.eval_every < cfg.steps):
            # Evaluated only after the last step: kept eval offsets would take up to half of every
            # chunk for the whole run (twice the chunks: 63 instead of 32 for 1,000 examples of 8B
            # shapes on 2026-12-06), so they are computed once, when the final evaluation needs them.
            sticky = []
        anchors = Anchors(points_for_config(config, mode), (), {}, mode,
                          feed=AnchorFeed(source, examples, where=mode, device=device, dtype=weight_dtype,
                                          cap_bytes=cap, width=widths[mode], sticky=sticky, processes=processes,
                                          hidden_on_gpu_bytes=cfg.hidden_on_gpu_bytes,
                                          group_tokens=cfg.anchor_group_tokens))
    anchors.eval_base = len(train) if n_eval else None
    return anchors, note, time.perf_counter() - t0


def anchor_record(anchors: Anchors | None, note: str, seconds: float) -> dict[str, Any]:
    """The anchoring fields of :class:`TrainResult` after training (time and peak RAM of the offsets)."""
    if anchors is None:
        return {"anchor": "none", "anchor_note": note, "anchor_s": seconds}
    feed = anchors.feed
    return {"anchor": anchors.where, "anchor_note": note,
            "anchor_s": seconds + (feed.seconds if feed is not None else 0.0),
            "anchor_peak_bytes": feed.peak_bytes if feed is not None else anchors.nbytes(),
            "anchor_chunks": feed.chunks if feed is not None else 1}


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (padded positions carry no loss anyway)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def train_on_examples(cfg: TrainConfig, train: Sequence[ExampleLike], eval_: Sequence[ExampleLike],
                      progress: Progress = NULL_PROGRESS, *, pad_id: int = 0,
                      data_fingerprint: str = "", data_parallel: DataParallel | None = None,
                      anchors: Anchors | None = None) -> TrainResult:
    """:func:`train_lora` on already tokenised examples (``cfg.data`` is not read).

    The pipeline and tests use it when they hold the examples already. ``data_fingerprint``
    identifies the data for resume: a checkpoint made on other data is refused.
    ``data_parallel`` is set by :mod:`emloc_engine.stages.training.distributed` in each worker process.
    ``anchors`` (:mod:`emloc_engine.stages.training.anchoring`) add per-example block offsets during training so the
    emulator reproduces the original's hidden states on these examples; they must cover every
    example the run visits and are not used for evaluation.
    """
    if not train:
        raise ConfigError("The training split is empty.", hint="Use a dataset with more samples.")
    device, weight_dtype, amp_dtype = resolve_device_dtype(cfg.device, cfg.dtype)
    t_start = time.perf_counter()
    reset_gpu_peak(device)
    session = None
    try:
        session = _Session.open(cfg, device, weight_dtype, amp_dtype, len(train), data_fingerprint, progress,
                                data_parallel, anchor="none" if anchors is None else anchors.where)
        if anchors is None:
            return session.run(train, eval_, pad_id, t_start)
        session.anchors = anchors
        with anchors.attached(session.peft_model.get_base_model()):
            return session.run(train, eval_, pad_id, t_start)
    except torch.OutOfMemoryError as exc:
        traceback.clear_frames(exc.__traceback__)  # the frames hold activations: let them go now
        raise InsufficientMemory(
            f"Training ran out of GPU memory on {device} (batch size {cfg.batch_size}, rank {cfg.rank}).",
            hint="Lower --batch-size (raise --grad-accum to keep the effective batch), then --max-length, "
                 "then --rank; or build the emulator with a smaller ratio.",
        ) from exc
    finally:
        if session is not None:
            session.close()
        del session
        if anchors is not None and anchors.feed is not None:
            anchors.feed.close()  # the original's pinned blocks: not carried into the later stages
        if device.type == "cuda":
            gc.collect()  # break reference cycles that still hold GPU tensors, then return the cache
            torch.cuda.empty_cache()


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype, torch.dtype | None]:
    """The device, the dtype of the frozen weights and the autocast dtype (``None``: no autocast).

    Device and ``auto`` dtype follow :mod:`emloc_engine.machine.devices` (CUDA: bf16 where supported,
    else fp16 with a loss scaler; MPS and CPU: fp32). LoRA weights and optimizer state are always fp32.

    Raises:
        ConfigError: the device is not available, or fp16/bf16 was asked for on the CPU.
    """
    dev = resolve_device(device)
    weight = compute_dtype(dev, dtype)
    if dev.type == "cpu" and weight != torch.float32:
        raise ConfigError(f"{dtype} training is not supported on the CPU.", hint="Use --dtype float32 (or auto).")
    return dev, weight, (weight if weight != torch.float32 else None)


# --------------------------------------------------------------------------------------------
# Loss: hidden states of the decoder, then the LM head on label positions in checkpointed chunks.


def lm_loss_sum(causal_lm: Any, batch: dict[str, torch.Tensor],
                chunk_tokens: int | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy over label positions (fp32 scalar).

    .. math:: L = \\sum_{t:\\,y_{t+1} \\ne -100} -\\log \\mathrm{softmax}(W_{head} h_t)_{y_{t+1}}

    Equal to ``model(**batch).loss × label_tokens(batch)``; only the label positions reach the
    head, in chunks whose logits are recomputed in the backward pass instead of being stored.
    Final-logit soft-capping (Gemma 2/3) and logit scaling (Granite) are applied like the model does.
    """
    hidden = causal_lm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False).last_hidden_state
    return hidden_loss_sum(causal_lm, hidden, batch["labels"], chunk_tokens)


def hidden_loss_sum(causal_lm: Any, hidden: torch.Tensor, labels: torch.Tensor,
                    chunk_tokens: int | None = None) -> torch.Tensor:
    """:func:`lm_loss_sum` from the decoder's final (normed) hidden states ``(B, T, hidden)``: the
    head of ``causal_lm`` on label positions, in chunks. The streamed original
    (:class:`~emloc_engine.weights.streamed.StreamedModel`) scores its passes with it too."""
    config = causal_lm.config
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h, y = hidden[:, :-1][keep], targets[keep]
    head = causal_lm.get_output_embeddings()
    if chunk_tokens is None:
        from emloc_engine.run.planning import loss_chunk_tokens

        chunk_tokens = loss_chunk_tokens(int(head.weight.shape[0]))
    softcap = getattr(config, "final_logit_softcapping", None)
    scaling = getattr(config, "logits_scaling", None)

    def chunk_loss(h_chunk: torch.Tensor, y_chunk: torch.Tensor) -> torch.Tensor:
        logits = head(h_chunk).float()
        if scaling:
            logits = logits / scaling
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return nn.functional.cross_entropy(logits, y_chunk, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, y.numel(), chunk_tokens):
        h_c, y_c = h[i:i + chunk_tokens], y[i:i + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + torch.utils.checkpoint.checkpoint(chunk_loss, h_c, y_c, use_reentrant=False)
        else:
            total = total + chunk_loss(h_c, y_c)
    return total


def lr_factor(step: int, schedule: str, warmup: int, steps: int) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (1-based).

    Warmup: ``step / warmup`` for ``step ≤ warmup`` (no step is wasted at lr 0). After it, with
    ``p = (step − warmup − 1) / (steps − warmup)`` ∈ [0, 1): cosine ``½(1 + cos πp)``, linear
    ``1 − p``, constant 1. The first step after warmup is at the peak; the last is small, not 0.
    """
    if step <= warmup:
        return step / warmup
    p = (step - warmup - 1) / max(1, steps - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, p)))
    if schedule == "linear":
        return max(0.0, 1.0 - p)
    return 1.0


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup: int,
                   steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_factor`; ``scheduler.get_last_lr()`` is the next step's lr."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i + 1, schedule, warmup, steps))


# --------------------------------------------------------------------------------------------
# The session: model, optimizer and the loop.


def _resume_settings(cfg: TrainConfig, n_train: int, data_fingerprint: str, targets: Sequence[str],
                     anchor: str = "none") -> dict[str, Any]:
    """Settings that decide the trajectory: a checkpoint resumes only when they are unchanged."""
    return {"anchor": anchor, "rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout,
            "target_modules": list(targets),
            "use_rslora": cfg.use_rslora, "lr": cfg.lr, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
            "schedule": cfg.schedule, "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm,
            "seed": cfg.seed, "n_train": n_train, "data_fingerprint": data_fingerprint}


@dataclass
class _Session:
    cfg: TrainConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    peft_model: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    settings: dict[str, Any]
    source_model: dict[str, Any]
    progress: Progress
    start_step: int = 0
    resumed_from_step: int | None = None
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    lr_history: list[tuple[int, float]] = field(default_factory=list)
    grad_norm_history: list[tuple[int, float]] = field(default_factory=list)
    last_saved_step: int = -1
    data_parallel: DataParallel | None = None
    anchors: Anchors | None = None

    @classmethod
    def open(cls, cfg: TrainConfig, device: torch.device, weight_dtype: torch.dtype, amp_dtype: torch.dtype | None,
             n_train: int, data_fingerprint: str, progress: Progress,
             data_parallel: DataParallel | None = None, anchor: str = "none") -> _Session:
        from emloc_engine.core.architectures import arch_spec
        from emloc_engine.stages.training.lora_layers import attach_lora, lora_config, resolve_targets
        from emloc_engine.weights.lowrank import load_emulator, read_emulator_meta

        progress.update(0.0, "loading the emulator")
        meta = read_emulator_meta(cfg.resolved_emulator_dir)
        # On GPUs the inner ranks are zero-padded to multiples of 8 for the tensor-core path
        # (same function, see lowrank.pad_rank); the adapter does not depend on it.
        model = load_emulator(cfg.resolved_emulator_dir, dtype=weight_dtype, device=device,
                              rank_multiple=8 if device.type == "cuda" else 1)
        targets = resolve_targets(model, cfg.target_modules, arch_spec(model.config).short_names)
        source = dict(meta.get("source_model", {}))
        if not source.get("path"):
            log.warning("Emulator %s does not record its source model; adapter_config names no base model.",
                        cfg.resolved_emulator_dir)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        peft_model = attach_lora(model, lora_config(cfg.rank, cfg.alpha, cfg.dropout, targets, cfg.use_rslora,
                                                    str(source.get("path", ""))))
        causal_lm: Any = peft_model.get_base_model()
        causal_lm.config.use_cache = False
        if cfg.grad_checkpointing:
            enable_activation_checkpointing(causal_lm)
        peft_model.train()
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      fused=device.type == "cuda")
        if cfg.effective_warmup() != cfg.warmup_steps:
            log.warning("warmup_steps=%d is not below steps=%d; using %d warmup steps.", cfg.warmup_steps,
                        cfg.steps, cfg.effective_warmup())
        scheduler = make_scheduler(optimizer, cfg.schedule, cfg.effective_warmup(), cfg.steps)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        session = cls(cfg, device, amp_dtype, peft_model, optimizer, scheduler, scaler,
                      _resume_settings(cfg, n_train, data_fingerprint, targets, anchor), source, progress,
                      data_parallel=data_parallel)
        session.restore_or_clear()
        return session

    # -- the loop ------------------------------------------------------------------------------

    def run(self, train: Sequence[ExampleLike], eval_: Sequence[ExampleLike], pad_id: int,
            t_start: float) -> TrainResult:
        cfg, progress = self.cfg, self.progress
        params = [p for p in self.peft_model.parameters() if p.requires_grad]
        n_params = sum(p.numel() for p in params)
        log.info("Training %d LoRA parameters on %s from step %d to %d.", n_params, self.device, self.start_step,
                 cfg.steps)
        clock, tokens_total, train_s = EtaClock(), 0, 0.0
        step = self.start_step
        for step in range(self.start_step + 1, cfg.steps + 1):
            try:
                progress.check_cancelled()
            except Cancelled:
                self.save_checkpoint(step - 1)
                raise
            t0 = time.perf_counter()
            micro_batches = [micro_batch_indices(len(train), cfg.batch_size, cfg.seed, m)
                             for m in range((step - 1) * cfg.grad_accum, step * cfg.grad_accum)]
            if self.data_parallel is not None:
                micro_batches = self.data_parallel.begin_step(step, micro_batches)
            if self.anchors is not None:
                self.anchors.ensure([i for mb in micro_batches for i in mb], self.upcoming(step, len(train)),
                                    self.peft_model)
            batches = [collate([train[i] for i in mb], pad_id) for mb in micro_batches]
            n_labels, step_tokens = self.global_counts(sum(label_tokens(b) for b in batches),
                                                       sum(int(b["attention_mask"].sum()) for b in batches))
            n_labels = max(1, n_labels)
            loss_sum = torch.zeros((), device=self.device)
            for mb, batch in zip(micro_batches, batches, strict=True):
                if self.anchors is not None:
                    self.anchors.select(mb, batch["input_ids"].shape[1], self.device)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with self.autocast():
                    part = lm_loss_sum(self.peft_model.get_base_model(), batch)
                # Normalise by the label tokens of the whole optimizer step, not per micro-batch.
                self.scaler.scale(part / n_labels).backward()
                loss_sum += part.detach()
            if self.data_parallel is not None:
                self.sync_gradients(params, loss_sum)
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
            lr = float(self.scheduler.get_last_lr()[0])
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            loss = float(loss_sum) / n_labels  # .item() syncs: step time below is real time
            if not math.isfinite(loss):
                raise ConfigError(f"The training loss became {loss} at step {step}.",
                                  hint="Lower --lr, or use --dtype float32 if the GPU has no bf16.")
            step_s = time.perf_counter() - t0
            tokens_total, train_s = tokens_total + step_tokens, train_s + step_s
            self.record(step, loss, lr, float(grad_norm), step_tokens / max(step_s, 1e-9))
            if eval_ and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                self.eval_history.append((step, self.evaluate(eval_, pad_id)))
                progress.log("eval/loss", self.eval_history[-1][1], step)
            if cfg.save_every and step % cfg.save_every == 0:
                self.save_checkpoint(step)
            fraction = (step - self.start_step) / max(1, cfg.steps - self.start_step)
            progress.update(step / cfg.steps, f"step {step}/{cfg.steps} · loss {loss:.3g} · "
                            f"{_si(tokens_total / max(train_s, 1e-9))} tok/s · "
                            f"ETA {format_seconds(clock.eta_s(fraction))}")
        self.save_checkpoint(step)
        adapter_dir = self.save_adapter()
        if eval_ and not self.eval_history:  # resumed after the last step: evaluate once for the result
            self.eval_history.append((cfg.steps, self.evaluate(eval_, pad_id)))
        return TrainResult(
            adapter_dir=adapter_dir, steps_done=step,
            loss_history=tuple(self.loss_history), eval_history=tuple(self.eval_history),
            final_eval_loss=self.eval_history[-1][1] if self.eval_history else None,
            peak_vram_gib=self.peak_vram_gib(), tokens_per_s=tokens_total / train_s if train_s else 0.0,
            wall_s=time.perf_counter() - t_start, resumed_from_step=self.resumed_from_step,
            lr_history=tuple(self.lr_history), grad_norm_history=tuple(self.grad_norm_history),
            target_modules=tuple(self.settings["target_modules"]), trainable_params=n_params,
            checkpoint_dir=self.checkpoint_path(step),
        )

    def upcoming(self, step: int, n_train: int) -> Iterator[list[int]]:
        """This process's examples of each step after ``step``, in order (what the anchors compute next)."""
        cfg, dp = self.cfg, self.data_parallel
        for s in range(step + 1, cfg.steps + 1):
            mbs = [micro_batch_indices(n_train, cfg.batch_size, cfg.seed, m)
                   for m in range((s - 1) * cfg.grad_accum, s * cfg.grad_accum)]
            if dp is not None:
                from emloc_engine.stages.training.distributed import shard_micro_batches

                mbs = shard_micro_batches(mbs, dp.rank, dp.world_size, cfg.batch_size)
            yield [i for mb in mbs for i in mb]

    def global_counts(self, *counts: int) -> list[int]:
        """``counts`` summed over the data-parallel ranks (returned unchanged in one process)."""
        if self.data_parallel is None:
            return list(counts)
        total = torch.tensor(counts, dtype=torch.int64)
        self.data_parallel.all_reduce_([total])
        return [int(v) for v in total.tolist()]

    def sync_gradients(self, params: Sequence[torch.Tensor], loss_sum: torch.Tensor) -> None:
        """Sum the LoRA gradients and the step's loss over the ranks (data-parallel only).

        Each rank divided its loss by the label tokens of the WHOLE optimizer step, so the sum of
        the ranks' gradients is the single-process gradient of that step.
        """
        assert self.data_parallel is not None
        for p in params:
            if p.grad is None:  # this rank had no example in this step
                p.grad = torch.zeros_like(p)
        self.data_parallel.all_reduce_([*(p.grad for p in params if p.grad is not None), loss_sum])

    @property
    def writes_files(self) -> bool:
        """Whether this process writes checkpoints and the adapter (rank 0, or the only process)."""
        return self.data_parallel is None or self.data_parallel.rank == 0

    def record(self, step: int, loss: float, lr: float, grad_norm: float, tokens_per_s: float) -> None:
        self.loss_history.append((step, loss))
        self.lr_history.append((step, lr))
        self.grad_norm_history.append((step, grad_norm))
        for name, value in (("train/loss", loss), ("train/lr", lr), ("train/grad_norm", grad_norm),
                            ("train/tokens_per_s", tokens_per_s), ("gpu/peak_gib", self.peak_vram_gib())):
            self.progress.log(name, value, step)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @torch.no_grad()
    def evaluate(self, eval_: Sequence[ExampleLike], pad_id: int) -> float:
        """Mean next-token loss over (at most ``max_eval_batches``) eval micro-batches, dropout off."""
        self.peft_model.eval()
        anchors = self.anchors
        if anchors is not None:
            anchors.clear()
        total, count = 0.0, 0
        try:
            bs = self.cfg.batch_size
            starts = range(0, min(len(eval_), bs * self.cfg.max_eval_batches), bs)
            if self.data_parallel is not None:  # each rank evaluates a share of the eval batches
                starts = starts[self.data_parallel.rank::self.data_parallel.world_size]
            for k, start in enumerate(starts):
                batch = collate(eval_[start:start + bs], pad_id)
                if anchors is not None and anchors.eval_base is not None:  # see prepare_anchors
                    base, end = anchors.eval_base, len(eval_)
                    rows = range(start, min(start + bs, end))
                    later = ([base + j for j in range(t, min(t + bs, end))] for t in starts[k + 1:])
                    anchors.ensure([base + j for j in rows], later, self.peft_model)
                    anchors.select([anchors.eval_base + j for j in rows], batch["input_ids"].shape[1], self.device)
                count += label_tokens(batch)
                with self.autocast():
                    total += float(lm_loss_sum(self.peft_model.get_base_model(),
                                               {k: v.to(self.device) for k, v in batch.items()}))
        finally:
            if anchors is not None:
                anchors.clear()
            self.peft_model.train()
        if self.data_parallel is not None:
            sums = torch.tensor([total, float(count)], dtype=torch.float64)
            self.data_parallel.all_reduce_([sums])
            total, count = float(sums[0]), int(sums[1])
        return total / max(1, count)

    def peak_vram_gib(self) -> float:
        return gpu_peak_gib(self.device)

    # -- checkpoints ---------------------------------------------------------------------------

    def checkpoint_path(self, step: int) -> Path:
        return self.cfg.layout.checkpoints / f"step-{step}"

    def save_checkpoint(self, step: int) -> None:
        """Write ``checkpoints/step-N/`` atomically, then keep only the newest ``keep_checkpoints``."""
        if step == self.last_saved_step:
            return
        if not self.writes_files:
            self.last_saved_step = step
            return
        with atomic_dir(self.checkpoint_path(step), overwrite=True) as tmp:
            self.peft_model.save_pretrained(str(tmp))
            state = {
                "step": step, "micro_batches_done": step * self.cfg.grad_accum, "settings": self.settings,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng_torch": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "rng_python": random.getstate(),
                "loss_history": self.loss_history, "eval_history": self.eval_history,
                "lr_history": self.lr_history, "grad_norm_history": self.grad_norm_history,
            }
            torch.save(state, tmp / STATE_FILE)
        self.last_saved_step = step
        log.info("Checkpoint written: %s", self.checkpoint_path(step))
        for old in list_checkpoints(self.cfg.layout.checkpoints)[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old[1], ignore_errors=True)

    def restore_or_clear(self) -> None:
        """Load the newest usable checkpoint (``resume``), or delete them all (``resume=False``).

        A checkpoint that cannot be read (empty or truncated ``training_state.pt`` or adapter weights,
        or a state file that a safe ``torch.load(weights_only=True)`` refuses) is set aside as
        ``step-N.unusable`` with a warning and the previous one is tried; with none left, training
        starts from step 0 and says so. Nothing is ever loaded with ``weights_only=False``.
        """
        found = list_checkpoints(self.cfg.layout.checkpoints)
        if not self.cfg.resume:
            for _, path in found if self.writes_files else ():
                shutil.rmtree(path, ignore_errors=True)
            return
        for step, path in reversed(found):
            try:
                state, adapter = read_checkpoint(path)
            except UnusableCheckpoint as bad:
                log.warning("Training checkpoint %s cannot be used: %s. %s", path, bad,
                            "Trying the previous one." if step != found[0][0] else "No other checkpoint is left.")
                if self.writes_files:  # out of the way of resume and of the keep-newest cleanup
                    aside = path.with_name(path.name + ".unusable")
                    shutil.rmtree(aside, ignore_errors=True)
                    with contextlib.suppress(OSError):
                        os.replace(path, aside)
                continue
            self._restore(step, path, state, adapter)
            return
        if found:
            log.warning("No usable training checkpoint in %s: training starts from step 0.",
                        self.cfg.layout.checkpoints)

    def _restore(self, step: int, path: Path, state: dict[str, Any], adapter: dict[str, torch.Tensor]) -> None:
        changed = [f"{k}: checkpoint has {state['settings'].get(k)!r}, now {v!r}"
                   for k, v in self.settings.items()
                   if state["settings"].get(k, "none" if k == "anchor" else None) != v]  # older checkpoints: no anchors
        if changed:
            raise ConfigError(f"Cannot resume from {path}: training settings or data changed.", problems=changed,
                              hint="Use the same settings, or start over (resume off / --restart).")
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.peft_model, adapter)
        unexpected = list(getattr(result, "unexpected_keys", []))
        if unexpected:
            raise ConfigError(f"Checkpoint {path} does not match this adapter.", problems=unexpected[:10])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_torch"])
        if torch.cuda.is_available() and state["rng_cuda"]:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        random.setstate(state["rng_python"])
        for name in ("loss_history", "eval_history", "lr_history", "grad_norm_history"):
            setattr(self, name, [(int(s), float(v)) for s, v in state[name]])
        self.start_step = self.resumed_from_step = self.last_saved_step = step
        log.info("Resuming training from %s.", path)

    def save_adapter(self) -> Path:
        """Write ``RUN_DIR/adapter/`` (peft files + ``emloc_training.json``) in one rename."""
        target = self.cfg.layout.adapter
        if not self.writes_files:
            return target
        with atomic_dir(target, overwrite=True) as tmp:
            self.peft_model.save_pretrained(str(tmp))
            meta = {
                "emulator_dir": str(self.cfg.resolved_emulator_dir), "source_model": self.source_model,
                "settings": {**self.settings, "steps": self.cfg.steps, "warmup_steps": self.cfg.effective_warmup()},
                "loss_history": self.loss_history, "eval_history": self.eval_history,
                "fingerprint": _adapter_fingerprint(tmp / "adapter_model.safetensors"),
            }
            (tmp / TRAINING_META).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
        return target

    def close(self) -> None:
        """Drop the model, optimizer and scheduler so their (GPU) memory can be freed."""
        for name in ("peft_model", "optimizer", "scheduler", "scaler"):
            setattr(self, name, None)


class UnusableCheckpoint(Exception):
    """A training checkpoint that cannot be read (the message says why); resume falls back past it."""


_STATE_KEYS = ("step", "settings", "optimizer", "scheduler", "scaler", "rng_torch", "rng_cuda", "rng_python",
               "loss_history", "eval_history", "lr_history", "grad_norm_history")


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The training state and adapter weights of ``checkpoints/step-N/``, both read before either is used.

    The state is loaded with ``torch.load(weights_only=True)`` only: tensors, numbers, strings and
    containers, never arbitrary Python objects.

    Raises:
        UnusableCheckpoint: a file is empty, truncated or corrupt, lacks what a checkpoint holds, or
            holds objects the safe load refuses (not written by EMLoC, or altered).
    """
    import pickle

    from safetensors.torch import load_file

    state_file = path / STATE_FILE
    try:
        if state_file.stat().st_size == 0:
            raise UnusableCheckpoint(f"{STATE_FILE} is empty (the write was cut off)")
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except UnusableCheckpoint:
        raise
    except pickle.UnpicklingError as exc:  # torch's refusal text advises weights_only=False: never shown
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            raise UnusableCheckpoint(f"{STATE_FILE} holds Python objects that a safe load refuses (it was not "
                                     "written by EMLoC, or was altered); it is corrupt or untrusted and is "
                                     "not loaded") from None
        raise UnusableCheckpoint(f"{STATE_FILE} is corrupt ({_first_line(exc)})") from None
    except (EOFError, RuntimeError, OSError, ValueError) as exc:
        raise UnusableCheckpoint(f"{STATE_FILE} is truncated or corrupt ({type(exc).__name__}: "
                                 f"{_first_line(exc)})") from None
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise UnusableCheckpoint(f"{STATE_FILE} lacks {', '.join(missing[:4])}")
    try:
        adapter = load_file(str(path / "adapter_model.safetensors"))
    except Exception as exc:  # SafetensorError, OSError: a cut-off or damaged file
        raise UnusableCheckpoint(f"adapter_model.safetensors is truncated or corrupt ({_first_line(exc)})") from None
    return state, adapter


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if "weights_only" not in line else "refused by the safe loader"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, path)`` in ``folder``, oldest first (partial ones are ignored)."""
    out: list[tuple[int, Path]] = []
    if Path(folder).is_dir():
        for p in Path(folder).iterdir():
            m = re.fullmatch(r"step-(\d+)", p.name)
            if m and (p / STATE_FILE).exists() and (p / "adapter_model.safetensors").exists():
                out.append((int(m.group(1)), p))
    return sorted(out)


def _adapter_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _si(value: float) -> str:
    """``1234.5`` -> ``"1.2k"``."""
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg`` as JSON-ready values (for manifests and logs)."""
    return json.loads(json.dumps(asdict(cfg), default=str))


__all__ = ["TrainConfig", "TrainResult", "hidden_loss_sum", "lm_loss_sum", "train_lora", "train_on_examples"]
