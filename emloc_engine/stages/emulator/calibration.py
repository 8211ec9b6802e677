"""Calibration activations, one decoder block at a time (the GPTQ "catcher" technique).

1. :func:`chunk_samples` groups the calibration samples (sorted longest first) into chunks of at
   most ``chunk_tokens`` padded tokens.
2. :func:`capture_block_inputs` runs the model skeleton (parameters on the meta device, only the
   input embedding materialised) with every decoder layer replaced by a recorder: each recorder
   saves the keyword arguments its layer would get (attention mask, ``position_embeddings``,
   ``position_ids``; sliding-window models give layers different ones) and passes the hidden
   states through unchanged; the last one stops the forward before the final norm and ``lm_head``.
3. :func:`run_block` pushes every chunk through one materialised block, in place, while
   :class:`StatisticsRecorder` accumulates ``C = Σ XᵀX`` at the first module of each input group.

Padding: a chunk is right-padded and run without a padding mask. Under causal attention a real
token only attends to earlier positions, which are all real, so its activations are exactly those
of the unpadded sample; padded positions are excluded from every statistic by ``token_mask``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from emloc_engine.core.architectures import ArchSpec
from emloc_engine.core.errors import UnsupportedModel

# TF32 statistics GEMMs for half-precision activations (see StatisticsRecorder._accumulate);
# EMLOC_STATS_TF32=0 turns them off (plain fp32 GEMMs) where a GPU library computes them wrongly.
_TF32_STATS = os.environ.get("EMLOC_STATS_TF32", "1") != "0"


@dataclass
class CalibrationChunk:
    """Hidden states of a group of samples between two blocks.

    Attributes:
        hidden: (B, T, hidden) in the compute dtype; on the compute device or, offloaded, on the CPU.
        token_mask: (B, T) bool on the compute device, True for real tokens; None when nothing is padded.
        layer_args: per decoder layer, the keyword arguments the model passes to it.
        n_tokens: real tokens in the chunk.
    """

    hidden: torch.Tensor
    token_mask: torch.Tensor | None
    layer_args: list[dict[str, Any]]
    n_tokens: int


def chunk_samples(lengths: Sequence[int], chunk_tokens: int) -> list[list[int]]:
    """Group sample indices, longest first, so that ``B · max_len ≤ chunk_tokens`` (≥ 1 sample each).

    The grouping depends only on the lengths and ``chunk_tokens``, so a resumed build makes exactly
    the same chunks (and hence bit-identical sums) as the interrupted one.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    chunks: list[list[int]] = []
    for i in order:
        if chunks and lengths[chunks[-1][0]] * (len(chunks[-1]) + 1) <= chunk_tokens:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


class _StopForward(Exception):  # control flow, not an error
    pass


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index``: records its kwargs, returns the input unchanged."""

    def __init__(self, index: int, sink: list[dict[str, Any]], last: bool) -> None:
        super().__init__()
        self.index, self.sink, self.last = index, sink, last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise UnsupportedModel("The decoder layers take positional arguments besides the hidden states; "
                                   "this transformers version is not supported by the emulator builder.")
        kwargs.pop("past_key_values", None)
        kwargs["use_cache"] = False
        self.sink[self.index] = kwargs
        if self.last:
            raise _StopForward(hidden_states)
        return hidden_states


def _move_buffers(module: nn.Module, device: torch.device) -> None:
    for sub in module.modules():
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.device.type != "meta":
                sub._buffers[name] = buf.to(device)


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The ``ModuleList`` of decoder blocks of a causal LM (``spec.block_prefix``)."""
    layers = model.get_submodule(spec.block_prefix)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModel(f"{spec.block_prefix} of a {spec.family} model is not a list of decoder blocks.")
    return layers


