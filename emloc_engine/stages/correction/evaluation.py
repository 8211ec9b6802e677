"""Held-out loss of the ORIGINAL model plus a LoRA adapter, with cheap swaps of the LoRA weights.

Used to choose the correction strength λ: the original model is loaded once with the trained
adapter attached (:func:`emloc_engine.weights.loading.load_causal_lm`, in the device's compute
dtype: it fits the budget for inference by definition), and each candidate adapter is evaluated by
copying its ``A``/``B`` into the LoRA layers in place. No model is reloaded between candidates.

The loss is the token-weighted mean next-token cross-entropy over every label that is not
``-100`` (``Σ CE / #tokens`` over all batches, not a mean of batch means), computed from fp32
logits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from emloc_engine.core.errors import ConfigError, ModelNotFound
from emloc_engine.core.memory import HIDDEN_OFFLOAD
from emloc_engine.stages.training.batches import ExampleLike, collate
from emloc_engine.weights.loading import ADAPTER_NAME, load_causal_lm

log = logging.getLogger(__name__)


def lora_layers(model: Any) -> dict[str, Any]:
    """The peft LoRA layers of a ``PeftModel`` by original module name."""
    from peft.tuners.lora import LoraLayer

    base = model.base_model.model
    return {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}


def set_lora_weights(model: Any, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy ``(A, B)`` of each named module into the model's LoRA layers, in place.

    Args:
        model: a ``PeftModel`` loaded by :func:`~emloc_engine.weights.loading.load_causal_lm`.
        weights: module name -> ``(A`` r × in, ``B`` out × r), any dtype/device (cast on copy).

    Raises:
        ModelNotFound: a module carries no LoRA layer or a shape differs.
    """
    layers = lora_layers(model)
    with torch.no_grad():
        for name, (a, b) in weights.items():
            layer = layers.get(name)
            if layer is None:
                raise ModelNotFound(f"Module {name} carries no LoRA layer in the evaluation model.")
            pa, pb = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
            if pa.shape != a.shape or pb.shape != b.shape:
                raise ModelNotFound(f"LoRA shapes of {name} differ: {tuple(a.shape)}/{tuple(b.shape)} "
                                    f"vs {tuple(pa.shape)}/{tuple(pb.shape)}.")
            pa.copy_(a)
            pb.copy_(b)


