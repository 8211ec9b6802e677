"""Stages 2–4 for vision-language models: LoRA on the VLM emulator, correction, merge.

* :func:`train_vlm_lora` — peft LoRA on every compressed module of the emulator (vision tower and
  language model; the adapter is on the whole composite ``u·v``, as for text: the same
  :mod:`~emloc_engine.stages.training.lora_layers`), AdamW, cosine schedule with warmup, loss on the
  labelled (assistant) tokens in chunks, activation checkpointing of both towers' blocks (as for text:
  :mod:`~emloc_engine.stages.training.activation_checkpointing`; a tower without LoRA builds no graph), checkpoints every
  ``checkpoint_every`` steps and exact resume (LoRA weights, optimizer state, the data order and RNG
  state come back). One sample per step
  (its images fix its shape), ``grad_accum`` samples per update.
* :func:`correct_vlm_adapter` — :func:`~emloc_engine.stages.correction.corrector.correct_module`
  for every module that carries LoRA, the vision tower's included, in fp64 against the original
  checkpoint's weights; λ ∈ ``lambdas`` chosen by the held-out loss of original + corrected adapter
  (``lambdas=(x,)`` fixes it). Writes a new adapter folder; the trained one is never touched.
* :func:`merge_vlm` — ``W + s·B·A`` streamed shard by shard into a copy of the source folder with
  the same tensor names and shards (hub layout), config, processor files and chat template; it
  loads with ``AutoModelForImageTextToText``.
* GGUF and the export stage: :mod:`emloc_engine.vision.export`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emloc_engine.core.atomic import atomic_dir
from emloc_engine.core.errors import ConfigError, UnsupportedModel
from emloc_engine.core.progress import NULL_PROGRESS, Progress, sub
from emloc_engine.data.config import DataConfig
from emloc_engine.data.images import VisionExample, processor_inputs
from emloc_engine.data.render import IGNORE_INDEX
from emloc_engine.machine import devices
from emloc_engine.machine.process_memory import gpu_peak_gib, reset_gpu_peak
from emloc_engine.weights.checkpoint import Checkpoint
from emloc_engine.weights.lowrank import read_emulator_meta

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # RUN_DIR/checkpoints, as for text (RunLayout.checkpoints)
LAMBDAS = (0.0, 1.0, 3.0, math.inf)
VLM_ANCHORS = ("none", "blocks", "auto")


@dataclass(frozen=True)
class VlmTrainConfig:
    """Settings of LoRA training on a VLM emulator."""

    model_dir: Path = field(
        metadata={"help": "The ORIGINAL model folder (processor, and what the adapter is for)."}
    )
    emulator_dir: Path = field(metadata={"help": "The VLM emulator (RUN_DIR/emulator)."})
    data: DataConfig = field(metadata={"help": "The image dataset."})
    out_dir: Path = field(metadata={"help": "The run folder: adapter/ and checkpoints/ go here."})
    steps: int = field(default=100, metadata={"help": "Optimizer steps."})
    lr: float = field(default=2e-4, metadata={"help": "Peak learning rate (AdamW)."})
    rank: int = field(default=16, metadata={"help": "LoRA rank r."})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (scale alpha / r)."})
    grad_accum: int = field(default=1, metadata={"help": "Samples per optimizer step."})
    warmup: int = field(default=0, metadata={"help": "Linear warmup steps."})
    checkpoint_every: int = field(default=50, metadata={"help": "Save a resumable checkpoint every N steps."})
    seed: int = field(default=0, metadata={"help": "Seed of the adapter init and the data order."})
    device: str = field(default="auto", metadata={"help": "cuda, cuda:N, cpu or auto."})
    dtype: str = field(default="auto", metadata={"help": "Emulator weights: auto (bf16 on GPUs), float32…"})
    anchor: str = field(
        default="none",
        metadata={"choices": VLM_ANCHORS, "help": "Anchored training (emloc_engine.vision.anchors): blocks, "
                  "auto (blocks when the anchors fit anchor_ram_gib, else none with a note) or none."},
    )
    anchor_ram_gib: float = field(default=4.0, metadata={"help": "RAM the anchors may take, in GiB."})
    grad_checkpointing: bool = field(
        default=True,
        metadata={"help": "Recompute every block's activations (both towers) in the backward pass instead of "
                  "keeping them: a step keeps only the blocks' inputs."},
    )
    stop_after: int | None = field(
        default=None,
        metadata={"help": "Stop (resumably) after this many steps of this call (tests, time-boxed runs)."},
    )

    def __post_init__(self) -> None:
        for k in ("model_dir", "emulator_dir", "out_dir"):
            object.__setattr__(self, k, Path(getattr(self, k)))
        problems = [
            f"{k} must be at least 1 (got {getattr(self, k)})"
            for k in ("steps", "rank", "grad_accum", "checkpoint_every")
            if getattr(self, k) < 1
        ]
        if not self.lr > 0:
            problems.append(f"lr must be positive (got {self.lr})")
        if self.anchor not in VLM_ANCHORS:
            problems.append(f"anchor must be one of {', '.join(VLM_ANCHORS)} (got {self.anchor!r})")
        if problems:
            raise ConfigError("Invalid VLM training settings.", problems=problems)


@dataclass(frozen=True)
class VlmTrainResult:
    adapter_dir: Path
    losses: tuple[float, ...]
    eval_loss: float | None
    steps_done: int
    resumed_from: int
    wall_s: float
    peak_vram_gib: float
    anchor: str = "none"
    anchor_note: str = ""


def example_batch(
    processor: Any, ex: VisionExample, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """The model's inputs for one example, with ``labels`` (the processor's ids must equal the example's)."""
    inputs = dict(processor_inputs(processor, [ex.text], [list(ex.images)]))
    ids = inputs["input_ids"][0][: len(ex.input_ids)]
    if tuple(ids.tolist()) != ex.input_ids:
        raise ConfigError("The processor renders this example differently from when the data was prepared.")
    for k, v in list(inputs.items()):
        if isinstance(v, torch.Tensor):
            if v.dim() >= 2 and v.shape[0] == 1 and v.shape[-1] == inputs["input_ids"].shape[-1]:
                v = v[..., : len(ex.input_ids)]  # truncated examples: cut the token-aligned tensors too
            v = v.to(device)
            inputs[k] = v.to(dtype) if v.is_floating_point() else v
    inputs["labels"] = torch.tensor([ex.labels], device=device)
    return inputs


