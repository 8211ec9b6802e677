"""Anchors at any dataset size: offsets computed a chunk of examples at a time, then dropped.

The offsets ``c_l(i) = h_l(i) − block_l^E(h_{l−1}(i))`` (:mod:`emloc_engine.stages.training.anchoring`)
depend only on the frozen original, the frozen emulator and the example, so they need not all
exist at once. :class:`AnchorFeed` keeps the offsets of one *chunk*: the examples of the next
micro-batches of the training order (or of the next eval batches), as many as fit ``cap_bytes``.
When a step needs an example that is not there, the examples no longer ahead are dropped and the
next chunk is computed. A run whose visited examples all fit the cap computes them once; a larger
one computes a chunk per stretch of steps (an example seen again in a later epoch is computed
again). The RAM the offsets take stays under the cap whatever the dataset size or the epochs.

A chunk is computed with the ORIGINAL streamed block by block from its shards
(:class:`~emloc_engine.weights.streamed.StreamedModel`: one block on the device) and the emulator
the trainer already holds (its adapter disabled, in eval mode): per block ``l``, both blocks read
the original's ``h_{l−1}`` and the difference of their outputs is the offset, so one pass over the
original's weights serves the whole chunk and the emulator never loads twice. With several
processes each rank computes the offsets of its own examples, under ``cap / processes``.

The first chunk reads the shards; when the original's weights take at most a quarter of the
available RAM its blocks stay in (pinned) RAM (:class:`~emloc_engine.weights.streamed.PinnedBlocks`)
and later chunks copy them straight to the device, so a long run's extra passes cost PCIe time,
not disk reads. That RAM is the original's size, on top of the offsets' cap.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emloc_engine.core.errors import ConfigError
from emloc_engine.core.memory import ANCHOR_GROUP_TOKENS, HIDDEN_OFFLOAD
from emloc_engine.machine.process_memory import release_pinned_host_cache
from emloc_engine.stages.training.anchoring import (
    Anchors,
    anchor_points,
    anchor_width,
    decoder_layers,
    length_groups,
    size_text,
)
from emloc_engine.weights.streamed import PinnedBlocks, StreamedModel, cache_fits


def _out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _diff(target: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``target − h`` in fp32 or wider, returned in ``h``'s dtype on ``h``'s device."""
    wide = torch.promote_types(h.dtype, torch.float32)
    return (target.to(wide) - h.to(wide)).to(h.dtype)


class _OffsetWriter:
    """Each example's flat, point-major offset buffer (:class:`~emloc_engine.stages.training.anchoring.Anchors`),
    allocated once at its final size; every block's difference is copied from the device straight
    into its place, one contiguous copy per example and point, with no CPU pass afterwards."""

    def __init__(self, examples: Sequence[Any], groups: Sequence[Sequence[int]], total: int, dtype: torch.dtype):
        self.groups, self.total = groups, total
        self.lengths = {i: len(examples[i].input_ids) for g in groups for i in g}
        self.flat = {i: torch.empty(n * total, dtype=dtype) for i, n in self.lengths.items()}
        self.at = [0] * len(groups)  # per group: offset columns written so far
        self.widths: list[list[int]] = [[] for _ in groups]

    def write(self, g: int, diff: torch.Tensor, column: int | None = None) -> None:
        """One anchor point's offsets of group ``g`` (``diff``: ``(G, T, w)``, rows in group order) at
        offset ``column`` of the per-token width (default: after the points written so far, which it
        then counts as written; :meth:`advance` does that for points written at explicit columns)."""
        w, at = int(diff.shape[-1]), self.at[g] if column is None else column
        if at + w > self.total:
            raise ConfigError(f"The anchor points are wider than the {self.total} offset values per token planned.")
        for row, i in enumerate(self.groups[g]):
            n = self.lengths[i]
            self.flat[i][n * at:n * (at + w)].view(n, w).copy_(diff[row, :n])
        if column is None:
            self.advance(g, [w])

    def advance(self, g: int, widths: Sequence[int]) -> None:
        """Count points of these widths as written for group ``g``."""
        self.at[g] += sum(widths)
        self.widths[g] += list(widths)

    def finish(self) -> tuple[tuple[int, ...], dict[int, torch.Tensor]]:
        """The points' widths and the buffers; every group must have filled its width exactly."""
        widths = {tuple(w) for w in self.widths}
        if any(at != self.total for at in self.at) or len(widths) > 1:
            raise ConfigError(f"The anchor points' widths {sorted(widths)} do not add up to the "
                              f"{self.total} offset values per token planned.")
        return (widths.pop() if widths else ()), self.flat


