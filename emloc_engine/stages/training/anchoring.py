"""Anchored training: the emulator, on the training examples, reproduces the original's hidden states.

Why: LoRA trained on a plain emulator spends much of its capacity repairing the emulator (on a
135M model at ρ ≤ 0.8 the emulator *with* its trained LoRA stays worse than the original without
any), and that repair does not transfer to the original (see benchmarks/RESULTS.md, Quality).

What: for every training example ``i`` and decoder block ``l`` we store the block's *local* error
on the original's own input,

    c_l(i) = h_l(i) − block_l^E(h_{l−1}(i)),        h = the ORIGINAL model's hidden states,

and during training add ``c_l`` to block ``l``'s output (a forward hook). With a zero adapter the
anchored emulator then reproduces the original's hidden states exactly at every block on these
examples, so the training loss starts at the original's loss, and the gradient reaching each
adapter is computed at the original's activations. What the adapter learns is the task, not a
repair of the emulator. ``where="output"`` anchors only the last block (the logits match, the
inner activations do not); ``where="linears"`` anchors every linear layer's output, so even the
inputs of o_proj and down_proj (computed from compressed layers inside a block) are the original's.

Cost: one inference pass of the original and then one of the emulator (never both models on the
device: :func:`anchors_for_training`) over the examples the run will visit
(:func:`emloc_engine.stages.training.batches.visited_examples`), and ``L × tokens × hidden`` offsets in the compute dtype (CPU memory:
:func:`anchor_bytes`; one micro-batch at a time on the device, the size of the checkpointed
activations). The offsets are held a chunk of examples at a time, under ``TrainConfig.anchor_ram_gib``
(:mod:`emloc_engine.stages.training.anchor_chunks`): a run whose visited examples fit the cap
computes them all once, before training (:func:`anchors_for_training`); a larger one, or one whose
original is streamed, computes each chunk when training reaches it. ``anchor = "auto"`` anchors
whenever one step's offsets fit the cap (:func:`resolve_mode`), on any number of GPUs.

Measured (benchmarks/RESULTS.md, Quality, SmolLM2-135M on Shakespeare, one seed, λ auto): the
share of the full-LoRA gain that reaches the original rose from 32% / 53% / 72% to 73% / 83% / 89%
at ρ = 0.4 / 0.6 / 0.8; anchoring only the last block ("output") gave 55% at ρ = 0.6 (no gain);
every linear ("linears") 80% at ρ = 0.5 against 77% for blocks, at 9× the offsets.

Anchors are a training-time device only: the adapter file, the correction and the merge are
unchanged. The trainer's eval loss uses offsets of its eval examples too, so it tracks the anchored
emulator (≈ the original with the adapter), not the bare emulator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emloc_engine.core.errors import ConfigError

WHERE = ("blocks", "output", "linears")


def decoder_layers(causal_lm: Any) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM (``model.layers`` for every supported family)."""
    base = getattr(causal_lm, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ConfigError(f"{type(causal_lm).__name__} has no model.layers: anchored training needs decoder blocks.")
    return layers


def anchor_points(causal_lm: Any, where: str) -> tuple[str, ...]:
    """Module paths whose outputs get offsets: every block, the last block, or every block linear.

    ``linears`` anchors each linear layer of each block (q/k/v/o, gate/up/down, or Phi-3's fused
    ones): with a zero adapter *every* activation, not only the residual stream between blocks, is
    the original's, so every adapter reads the original's input.
    """
    return points_for_config(causal_lm.config, where, len(decoder_layers(causal_lm)))


def points_for_config(config: Any, where: str, blocks: int | None = None) -> tuple[str, ...]:
    """:func:`anchor_points` from a model config alone (``blocks``: the decoder's block count)."""
    if where not in WHERE:
        raise ConfigError(f"Anchor placement must be one of {', '.join(WHERE)} (got {where!r}).")
    text = getattr(config, "text_config", None) or config
    n = int(blocks if blocks is not None else text.num_hidden_layers)
    if where == "blocks":
        return tuple(f"model.layers.{i}" for i in range(n))
    if where == "output":
        return (f"model.layers.{n - 1}",)
    from emloc_engine.core.architectures import arch_spec

    spec = arch_spec(config)
    return tuple(f"model.layers.{i}.{m}" for i in range(n) for m in spec.linear_modules)


def anchor_width(config: Any, where: str) -> int:
    """Offset values per token for a placement (``Σ`` output widths of the anchored modules)."""
    from emloc_engine.catalog.model_facts import facts_from_config

    text = getattr(config, "text_config", None) or config
    layers, hidden = int(text.num_hidden_layers), int(text.hidden_size)
    if where == "blocks":
        return layers * hidden
    if where == "output":
        return hidden
    facts = facts_from_config(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    return layers * sum(m.out_features for m in facts.modules)


def _out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _replace(out: Any, new: torch.Tensor) -> Any:
    return (new, *out[1:]) if isinstance(out, tuple) else new


@dataclass
class Anchors:
    """Per-example offsets (CPU, compute dtype): ``offsets[i]`` is one flat buffer of ``T_i · Σ widths``
    values in which anchor point ``points[k]``'s ``(T_i, widths[k])`` block is contiguous, at
    ``T_i · starts[k]`` (:func:`point_view`; :meth:`dense` gives the ``(T_i, Σ widths)`` matrix).

    Point-major, not token-major: a block's output for one example is one contiguous GPU → CPU copy
    straight into its place, and one CPU → GPU copy into the micro-batch, with no CPU pass to
    interleave the points (on the H100 run of 2026-12-06 that pass and the padded batch built on
    the CPU were about half of the anchors' cost at 8B shapes)."""

    points: tuple[str, ...]
    widths: tuple[int, ...]
    offsets: dict[int, torch.Tensor] = field(default_factory=dict)
    where: str = "blocks"
    eval_base: int | None = None  # eval example j has key eval_base + j (emloc_engine.stages.training.trainer.prepare_anchors)
    feed: Any = None  # an AnchorFeed (anchor_chunks) that computes chunks on demand; None: every offset is here
    _current: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def starts(self) -> tuple[int, ...]:
        out, at = [], 0
        for w in self.widths:
            out.append(at)
            at += w
        return tuple(out)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.offsets.values())

    def select(self, indices: Sequence[int], width: int, device: torch.device | None = None) -> None:
        """Make the next forward add the offsets of these examples (right-padded to ``width``)."""
        missing = [i for i in indices if i not in self.offsets]
        if missing:
            raise ConfigError(f"No anchors for training examples {missing[:5]}.",
                              hint="Compute anchors for every example the run visits (visited_examples).")
        first = self.offsets[indices[0]]
        where = device if device is not None else first.device
        # one zero-padded (B, width, w) batch per point, filled in place: each example's block is one copy
        batches = [torch.zeros((len(indices), width, w), dtype=first.dtype, device=where) for w in self.widths]
        for row, i in enumerate(indices):
            for k, batch in enumerate(batches):
                view = self.point(i, k)
                batch[row, :view.shape[0]].copy_(view)
        self._current = dict(zip(self.points, batches, strict=True))

    def point(self, i: int, k: int) -> torch.Tensor:
        """Example ``i``'s offsets at ``points[k]``: a ``(T_i, widths[k])`` view of its buffer."""
        return point_view(self.offsets[i], self.widths, k)

    def dense(self, i: int) -> torch.Tensor:
        """Example ``i``'s offsets as one ``(T_i, Σ widths)`` matrix (a copy; for checks and tools)."""
        return torch.cat([self.point(i, k) for k in range(len(self.widths))], dim=-1)

    def ensure(self, needed: Sequence[int], upcoming: Iterable[Sequence[int]], model: Any) -> None:
        """Have the offsets of ``needed`` at hand: with a ``feed``, computes the next chunk
        (:class:`~emloc_engine.stages.training.anchor_chunks.AnchorFeed`); without one, a no-op."""
        if self.feed is not None:
            self.feed.ensure(self, needed, upcoming, model)

    def clear(self) -> None:
        self._current = {}

    @contextlib.contextmanager
    def attached(self, causal_lm: Any) -> Iterator[Anchors]:
        """Forward hooks that add the selected offsets to the anchored modules' outputs."""
        handles = []

        def hook_for(point: str) -> Any:
            def hook(_m: torch.nn.Module, _args: Any, out: Any) -> Any:
                c = self._current.get(point)
                if c is None:
                    return None
                h = _out(out)
                if c.shape != h.shape:
                    raise ConfigError(f"Anchor of {point} has shape {tuple(c.shape)}, the batch "
                                      f"{tuple(h.shape)}: select() the micro-batch before the forward.")
                return _replace(out, h + c.to(h.dtype))
            return hook

        try:
            for point in self.points:
                handles.append(causal_lm.get_submodule(point).register_forward_hook(hook_for(point)))
            yield self
        finally:
            for h in handles:
                h.remove()
            self.clear()


MODES = ("auto", "blocks", "linears", "none")


def anchor_bytes(examples: Sequence[Any], indices: Sequence[int], width: int, bytes_per: int = 2) -> int:
    """CPU memory of the offsets of ``examples[indices]``: ``Σ T_i · width · bytes`` (:func:`anchor_width`)."""
    return width * bytes_per * sum(len(examples[i].input_ids) for i in indices)


def point_view(flat: torch.Tensor, widths: Sequence[int], k: int) -> torch.Tensor:
    """Point ``k``'s ``(T, widths[k])`` block of one example's flat offsets (layout of :class:`Anchors`)."""
    total = sum(widths)
    n = flat.numel() // total
    if n * total != flat.numel():
        raise ValueError(f"{flat.numel()} offset values are not a multiple of the {total} per token.")
    start = n * sum(widths[:k])
    return flat[start:start + n * widths[k]].view(n, widths[k])


def size_text(nbytes: float) -> str:
    """``"4.00 GiB"``, or MiB below a hundredth of a GiB (small runs would all read ``0.00 GiB``)."""
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 / 100 else f"{nbytes / 2**20:.2f} MiB"


def resolve_mode(mode: str, step_bytes: Mapping[str, int], cap_bytes: int, *, can_anchor: bool,
                 why_not: str = "", total_bytes: Mapping[str, int] | None = None) -> tuple[str, str]:
    """``(linears|blocks|none, note)`` for a requested mode.

    Offsets are held a chunk at a time under ``cap_bytes`` (``--anchor-ram-gib``,
    :mod:`emloc_engine.stages.training.anchor_chunks`), so the dataset size no longer matters: only
    one optimizer step's offsets (``step_bytes`` per placement) must fit the cap. ``auto`` anchors at
    every block whenever they do. It never picks ``linears``: measured 3 points better at the same ρ
    on SmolLM2-135M, but its micro-batch offsets on the GPU are 5–9× the block ones (2.8 GB per 1024
    tokens of an 8B model, where blocks need 0.27 GB), which would cost more ρ than it gains. An
    explicit placement that cannot be honoured raises ConfigError. ``total_bytes`` (the offsets of
    every visited example) only goes into the note.
    """
    if mode not in MODES:
        raise ConfigError(f"Anchoring must be one of {', '.join(MODES)} (got {mode!r}).")
    if mode == "none":
        return "none", "anchoring off"
    if not can_anchor:
        if mode != "auto":
            raise ConfigError(f"Anchored training is not possible here: {why_not}.", hint="Use --anchor none.")
        return "none", f"anchoring off: {why_not}"
    label = {"linears": "every linear layer", "blocks": "every block"}
    chosen = "blocks" if mode == "auto" else mode
    if step_bytes[chosen] > cap_bytes:
        if mode == "auto":
            return "none", (f"anchoring off: one step's offsets take {size_text(step_bytes[chosen])}, "
                            f"more than the {size_text(cap_bytes)} anchors may hold")
        raise ConfigError(f"Anchored training needs {size_text(step_bytes[chosen])} of RAM for the offsets "
                          f"of one step; anchors may hold {size_text(cap_bytes)}.",
                          hint="Raise --anchor-ram-gib, use a smaller --batch-size or --max-length, "
                               "--anchor blocks (about a fifth of it) or --anchor none.")
    total = (total_bytes or {}).get(chosen)
    if total is None:
        return chosen, f"anchored at {label[chosen]}"
    if total <= cap_bytes:
        return chosen, f"anchored at {label[chosen]} ({size_text(total)} of offsets)"
    return chosen, (f"anchored at {label[chosen]} ({size_text(total)} of offsets, computed in chunks "
                    f"of at most {size_text(cap_bytes)})")


def length_groups(examples: Sequence[Any], indices: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices sorted by length, cut into groups of at most ``max_tokens`` padded tokens (≥ 1 each)."""
    order = sorted((int(i) for i in indices), key=lambda i: -len(examples[i].input_ids))
    groups: list[list[int]] = []
    for i in order:
        if groups and len(examples[groups[-1][0]].input_ids) * (len(groups[-1]) + 1) <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _batch(examples: Sequence[Any], group: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(examples[i].input_ids) for i in group)
    ids = torch.zeros((len(group), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, i in enumerate(group):
        n = len(examples[i].input_ids)
        ids[row, :n] = torch.tensor(list(examples[i].input_ids))
        mask[row, :n] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def anchors_for_training(model_dir: Path, emulator_dir: Path, examples: Sequence[Any], indices: Sequence[int], *,
                         where: str = "blocks", device: torch.device, dtype: torch.dtype,
                         max_tokens: int | None = None) -> Anchors:
    """Anchors of ``examples[indices]``, with never more than one model on the device.

    Phase 1 runs the ORIGINAL model (inference on right-padded groups of ≤ ``max_tokens`` tokens:
    causal attention never lets a real token see the padding) and keeps the outputs of the
    anchor points on the CPU; phase 2 runs the emulator alone on the same groups, replacing each
    point's output by the original's (so every later point sees the original's input) and keeping
    the difference as its offset. By default a group's recorded outputs take at most 256 MiB on the
    device (4096 tokens at most, one example at least): for blocks, less than the KV cache plus
    logits that inference of one example of the same length needs.
    """
    from transformers import AutoConfig

    from emloc_engine.weights.loading import load_causal_lm
    from emloc_engine.weights.lowrank import load_emulator

    if where not in WHERE:
        raise ConfigError(f"Anchor placement must be one of {', '.join(WHERE)} (got {where!r}).")
    if max_tokens is None:
        per_token = anchor_width(AutoConfig.from_pretrained(model_dir, trust_remote_code=False), where) * \
            torch.tensor([], dtype=dtype).element_size()
        max_tokens = min(4096, (256 * 2**20) // per_token)
    groups = length_groups(examples, indices, max_tokens)
    original: Any = load_causal_lm(model_dir, device=device, dtype=dtype)  # a GGUF view too
    points = anchor_points(original, where)
    outs: dict[str, torch.Tensor] = {}

    def record(point: str) -> Any:
        def hook(_m: torch.nn.Module, _args: Any, out: Any) -> None:
            outs[point] = _out(out).cpu()
        return hook

    handles = [original.get_submodule(p).register_forward_hook(record(p)) for p in points]
    targets: list[dict[str, torch.Tensor]] = []  # per group, per point: (B, T, width) on the CPU
    try:
        for group in groups:
            outs.clear()
            ids, mask = _batch(examples, group, device)
            original.model(input_ids=ids, attention_mask=mask, use_cache=False)
            targets.append(dict(outs))
    finally:
        for h in handles:
            h.remove()
        outs.clear()
        del original
        if device.type == "cuda":
            torch.cuda.empty_cache()

    emulator = load_emulator(emulator_dir, dtype=dtype, device=device).eval()
    if anchor_points(emulator, where) != points:
        raise ConfigError("The emulator and the original have different blocks.")
    current: dict[str, torch.Tensor] = {}
    offsets: dict[str, torch.Tensor] = {}

    def anchor(point: str) -> Any:
        def hook(_m: torch.nn.Module, _args: Any, out: Any) -> Any:
            h, target = _out(out), current[point].to(device)
            wide = torch.promote_types(h.dtype, torch.float32)
            offsets[point] = (target.to(wide) - h.to(wide)).to(h.dtype).cpu()
            return _replace(out, target.to(h.dtype))
        return hook

    handles = [emulator.get_submodule(p).register_forward_hook(anchor(p)) for p in points]
    result: dict[int, torch.Tensor] = {}
    widths: tuple[int, ...] = ()
    try:
        for g, group in enumerate(groups):
            current = targets[g]
            targets[g] = {}  # free the CPU copy as we go
            offsets.clear()
            ids, mask = _batch(examples, group, device)
            emulator.model(input_ids=ids, attention_mask=mask, use_cache=False)
            widths = tuple(offsets[p].shape[-1] for p in points)
            for row, i in enumerate(group):
                n = len(examples[i].input_ids)
                result[i] = torch.cat([offsets[p][row, :n].reshape(-1) for p in points])  # point-major (Anchors)
    finally:
        for h in handles:
            h.remove()
        del emulator
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return Anchors(points, widths, result, where)