def _batches(examples: Sequence[ExampleLike], batch_size: int, max_batches: int, pad_id: int
             ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded ``(input_ids, attention_mask, labels)`` batches (:func:`collate`) of the first examples."""
    chosen = list(examples)[: batch_size * max_batches]
    out = []
    for start in range(0, len(chosen), batch_size):
        batch = collate(chosen[start:start + batch_size], pad_id)
        out.append((batch["input_ids"], batch["attention_mask"], batch["labels"]))
    return out


def heldout_loss(model: Any, batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 device: torch.device) -> tuple[float, int]:
    """Token-weighted mean next-token cross-entropy and the number of scored tokens.

    ``loss = Σ_t CE(logits_t, label_{t+1}) / #{t : label_{t+1} ≠ -100}``, logits upcast to fp32.
    The head runs on label positions only, in chunks of 256 tokens (``training.lm_loss_sum``), so
    the full tokens × vocab logits never exist: the peak stays at the model's inference peak.
    """
    from emloc_engine.run.planning import EVAL_CHUNK_TOKENS
    from emloc_engine.stages.training.trainer import lm_loss_sum

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask, labels in batches:
            batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
            total += float(lm_loss_sum(causal_lm, batch, chunk_tokens=EVAL_CHUNK_TOKENS))
            count += int((labels[:, 1:] != -100).sum())
    return (total / count if count else float("nan")), count


def streamed_losses(model_dir: Path, candidates: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
                    scales: Mapping[str, float], examples: Sequence[ExampleLike], *, device: torch.device,
                    dtype: torch.dtype, batch_size: int = 4, max_batches: int = 16,
                    on_block: Any = None, hidden_on_gpu_bytes: int = HIDDEN_OFFLOAD) -> tuple[list[float], int]:
    """Held-out loss of the original plus each candidate adapter, all in ONE pass over the weights.

    The original is streamed block by block (:class:`~emloc_engine.weights.streamed.StreamedModel`);
    per block, every candidate carries its own hidden states through it, so the weights are read once
    for the whole λ grid. Each loss is :func:`heldout_loss`'s (same batches, same token weighting).

    Args:
        model_dir: the original model.
        candidates: per candidate, module name -> ``(A, B)``.
        scales: the LoRA scale ``s`` of each module.
        examples, batch_size, max_batches: the held-out batches, as :class:`AdapterEvaluator` takes them.
        device, dtype: where and in which dtype the blocks run.
        on_block: called with the block index after each block (progress, cancel).
        hidden_on_gpu_bytes: every candidate's hidden states stay on the GPU between blocks up to this many
            bytes; past it they wait in CPU RAM and one batch visits the GPU at a time.

    Returns:
        The loss of each candidate, and the number of scored tokens.

    Raises:
        ConfigError: no example has a token with a loss.
    """
    from emloc_engine.run.planning import EVAL_CHUNK_TOKENS
    from emloc_engine.stages.training.trainer import hidden_loss_sum
    from emloc_engine.weights.streamed import StreamedModel, Variant

    batches = _batches(examples, batch_size, max_batches, pad_id=0)
    n_tokens = sum(int((b[2][:, 1:] != -100).sum()) for b in batches)
    if n_tokens == 0:
        raise ConfigError("The held-out examples have no token with a loss, so λ cannot be chosen on them.",
                          hint="Use a dataset with assistant answers, or set λ by hand (--lambda 0|3|inf).")
    ids = [[row[: int(m.sum())].tolist() for row, m in zip(b[0], b[1], strict=True)] for b in batches]
    variants = [Variant(lora={n: (a, b, float(scales[n])) for n, (a, b) in c.items()}) for c in candidates]
    totals = [0.0] * len(variants)
    model = StreamedModel(model_dir, device=device, dtype=dtype)
    hidden_bytes = len(variants) * sum(b[0].numel() for b in batches) * int(model.config.hidden_size) * \
        torch.tensor([], dtype=dtype).element_size()

    def finish(v: int, c: int, hidden: torch.Tensor) -> None:
        totals[v] += float(hidden_loss_sum(model.skeleton, hidden, batches[c][2].to(device), chunk_tokens=EVAL_CHUNK_TOKENS))

    try:
        model.run(ids, variants, finish, offload=device.type == "cuda" and hidden_bytes > hidden_on_gpu_bytes, on_block=on_block)
    finally:
        model.close()
    return [t / n_tokens for t in totals], n_tokens


class AdapterEvaluator:
    """The original model with the trained adapter attached, evaluated for candidate LoRA weights.

    Args:
        model_dir: the original model.
        adapter_dir: the trained adapter (defines the LoRA layers; its weights are swapped out).
        examples: held-out tokenised examples; the first ``batch_size × max_batches`` are used.
        device: where to run.
        dtype: dtype of the base weights.
        batch_size: examples per forward pass.
        max_batches: at most this many batches per evaluation.

    Raises:
        ConfigError: no example has a token with a loss.
    """

    def __init__(self, model_dir: Path, adapter_dir: Path, examples: Sequence[ExampleLike], *,
                 device: torch.device, dtype: torch.dtype, batch_size: int = 4, max_batches: int = 16) -> None:
        self.device = device
        self.batches = _batches(examples, batch_size, max_batches, pad_id=0)
        self.n_examples = sum(int(b[0].shape[0]) for b in self.batches)
        self.n_tokens = sum(int((b[2][:, 1:] != -100).sum()) for b in self.batches)
        if self.n_tokens == 0:
            raise ConfigError("The held-out examples have no token with a loss, so λ cannot be chosen on them.",
                              hint="Use a dataset with assistant answers, or set λ by hand (--lambda 0|3|inf).")
        # the embedding table in RAM: original + adapter then stays under the model's inference peak
        self.model: Any = load_causal_lm(model_dir, device=device, dtype=dtype, adapter_dir=adapter_dir,
                                         input_embeddings_on_cpu=True)

    def loss(self, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Held-out loss after copying ``weights`` (module -> ``(A, B)``) into the LoRA layers."""
        set_lora_weights(self.model, weights)
        value, _ = heldout_loss(self.model, self.batches, self.device)
        return value

    def close(self) -> None:
        """Drop the model and give its GPU memory back."""
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> AdapterEvaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