def _width(module: nn.Module) -> int:
    out = getattr(module, "out_features", None)
    return int(out) if out is not None else int(module.weight.shape[0])  # type: ignore[index]


def _linear_offsets(
    layer: nn.Module, emu: nn.Module, modules: Sequence[str], x: torch.Tensor, kwargs: dict[str, Any],
    sink: Callable[[int, torch.Tensor], None],
) -> torch.Tensor:
    """The original block's output; per linear module (``modules[k]``) ``sink(k, original − emulator)``
    as the emulator's forward reaches it (so one module's difference is on the device at a time), the
    emulator's linears each replaced by the original's output (as the anchored forward sees them)."""
    outs: dict[str, torch.Tensor] = {}

    def record(name: str) -> Any:
        def hook(_m: nn.Module, _a: Any, out: Any) -> None:
            outs[name] = _out(out)

        return hook

    def replace(k: int, name: str) -> Any:
        def hook(_m: nn.Module, _a: Any, out: Any) -> Any:
            sink(k, _diff(outs[name], _out(out)))
            return outs.pop(name).to(_out(out).dtype)

        return hook

    handles = [layer.get_submodule(m).register_forward_hook(record(m)) for m in modules]
    try:
        y = _out(layer(x, **kwargs))
    finally:
        for h in handles:
            h.remove()
    handles = [emu.get_submodule(m).register_forward_hook(replace(k, m)) for k, m in enumerate(modules)]
    try:
        emu(x, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return y


@torch.no_grad()
def streamed_offsets(
    model_dir: Path,
    emulator_lm: Any,
    examples: Sequence[Any],
    indices: Sequence[int],
    *,
    where: str,
    device: torch.device,
    dtype: torch.dtype,
    max_tokens: int = ANCHOR_GROUP_TOKENS,
    cache: PinnedBlocks | None = None,
    hidden_on_gpu_bytes: int = HIDDEN_OFFLOAD,
) -> Anchors:
    """Offsets of ``examples[indices]`` with the original streamed from ``model_dir``, one pass.

    Equal to :func:`~emloc_engine.stages.training.anchoring.anchors_for_training` (the resident
    computation) up to the order of floating-point sums.

    Args:
        model_dir: the original model.
        emulator_lm: the emulator as a causal LM on ``device`` (no adapter active, eval mode).
        examples: tokenised examples; only ``indices`` are computed.
        where: ``blocks``, ``output`` or ``linears``.
        device: where the blocks run.
        dtype: compute dtype (that of the emulator's weights).
        max_tokens: padded tokens per group of examples run together.
        cache: the original's blocks kept in RAM between chunks (:class:`~emloc_engine.weights.streamed.PinnedBlocks`).
        hidden_on_gpu_bytes: the chunk's hidden states stay on the GPU between blocks up to this many bytes.
    """
    points = anchor_points(emulator_lm, where)
    groups = length_groups(examples, indices, max_tokens)
    # The emulator's input embedding is the original's (never compressed): not loaded twice.
    embed = emulator_lm.get_input_embeddings().weight.detach()
    original = StreamedModel(
        model_dir, device=device, dtype=dtype, with_head=False, embed_weight=embed, cache=cache
    )
    emu_layers = decoder_layers(emulator_lm)
    writer = _OffsetWriter(examples, groups, anchor_width(emulator_lm.config, where), dtype)
    try:
        variants = 2 if where == "output" else 1
        hidden_bytes = variants * sum(len(examples[i].input_ids) for g in groups for i in g) * embed.shape[-1]
        # Between blocks the chunk's hidden states stay on the device (1/L of its offsets) unless they
        # pass the threshold (1 GiB, or what the plan gave); then they wait in (pinned) CPU memory, one
        # group on the device at a time.
        offload = device.type == "cuda" and hidden_bytes * embed.element_size() > hidden_on_gpu_bytes
        chunks = original.embed([[examples[i].input_ids for i in g] for g in groups], variants, offload)
        last = original.num_blocks - 1
        for b, layer, _ in original.layers():
            mine = [p for p in points if p == f"model.layers.{b}" or p.startswith(f"model.layers.{b}.")]
            modules = [p[len(f"model.layers.{b}.") :] for p in mine]
            for g, chunk in enumerate(chunks):
                x, kw = chunk.hidden[0].to(device, non_blocking=True), chunk.layer_args[b]
                if where == "output":
                    chunk.hidden[1] = chunk.hidden[1].to(device, non_blocking=True)
                if where == "linears":
                    block_widths = [_width(layer.get_submodule(m)) for m in modules]
                    columns = [writer.at[g] + sum(block_widths[:k]) for k in range(len(modules))]

                    def sink(k: int, d: torch.Tensor, g: int = g, columns: list[int] = columns) -> None:
                        writer.write(g, d, columns[k])

                    y = _linear_offsets(layer, emu_layers[b], modules, x, kw, sink)
                    writer.advance(g, block_widths)
                else:
                    y = _out(layer(x, **kw))
                    if where == "blocks":
                        writer.write(g, _diff(y, _out(emu_layers[b](x, **kw))))
                    else:  # "output": the emulator runs on its own hidden states up to the last block
                        e = _out(emu_layers[b](chunk.hidden[1], **kw))
                        if b == last:
                            writer.write(g, _diff(y, e))
                        chunk.hidden[1] = e.cpu() if offload else e
                chunk.hidden[0] = y.cpu() if offload else y
    finally:
        original.close()
    widths, offsets = writer.finish()
    return Anchors(points, widths, offsets, where)


class AnchorFeed:
    """Computes a chunk of offsets whenever a step needs examples the store lacks (see the module docstring).

    Args:
        model_dir: the original model (streamed).
        examples: every example the run may ask for, training then eval ones (``Anchors.eval_base``).
        where: anchor placement.
        device, dtype: where and in which dtype the emulator runs.
        cap_bytes: most bytes of offsets held at once.
        width: offset values per token (:func:`~emloc_engine.stages.training.anchoring.anchor_width`).
    """

    def __init__(
        self,
        model_dir: Path,
        examples: Sequence[Any],
        *,
        where: str,
        device: torch.device,
        dtype: torch.dtype,
        cap_bytes: int,
        width: int,
        sticky: Sequence[int] = (),
        processes: int = 1,
        hidden_on_gpu_bytes: int = HIDDEN_OFFLOAD,
        group_tokens: int = ANCHOR_GROUP_TOKENS,
    ) -> None:
        self.model_dir, self.examples, self.where = Path(model_dir), examples, where
        self.device, self.dtype, self.cap_bytes = device, dtype, int(cap_bytes)
        self._per_token = width * torch.tensor([], dtype=dtype).element_size()
        self.processes = processes
        self.hidden_on_gpu_bytes = hidden_on_gpu_bytes
        self.group_tokens = group_tokens
        # The eval examples are computed with the first chunk and kept (every evaluation reads
        # them) when they take at most half the cap; otherwise they come and go like the rest.
        sticky = list(dict.fromkeys(int(i) for i in sticky))
        self.sticky = sticky if sum(self.example_bytes(i) for i in sticky) <= self.cap_bytes // 2 else []
        # A run that computes several chunks reads the original once from disk: its blocks stay in
        # (pinned) RAM when they take at most a quarter of it; later chunks copy them from there.
        self.cache: PinnedBlocks | None = None
        self._cache_checked = False
        self.seconds = 0.0
        self.chunks = 0
        self.computed = 0
        self.peak_bytes = 0

    def _block_cache(self) -> PinnedBlocks | None:
        if not self._cache_checked:
            self._cache_checked = True
            self.cache = PinnedBlocks() if cache_fits(self.model_dir, 0.25 / self.processes) else None
        return self.cache

    def close(self) -> None:
        """Training is over: drop the original's blocks held in (pinned) RAM and give that memory back
        (:func:`~emloc_engine.machine.process_memory.release_pinned_host_cache`), so the later stages of the
        run do not carry the whole model in RAM. The feed's counters stay for the run's record."""
        had = self.cache is not None and bool(self.cache.blocks)
        self.cache = None
        if had:
            release_pinned_host_cache()

    def example_bytes(self, i: int) -> int:
        return len(self.examples[i].input_ids) * self._per_token

    def plan_chunk(self, needed: Sequence[int], upcoming: Iterable[Sequence[int]]) -> list[int]:
        """``needed``, the sticky (eval) examples, then the next examples of ``upcoming`` in order,
        while they fit the cap.

        Raises:
            ConfigError: the examples one step needs do not fit the cap by themselves.
        """
        chunk = list(dict.fromkeys(int(i) for i in needed))
        total = sum(self.example_bytes(i) for i in chunk)
        extra = [i for i in self.sticky if i not in set(chunk)]
        if total + sum(self.example_bytes(i) for i in extra) <= self.cap_bytes:
            chunk += extra
            total += sum(self.example_bytes(i) for i in extra)
        if total > self.cap_bytes:
            raise ConfigError(
                f"The offsets of one training step take {size_text(total)}, more than the "
                f"{size_text(self.cap_bytes)} anchors may hold.",
                hint="Raise --anchor-ram-gib, or lower --batch-size, --grad-accum or --max-length.",
            )
        seen = set(chunk)
        for batch in upcoming:
            for i in batch:
                if i in seen:
                    continue
                size = self.example_bytes(i)
                if total + size > self.cap_bytes:
                    return chunk
                chunk.append(i)
                seen.add(i)
                total += size
        return chunk

    def ensure(
        self, anchors: Anchors, needed: Sequence[int], upcoming: Iterable[Sequence[int]], model: Any
    ) -> None:
        """Make ``anchors`` hold the offsets of ``needed`` (computing the next chunk if not).

        Args:
            anchors: the store the trainer's hooks read.
            needed: examples of the coming step (or eval batch).
            upcoming: the examples of the steps after it, in order (a lazy iterable).
            model: the emulator as the trainer holds it (a ``PeftModel``: its adapter is disabled here).
        """
        if all(int(i) in anchors.offsets for i in needed):
            return
        t0 = time.perf_counter()
        chunk = self.plan_chunk(needed, upcoming)
        keep = set(chunk)
        missing = [i for i in chunk if i not in anchors.offsets]
        if anchors.nbytes() + sum(self.example_bytes(i) for i in missing) > self.cap_bytes:
            for i in [i for i in anchors.offsets if i not in keep]:
                del anchors.offsets[i]
        was_training = bool(getattr(model, "training", False))
        disable = getattr(model, "disable_adapter", None)
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        anchors.clear()
        model.eval()
        try:
            with disable() if disable is not None else contextlib.nullcontext():
                new = streamed_offsets(
                    self.model_dir,
                    lm,
                    self.examples,
                    missing,
                    where=self.where,
                    device=self.device,
                    dtype=self.dtype,
                    cache=self._block_cache(),
                    hidden_on_gpu_bytes=self.hidden_on_gpu_bytes,
                    max_tokens=self.group_tokens,
                )
        finally:
            model.train(was_training)
        if new.points != anchors.points:
            raise ConfigError("The emulator and the original have different blocks.")
        anchors.widths = new.widths
        anchors.offsets.update(new.offsets)
        self.peak_bytes = max(self.peak_bytes, anchors.nbytes())
        self.chunks += 1
        self.computed += len(missing)
        self.seconds += time.perf_counter() - t0


__all__ = ["AnchorFeed", "streamed_offsets"]