def capture_block_inputs(model: Any, spec: ArchSpec, embed_weight: torch.Tensor,
                         samples: Sequence[Sequence[int]], chunks: Sequence[Sequence[int]], *,
                         device: torch.device, dtype: torch.dtype, pad_id: int,
                         offload: bool) -> list[CalibrationChunk]:
    """The input of decoder block 0 for every chunk, and every layer's keyword arguments.

    Args:
        model: the causal LM skeleton (parameters on meta, buffers real) in ``dtype``.
        spec: its architecture spec (where the blocks are).
        embed_weight: the input embedding matrix (already on ``device``, in ``dtype``).
        samples: token ids of every calibration sample.
        chunks: sample indices per chunk (:func:`chunk_samples`).
        device: compute device.
        dtype: compute dtype of the hidden states.
        pad_id: token used to right-pad a chunk (its positions are masked out of the statistics).
        offload: keep the hidden states on the CPU between blocks (pinned when on CUDA).

    Returns:
        One :class:`CalibrationChunk` per chunk.

    Raises:
        UnsupportedModel: the model's forward needs a weight other than the embedding before block 0.
    """
    base = getattr(model, model.base_model_prefix)
    layers = decoder_layers(model, spec)
    originals = list(layers)
    embed = model.get_input_embeddings()
    embed.load_state_dict({"weight": embed_weight}, assign=True, strict=False)
    _move_buffers(base, device)
    out: list[CalibrationChunk] = []
    try:
        for idx in chunks:
            sink: list[dict[str, Any]] = [{} for _ in originals]
            for i in range(len(originals)):
                layers[i] = _Recorder(i, sink, last=i == len(originals) - 1)
            t_max = max(len(samples[i]) for i in idx)
            ids = torch.full((len(idx), t_max), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), t_max), dtype=torch.bool)
            for row, i in enumerate(idx):
                ids[row, : len(samples[i])] = torch.tensor(list(samples[i]), dtype=torch.long)
                mask[row, : len(samples[i])] = True
            try:
                base(input_ids=ids.to(device), use_cache=False)
                raise UnsupportedModel("The decoder's forward never reached its last block.")
            except _StopForward as stop:
                hidden = stop.args[0]
            except NotImplementedError as exc:  # a meta tensor was used before block 0
                raise UnsupportedModel(f"The {spec.family} forward uses weights other than the embedding "
                                       f"before its first block: {exc}") from exc
            if offload and hidden.device.type != "cpu":
                hidden = hidden.to("cpu").pin_memory() if hidden.device.type == "cuda" else hidden.to("cpu")
            n_tokens = int(mask.sum())
            out.append(CalibrationChunk(hidden, None if bool(mask.all()) else mask.to(device), sink, n_tokens))
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        embed.to("meta")
    return out


class StatisticsRecorder:
    """Accumulates ``C = Σ XᵀX`` over real tokens at the input of chosen modules of one block.

    Statistics are kept in ``stats_dtype`` (fp32 or fp64); activations are upcast to it before
    the product, so every bf16 value enters exactly.
    """

    def __init__(self, block: nn.Module, modules: dict[str, str], stats_dtype: torch.dtype) -> None:
        """Args: block: the decoder block; modules: statistic name -> module path inside the block."""
        self.stats: dict[str, torch.Tensor] = {}
        self.token_mask: torch.Tensor | None = None
        self._dtype = stats_dtype
        self._handles = [block.get_submodule(path).register_forward_pre_hook(self._hook(name))
                         for name, path in modules.items()]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            x2 = x.reshape(-1, x.shape[-1])
            if self.token_mask is not None:
                x2 = x2[self.token_mask.reshape(-1)]
            self._accumulate(name, x2)

        return hook

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        # Upcast, then multiply in the statistics dtype. (A bf16 product with an fp32 result,
        # torch.mm(..., out_dtype=fp32), gave a non-PSD C on an H200 with torch 2.11: measured
        # 2026-11-29, see benchmarks/RESULTS.md. The upcast costs one fp32 copy of the chunk.)
        xd = x.to(self._dtype)
        if xd.is_cuda and self._dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16) and _TF32_STATS:
            # bf16/fp16 values are exact in TF32 (≥ their mantissa bits), every product of two is
            # exact in fp32 and accumulation stays fp32: TF32 tensor cores give the fp32 result
            # at several times the speed. Only for half-precision activations; fp32 ones keep fp32.
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                prod = xd.T @ xd
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev
        else:
            prod = xd.T @ xd
        if name in self.stats:
            self.stats[name].add_(prod)
        else:
            self.stats[name] = prod

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def run_block(block: nn.Module, index: int, chunks: list[CalibrationChunk], device: torch.device,
              recorder: StatisticsRecorder | None = None, keep_output: bool = True) -> None:
    """Push every chunk through one decoder block, replacing each chunk's hidden states in place.

    Args:
        block: the materialised decoder block ``index`` on ``device``.
        index: its position (selects the recorded keyword arguments).
        chunks: the calibration chunks (updated in place).
        device: compute device.
        recorder: accumulates statistics while the block runs, if given.
        keep_output: False for the last block, whose output nobody reads.
    """
    with torch.inference_mode():
        for chunk in chunks:
            if recorder is not None:
                recorder.token_mask = chunk.token_mask
            h = chunk.hidden
            offloaded = h.device != device
            out = block(h.to(device, non_blocking=True), **chunk.layer_args[index])
            if isinstance(out, tuple):  # transformers < 5 decoder layers return a tuple
                out = out[0]
            if keep_output:
                chunk.hidden = out.to("cpu") if offloaded else out
            del out


@contextlib.contextmanager
def recording(block: nn.Module, modules: dict[str, str], stats_dtype: torch.dtype) -> Iterator[StatisticsRecorder]:
    """A :class:`StatisticsRecorder` whose hooks are removed on exit."""
    rec = StatisticsRecorder(block, modules, stats_dtype)
    try:
        yield rec
    finally:
        rec.close()