def loss_sum(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled tokens, and their count.

    As for text (:func:`~emloc_engine.stages.training.trainer.hidden_loss_sum`): the model runs up to its
    final hidden states, and the head sees the labelled positions only, a few dozen at a time
    (``loss_chunk_tokens``: ≤ 64 MiB of logits; checkpointed chunks when gradients are on). The ``tokens × vocab`` logits of the whole sample (2 GiB in fp32 for
    1,300 tokens of Qwen2.5-VL's 152k vocabulary, with their log-softmax) never exist.
    ``model``: the VLM, or a peft model around it.
    """
    from emloc_engine.stages.training.trainer import hidden_loss_sum

    labels = batch.pop("labels")
    vlm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = vlm.model(**batch, use_cache=False).last_hidden_state
    return hidden_loss_sum(vlm, hidden, labels), int((labels[:, 1:] != IGNORE_INDEX).sum())


def eval_loss(
    model: Any,
    processor: Any,
    examples: Sequence[VisionExample],
    device: torch.device,
    dtype: torch.dtype,
    select: Callable[[int | None], None] | None = None,
) -> float | None:
    """Mean loss per labelled token over ``examples`` (None when there are none); ``select(j)`` is called
    before example ``j`` (anchored training: its offsets)."""
    if not examples:
        return None
    total, n = 0.0, 0
    with torch.no_grad():
        for j, ex in enumerate(examples):
            if select is not None:
                select(j)
            s, k = loss_sum(model, example_batch(processor, ex, device, dtype))
            total, n = total + float(s), n + k
    return total / max(1, n)


def _lr(step: int, cfg: VlmTrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(
        (p for p in folder.glob("step-*") if (p / "state.pt").is_file()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    return done[-1] if done else None


def train_vlm_lora(cfg: VlmTrainConfig, progress: Progress = NULL_PROGRESS) -> VlmTrainResult:
    """Train a LoRA adapter on the VLM emulator; rerunning the same call resumes from its last checkpoint.

    Raises:
        ConfigError, DataError, ModelNotFound: bad settings, data or folders.
        Cancelled: at a step boundary; the last checkpoint is kept.
    """
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    from emloc_engine.data.vision_pipeline import prepare_vision_dataset
    from emloc_engine.stages.training.activation_checkpointing import enable_activation_checkpointing
    from emloc_engine.stages.training.lora_layers import attach_lora, lora_config
    from emloc_engine.vision.emulator import load_vlm_emulator
    from emloc_engine.vision.processor import load_processor

    t0 = time.monotonic()
    device = devices.resolve_device(cfg.device)
    dtype = devices.compute_dtype(device, cfg.dtype)
    processor = load_processor(cfg.model_dir)
    data = prepare_vision_dataset(cfg.data, processor)
    meta = read_emulator_meta(cfg.emulator_dir)
    records, anchor_note = _original_records(cfg, data, processor, device, dtype, progress)
    model = load_vlm_emulator(cfg.emulator_dir, dtype=dtype, device=device)
    anchors = _anchors(model, records, data, processor, device, dtype, progress)
    raw_model = model  # the anchors hook its blocks (the same modules once peft wraps the model)
    torch.manual_seed(cfg.seed)
    targets = sorted(meta["modules"])
    model = attach_lora(
        model, lora_config(cfg.rank, cfg.alpha, 0.0, targets, False, str(cfg.model_dir.resolve()))
    )
    if cfg.grad_checkpointing:  # every block of both towers keeps only its inputs, as for text
        enable_activation_checkpointing(model.get_base_model())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, fused=device.type == "cuda")  # as for text
    ckpt_dir = cfg.out_dir / CHECKPOINTS
    order_rng = random.Random(cfg.seed)
    start, losses = 0, []
    latest = _latest_checkpoint(ckpt_dir)
    if latest is not None:
        state = torch.load(latest / "state.pt", map_location="cpu", weights_only=True)  # never unpickles code
        set_peft_model_state_dict(model, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        order_rng.setstate(state["order_rng"])
        torch.set_rng_state(state["torch_rng"])
        start, losses = int(state["step"]), list(state["losses"])
    resumed_from = start
    order: list[int] = list(state["pending_order"]) if latest is not None else []
    reset_gpu_peak(device)
    model.train()
    step = start
    hooks = contextlib.ExitStack()
    if anchors is not None:
        hooks.enter_context(anchors.attached(raw_model))
    with hooks:  # the anchors' hooks come off however training ends
        while step < cfg.steps and (cfg.stop_after is None or step - resumed_from < cfg.stop_after):
            progress.check_cancelled()
            for g in optimizer.param_groups:
                g["lr"] = cfg.lr * _lr(step, cfg)
            optimizer.zero_grad(set_to_none=True)
            picks = []
            for _ in range(cfg.grad_accum):
                if not order:
                    order = list(range(len(data.train)))
                    order_rng.shuffle(order)
                picks.append(order.pop())
            # the step's labelled tokens are known before any forward: each sample's graph is freed at once
            n = sum(label_count(data.train[k]) for k in picks)
            total = 0.0
            for k in picks:
                if anchors is not None:
                    anchors.select(k)
                s, _ = loss_sum(model, example_batch(processor, data.train[k], device, dtype))
                (s / max(1, n)).backward()
                total += float(s.detach())
            optimizer.step()
            step += 1
            losses.append(total / max(1, n))
            progress.log("train/loss", losses[-1], step)
            progress.update(step / cfg.steps, f"step {step}/{cfg.steps}, loss {losses[-1]:.4f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _save_checkpoint(
                    ckpt_dir / f"step-{step}",
                    {
                        "step": step,
                        "losses": losses,
                        "lora": get_peft_model_state_dict(model),
                        "optimizer": optimizer.state_dict(),
                        "order_rng": order_rng.getstate(),
                        "torch_rng": torch.get_rng_state(),
                    },
                    order,
                )
        model.eval()
        adapter_dir = cfg.out_dir / "adapter"
        final_eval = None
        if step >= cfg.steps:
            base = len(data.train)  # eval sample j's anchors are at base + j
            select = (lambda j: anchors.select(base + j)) if anchors is not None else None
            final_eval = eval_loss(model, processor, data.eval, device, dtype, select)
            with atomic_dir(adapter_dir, overwrite=True) as tmp:
                model.save_pretrained(str(tmp))
    peak = gpu_peak_gib(device)
    return VlmTrainResult(
        adapter_dir,
        tuple(losses),
        final_eval,
        step,
        resumed_from,
        time.monotonic() - t0,
        peak,
        "blocks" if anchors is not None else "none",
        anchor_note,
    )


def label_count(ex: VisionExample) -> int:
    """The labelled tokens of an example that carry loss (every label but the first: next-token targets)."""
    return sum(1 for t in ex.labels[1:] if t != IGNORE_INDEX)


def _original_records(
    cfg: VlmTrainConfig,
    data: Any,
    processor: Any,
    device: torch.device,
    dtype: torch.dtype,
    progress: Progress,
) -> tuple[list[dict[str, tuple[torch.Tensor, torch.Tensor]]] | None, str]:
    """The original's block inputs and outputs on every train and eval sample (anchored training), and a note.

    The original is loaded, run and freed before the emulator loads. With ``anchor="auto"`` a dataset whose
    records outgrow ``anchor_ram_gib`` is trained without anchors (the note says why).

    Raises:
        AnchorsTooLarge: ``anchor="blocks"`` and the records do not fit.
    """
    if cfg.anchor == "none":
        return None, ""
    from transformers import AutoModelForImageTextToText

    from emloc_engine.vision.anchors import AnchorsTooLarge, record_original

    examples = (*data.train, *data.eval)
    model: Any = AutoModelForImageTextToText.from_pretrained(
        cfg.model_dir, dtype=dtype, local_files_only=True, trust_remote_code=False
    )
    model = model.to(device).eval()
    try:
        records = record_original(
            model,
            len(examples),
            lambda i: example_batch(processor, examples[i], device, dtype),
            int(cfg.anchor_ram_gib * 2**30),
            sub(progress, 0.0, 0.0),
        )
    except AnchorsTooLarge as exc:
        if cfg.anchor == "blocks":
            raise
        log.warning("Training without anchors: %s", exc.summary)
        return None, f"not anchored: {exc.summary}"
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records, f"every block of both towers anchored on {len(examples)} samples"


def _anchors(
    model: Any,
    records: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] | None,
    data: Any,
    processor: Any,
    device: torch.device,
    dtype: torch.dtype,
    progress: Progress,
) -> Any:
    """The :class:`~emloc_engine.vision.anchors.VlmAnchors` of the recorded samples (None without records)."""
    if records is None:
        return None
    from emloc_engine.vision.anchors import VlmAnchors, emulator_offsets

    examples = (*data.train, *data.eval)
    offsets = emulator_offsets(
        model, lambda i: example_batch(processor, examples[i], device, dtype), records, sub(progress, 0.0, 0.0)
    )
    return VlmAnchors(offsets)


def _save_checkpoint(folder: Path, state: dict[str, Any], order: list[int]) -> None:
    state = dict(state, pending_order=list(order))
    with atomic_dir(folder, overwrite=True) as tmp:
        torch.save(state, tmp / "state.pt")


# -- correction -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VlmCorrectionResult:
    adapter_dir: Path
    lam: float
    table: tuple[tuple[float, float], ...]
    modules: int


def _module_weight_names(model_dir: Path, emulator_dir: Path, family: str) -> dict[str, str]:
    """Module name -> checkpoint tensor name of its weight, for every weight of the source."""
    from emloc_engine.vision.names import module_key

    emu = Checkpoint(emulator_dir)
    try:
        keys = set(emu.names())
    finally:
        emu.close()
    keys |= {m + ".weight" for m in read_emulator_meta(emulator_dir)["modules"]}
    src = Checkpoint(model_dir)
    try:
        return {
            module_key(family, n, keys)[: -len(".weight")]: n for n in src.names() if n.endswith(".weight")
        }
    finally:
        src.close()


def correct_vlm_adapter(
    model_dir: Path,
    emulator_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    data: DataConfig,
    *,
    lambdas: Sequence[float] = LAMBDAS,
    device: str = "auto",
    progress: Progress = NULL_PROGRESS,
) -> VlmCorrectionResult:
    """Correct every LoRA module for the emulator/original gap; pick λ on the held-out split.

    Raises:
        ModelNotFound, UnsupportedModel: bad folders or adapter.
        DataError: bad data.
    """
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from emloc_engine.data.vision_pipeline import prepare_vision_dataset
    from emloc_engine.stages.correction.corrector import apply_lambda, prepare_module
    from emloc_engine.vision.processor import load_processor
    from emloc_engine.weights.adapters import read_adapter, write_adapter
    from emloc_engine.weights.cpu_embeddings import keep_input_embeddings_on_cpu

    model_dir, emulator_dir = Path(model_dir), Path(emulator_dir)
    adapter = read_adapter(Path(adapter_dir))
    meta = read_emulator_meta(emulator_dir)
    family = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["model_type"]
    weight_of = _module_weight_names(model_dir, emulator_dir, family)
    dev = devices.resolve_device(device)
    linalg = devices.linalg_device(dev)  # fp64 on the GPU when there is one: seconds instead of minutes
    src, emu = Checkpoint(model_dir), Checkpoint(emulator_dir)
    prepared = {}
    try:
        for name, mod in adapter.modules.items():
            w = src.get(weight_of[name])
            w_e = (
                (emu.get(f"{name}.u.weight"), emu.get(f"{name}.v.weight"))
                if name in meta["modules"]
                else None
            )
            prepared[name] = prepare_module(w, w_e, adapter.A(name), adapter.B(name), mod.scale, device=linalg)
    finally:
        src.close()
        emu.close()
    progress.update(0.3, f"prepared {len(prepared)} modules")
    dtype = devices.compute_dtype(dev, "auto")
    processor = load_processor(model_dir)
    evals = prepare_vision_dataset(data, processor).eval
    table: list[tuple[float, float]] = []
    choices = {}
    if len(lambdas) == 1 or not evals:
        lam = float(lambdas[-1] if len(lambdas) == 1 else 1.0)
        choices[lam] = {n: apply_lambda(p, lam) for n, p in prepared.items()}
    else:
        model: Any = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype, local_files_only=True,
                                                                      trust_remote_code=False)
        # the embedding table stays in RAM (looked-up rows go to the GPU): with it, original + adapter would
        # exceed the model's own inference peak (InternVL2.5-8B shapes: 15.38 vs 15.14 GiB on an H100)
        keep_input_embeddings_on_cpu(model, dev)
        model = model.to(dev)
        # the adapter in the model's dtype, as inference would run it: an fp32 copy of it, and fp32 copies of
        # every adapted layer's input, would put the λ search above the model's inference peak
        peft_model = PeftModel.from_pretrained(
            model, str(adapter.path), is_trainable=False, autocast_adapter_dtype=False
        ).eval()
        lora = {
            n.removeprefix("base_model.model."): m
            for n, m in peft_model.named_modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})
        }
        for i, lam in enumerate(lambdas):
            chosen = {n: apply_lambda(p, lam) for n, p in prepared.items()}
            with torch.no_grad():
                for n, c in chosen.items():
                    lora[n].lora_A["default"].weight.copy_(c.lora_A)
                    lora[n].lora_B["default"].weight.copy_(c.lora_B)
            table.append((float(lam), eval_loss(peft_model, processor, evals, dev, dtype) or math.inf))
            choices[float(lam)] = chosen
            progress.update(0.3 + 0.6 * (i + 1) / len(lambdas), f"λ = {lam}: eval loss {table[-1][1]:.4f}")
        del peft_model, model
        lam = min(table, key=lambda t: (t[1], t[0]))[0]
    tensors = dict(adapter.tensors)
    for n, c in choices[lam].items():
        mod = adapter.modules[n]
        tensors[mod.a_key] = c.lora_A.to(adapter.tensors[mod.a_key].dtype)
        tensors[mod.b_key] = c.lora_B.to(adapter.tensors[mod.b_key].dtype)
    config = dict(adapter.config, base_model_name_or_path=str(model_dir.resolve()))
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        write_adapter(tmp, config, tensors, copy_from=adapter.path)
        (tmp / "emloc_correction.json").write_text(
            json.dumps(
                {
                    "lambda": lam if math.isfinite(lam) else "inf",
                    "table": [[a if math.isfinite(a) else "inf", b] for a, b in table],
                },
                indent=2,
            ),
            encoding="utf-8",
        )
    return VlmCorrectionResult(Path(out_dir), lam, tuple(table), len(prepared))


# -- merge and export -------------------------------------------------------------------------------------
def merge_vlm(
    model_dir: Path, adapter_dir: Path, out_dir: Path, emulator_dir: Path, progress: Progress = NULL_PROGRESS
) -> Path:
    """``W + s·B·A`` for every adapted module, streamed shard by shard, into a copy of ``model_dir``.

    The merged folder has the source's shards (same names and dtypes), its index, config, generation
    config, tokenizer, processor files and chat template; nothing is written into ``model_dir``.

    Raises:
        MergeError: a shape mismatch or NaN/Inf, naming the tensor (nothing is left behind).
        ModelNotFound: missing folders.
    """
    from safetensors.torch import save_file

    from emloc_engine.stages.export.merge import merge_weight, read_lora_deltas

    model_dir = Path(model_dir)
    _, deltas = read_lora_deltas(Path(adapter_dir))
    family = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["model_type"]
    weight_of = _module_weight_names(model_dir, emulator_dir, family)
    by_tensor = {weight_of[m]: d for m, d in deltas.items()}
    missing = sorted(set(deltas) - set(weight_of))
    if missing:
        raise UnsupportedModel("The adapter names modules the model does not have.", problems=missing[:10])
    shards = sorted(model_dir.glob("*.safetensors"))
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        for i, shard in enumerate(shards):
            ckpt = Checkpoint(model_dir)
            try:
                names = [n for n in ckpt.names() if ckpt.info(n).file == shard]
                out = {
                    n: merge_weight(n, ckpt.get(n), by_tensor[n]) if n in by_tensor else ckpt.get(n)
                    for n in names
                }
            finally:
                ckpt.close()
            save_file(
                {k: v.contiguous() for k, v in out.items()}, str(tmp / shard.name), metadata={"format": "pt"}
            )
            del out
            progress.update((i + 1) / len(shards), f"merged {shard.name}")
        for f in sorted(model_dir.iterdir()):
            if f.is_file() and f.suffix not in (".safetensors", ".py", ".bin") and not f.name.startswith("."):
                shutil.copyfile(f, tmp / f.name)
    return Path(out_dir)


__all__ = [
    "VlmCorrectionResult",
    "VlmTrainConfig",
    "VlmTrainResult",
    "correct_vlm_adapter",
    "eval_loss",
    "example_batch",
    "loss_sum",
    "merge_vlm",
    "train_vlm_lora",
]
