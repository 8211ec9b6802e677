"""What the image planner reads from a pipeline folder without loading a weight.

* :func:`denoiser_shapes`: the denoiser built from its ``config.json`` on the meta device
  (accelerate's ``init_empty_weights``; no memory, no weights): every parameter's size, the
  compressed linears' shapes, and the parameters of each block the stages stream
  (:func:`~emloc_engine.images.placement.stream_units`).
* :func:`component_params`: parameters of the text encoders and the VAE, from their safetensors
  headers.
* :func:`activation_profile`: the activations a training step keeps for the backward pass, counted by
  running the denoiser's forward on the meta device at a resolution, batch 1, with
  ``torch.autograd.graph.saved_tensors_hooks`` recording every tensor autograd saves (each storage
  once; the weights are not activations). Attention is counted as the fused kernels a GPU runs
  (flash / memory-efficient SDPA keep q, k, v, the output and the log-sum-exp, never the L×L
  scores). LoRA's own saved tensors are added per adapted linear as peft keeps them: its input cast
  to the adapter's fp32, and the rank-r intermediate. Saved bytes are attributed to the gradient
  checkpointing units (:data:`CHECKPOINT_UNITS`: the transformer blocks of FLUX/SD3; the UNet's
  resnets and transformer blocks), so the planner can count a checkpointed step: every unit's
  inputs, plus one unit's activations recomputed during the backward. A second, no-grad forward
  on the meta device measures the most memory a forward without gradients holds at once (every
  tensor an op makes counted while it lives, each storage once): what calibration, the λ search and
  inference need (the UNet's skip connections included).

Every count is linear in the batch (the planner multiplies); it depends on the resolution through the
latent tokens, ``(res/16)²`` for FLUX and SD3 (2×2 patches of the /8 latent) and the UNet's feature
maps for SDXL, which the forward itself follows.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from emloc_engine.core.errors import ConfigError
from emloc_engine.images.pipelines import COMPRESSED, PipelineInfo, denoiser_class
from emloc_engine.images.placement import stream_units
from emloc_engine.weights.headers import read_safetensors_header

CHECKPOINT_UNITS = (
    "FluxTransformerBlock",
    "FluxSingleTransformerBlock",
    "JointTransformerBlock",
    "BasicTransformerBlock",
    "ResnetBlock2D",
)
"""Classes diffusers' ``enable_gradient_checkpointing`` recomputes as one piece."""


@dataclass(frozen=True)
class DenoiserShapes:
    """The denoiser's sizes (parameter counts; bytes follow from the dtype a stage uses).

    Attributes:
        params: every parameter and buffer element of the denoiser.
        compressed: ``(out_features, in_features)`` of each linear the emulator compresses / LoRA adapts.
        compressed_groups: in_features of each statistics group (a block's linears reading one input
            share one), per block: what a calibration pass holds.
        unit_params: parameters of each streamed block (the original runs one at a time).
        config: the denoiser's ``config.json``.
    """

    params: int
    compressed: dict[str, tuple[int, int]]
    unit_params: tuple[int, ...]
    config: dict[str, Any]
    unit_lora_dims: tuple[int, ...] = ()
    """``Σ (out + in)`` of the compressed linears inside each streamed block (its LoRA is ``r ×`` that)."""

    @property
    def outside_params(self) -> int:
        """Parameters outside the streamed blocks (always on the device while the original runs)."""
        return self.params - sum(self.unit_params)


def meta_denoiser(info: PipelineInfo) -> nn.Module:
    """The denoiser of ``info`` on the meta device (structure and shapes only, frozen)."""
    from accelerate import init_empty_weights

    config = json.loads((info.denoiser_dir / "config.json").read_text(encoding="utf-8"))
    with init_empty_weights(include_buffers=True):
        model: nn.Module = denoiser_class(info).from_config(config)
    model.requires_grad_(False)
    return model


def denoiser_shapes(info: PipelineInfo, model: nn.Module | None = None) -> DenoiserShapes:
    """Sizes of ``info``'s denoiser from its config (``model``: an already built meta denoiser)."""
    model = model if model is not None else meta_denoiser(info)
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    pattern = COMPRESSED[info.kind]
    compressed = {
        n: (m.out_features, m.in_features)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and pattern.search(n)
    }
    blocks = stream_units(model)
    units = tuple(sum(p.numel() for p in u.parameters()) for u in blocks)
    inside = [{id(m) for m in u.modules()} for u in blocks]
    lora_dims = tuple(
        sum(m.in_features + m.out_features for n, m in model.named_modules() if n in compressed and id(m) in ids)
        for ids in inside
    )
    config = json.loads((info.denoiser_dir / "config.json").read_text(encoding="utf-8"))
    return DenoiserShapes(params, compressed, units, config, lora_dims)


def component_params(info: PipelineInfo, name: str) -> int:
    """Parameter elements of component ``name`` (``text_encoder``, ``vae``...) from its safetensors headers."""
    folder = info.folder / name
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        for entry in read_safetensors_header(path).tensors.values():
            n = 1
            for d in entry["shape"]:
                n *= int(d)
            total += n
    return total


def component_config(info: PipelineInfo, name: str) -> dict[str, Any]:
    """A component's ``config.json`` (empty when absent)."""
    path = info.folder / name / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# ------------------------------------------------------------------------------------ activations
@dataclass(frozen=True)
class ActivationProfile:
    """Bytes a batch-1 training step saves for the backward at one resolution (see module docstring).

    Attributes:
        outside_bytes: saved outside every checkpointing unit (embedders, up/down samplers, output).
        unit_input_bytes: the inputs of every unit together (what a checkpointed forward keeps).
        max_unit_bytes: the most one unit saves (what its recompute holds during the backward).
        total_bytes: everything saved without checkpointing.
        max_unit_out_bytes: the largest tensor a unit hands on (the backward's gradient buffers).
        latent_tokens: the denoiser's image tokens (FLUX/SD3) or latent pixels (SDXL) at this resolution.
    """

    outside_bytes: int
    unit_input_bytes: int
    max_unit_bytes: int
    total_bytes: int
    max_unit_out_bytes: int
    latent_tokens: int
    forward_bytes: int = 0
    """The most a no-grad forward holds at once (inputs included): calibration, the λ search, inference."""
    step_bytes: int = 0
    """The most a batch-1 training step holds at once beyond the weights, the adapter and AdamW's moments:
    activations (with gradient checkpointing on a GPU), their gradients and the LoRA gradients, from a
    forward and backward on the meta device with peft's LoRA attached as training attaches it."""
    stat_groups: tuple[int, ...] = field(default=(), repr=False)
    """in_features of each calibration statistic, in the emulator's module order (linears of one block that
    read the same tensor share one, found by tensor identity in the forward as the emulator finds them)."""
    stat_group_of: tuple[tuple[str, int], ...] = field(default=(), repr=False)
    """(compressed module, index into ``stat_groups``) for every compressed linear."""
    anchor_out_numel: int = 0
    """Elements of every anchored block's output together (:data:`~emloc_engine.images.anchors.BLOCK`; tensor
    or tuple outputs), batch 1: anchored training holds one offset per element (:mod:`.anchors`)."""


class _FusedAttention(torch.autograd.Function):
    """Stands in for SDPA on meta tensors, saving what the fused GPU kernels save."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:  # meta tensors: the fused kernels' dq, dk, dv
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _FusedAttentionMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")][len(args) :])[:3]
            return _FusedAttention.apply(q, k, v)
        return func(*args, **kwargs)


class _LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by live tensors an op made (each storage once), on any device."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}
        self.now = 0
        self.peak = 0

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [storage.nbytes(), 1]
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        else:
            entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self.live[key]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


class _SavedCounter:
    """Saved-tensor bytes per checkpointing unit (each storage counted once)."""

    def __init__(self) -> None:
        self.unit = ""
        self.by_unit: dict[str, int] = {}
        self.inputs = 0
        self.max_out = 0
        self._seen: dict[Any, Any] = {}

    def add(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage, once."""
        self.add_bytes(t.untyped_storage()._cdata, t.numel() * t.element_size(), t)

    def add_bytes(self, key: Any, nbytes: int, keep: Any = None) -> None:
        """Count ``nbytes`` under ``key``, once (``keep`` stays referenced so its address is not reused)."""
        if key in self._seen:
            return
        self._seen[key] = keep
        self.by_unit[self.unit] = self.by_unit.get(self.unit, 0) + nbytes

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            self.add(t)
        return t

    def enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.unit = f"{type(module).__name__}@{id(module)}"
        for a in [*args, *kwargs.values()]:
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                self.inputs += a.numel() * a.element_size()

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        outs = output if isinstance(output, tuple) else (output,)
        size = sum(o.numel() * o.element_size() for o in outs if isinstance(o, torch.Tensor))
        self.max_out = max(self.max_out, size)
        self.unit = ""


@contextmanager
def _hooks(model: nn.Module, counter: _SavedCounter, kind: str, rank: int) -> Iterator[None]:
    handles: list[Any] = []
    pattern = COMPRESSED[kind]  # type: ignore[index]
    for name, m in model.named_modules():
        if type(m).__name__ in CHECKPOINT_UNITS:
            handles.append(m.register_forward_pre_hook(counter.enter, with_kwargs=True))
            handles.append(m.register_forward_hook(counter.leave))
        elif isinstance(m, nn.Linear) and pattern.search(name):

            def lora(mod: nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0]
                if x.dtype == torch.float32:
                    counter.add(x)  # peft keeps the input itself
                else:  # its fp32 copy for the fp32 adapter
                    counter.add_bytes((id(mod), "x"), x.numel() * 4)
                counter.add_bytes((id(mod), "a"), x.numel() // x.shape[-1] * rank * 4)  # lora_A's output

            handles.append(m.register_forward_pre_hook(lora))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def meta_inputs(
    info: PipelineInfo, shapes: DenoiserShapes, resolution: int, dtype: torch.dtype, max_sequence_length: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Batch-1 meta inputs of the denoiser at ``resolution``: (noisy latents, condition, latent tokens)."""
    vae = component_config(info, "vae")
    factor = 2 ** (len(vae.get("block_out_channels", (0, 0, 0, 0))) - 1)
    side = max(1, resolution // factor)
    cfg, meta = shapes.config, torch.device("meta")
    if info.kind == "flux":
        side -= side % 2
        channels, tokens = int(cfg["in_channels"]) // 4, (side // 2) ** 2
        text, width, pooled = (
            max_sequence_length,
            int(cfg["joint_attention_dim"]),
            int(cfg["pooled_projection_dim"]),
        )
    elif info.kind == "sd3":
        patch = int(cfg.get("patch_size", 2))
        side -= side % patch
        channels, tokens = int(cfg["in_channels"]), (side // patch) ** 2
        text, width, pooled = (
            77 + max_sequence_length,
            int(cfg["joint_attention_dim"]),
            int(cfg["pooled_projection_dim"]),
        )
    else:
        down = 2 ** (len(cfg["block_out_channels"]) - 1)
        side -= side % down
        channels, tokens, text = int(cfg["in_channels"]), side * side, 77
        width = int(cfg["cross_attention_dim"])
        pooled = int(cfg["projection_class_embeddings_input_dim"]) - 6 * int(cfg["addition_time_embed_dim"])
    x = torch.empty(1, channels, side, side, device=meta, dtype=dtype, requires_grad=True)
    cond = {
        "embeds": torch.empty(1, text, width, device=meta, dtype=dtype, requires_grad=True),
        "pooled": torch.empty(1, pooled, device=meta, dtype=dtype),
        "time_ids": torch.empty(1, 6, device=meta, dtype=dtype),
    }
    return x, cond, tokens


@dataclass(frozen=True)
class _MetaRun:
    """What each of :func:`activation_profile`'s meta-device forwards runs: the denoiser at one resolution."""

    info: PipelineInfo
    model: nn.Module
    shapes: DenoiserShapes
    resolution: int
    dtype: torch.dtype
    max_sequence_length: int

    def inputs(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """:func:`meta_inputs` of this run: the noisy latents, the conditioning and the latent tokens."""
        return meta_inputs(self.info, self.shapes, self.resolution, self.dtype, self.max_sequence_length)

    def timestep(self) -> torch.Tensor:
        return torch.empty(1, device="meta", dtype=self.dtype)


def activation_profile(
    info: PipelineInfo,
    model: nn.Module,
    shapes: DenoiserShapes,
    resolution: int,
    *,
    dtype: torch.dtype,
    rank: int,
    max_sequence_length: int,
) -> ActivationProfile:
    """Count a batch-1 training step's saved activations at ``resolution`` (``model``: a meta denoiser)."""
    from emloc_engine.images.families import predict

    nn.Module.to(model, dtype)  # diffusers' own .to() warns about fp32-kept modules (none on meta)
    run = _MetaRun(info, model, shapes, resolution, dtype, max_sequence_length)
    x, cond, tokens = run.inputs()
    counter = _SavedCounter()
    t = run.timestep()
    with (
        _hooks(model, counter, info.kind, rank),
        _FusedAttentionMode(),
        torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t),
    ):
        try:
            out = predict(info.kind, model, x, t, cond)
        except ValueError as exc:  # e.g. SD3's pos_embed_max_size: the model cannot take this size
            raise ConfigError(
                f"The {info.kind} denoiser cannot train at {resolution}×{resolution}: {exc}",
                hint="Choose a lower resolution.",
            ) from exc
    del out
    live = _LiveBytes()
    with torch.no_grad(), _FusedAttentionMode(), _anchor_outputs(model) as anchored, live:
        x, cond, _ = run.inputs()
        out = predict(info.kind, model, x.detach(), run.timestep(), cond)
        del out, x, cond
    groups, group_of = _stat_groups(run)
    step = _step_bytes(run, rank)
    units = {k: v for k, v in counter.by_unit.items() if k}
    outside = counter.by_unit.get("", 0)
    return ActivationProfile(
        outside_bytes=outside,
        unit_input_bytes=counter.inputs,
        max_unit_bytes=max(units.values(), default=0),
        total_bytes=outside + sum(units.values()),
        max_unit_out_bytes=counter.max_out,
        latent_tokens=tokens,
        forward_bytes=live.peak,
        step_bytes=step,
        stat_groups=groups,
        stat_group_of=group_of,
        anchor_out_numel=anchored[0],
    )


@contextmanager
def _anchor_outputs(model: nn.Module) -> Iterator[list[int]]:
    """Within the block, ``[n]``: the elements output by ``model``'s anchored blocks in the forwards run."""
    from emloc_engine.images.anchors import anchored_block_names

    total = [0]

    def count(_m: nn.Module, _a: Any, out: Any) -> None:
        outs = out if isinstance(out, tuple) else (out,)
        total[0] += sum(o.numel() for o in outs if isinstance(o, torch.Tensor))

    handles = [model.get_submodule(n).register_forward_hook(count) for n in anchored_block_names(model)]
    try:
        yield total
    finally:
        for h in handles:
            h.remove()


def _stat_groups(run: _MetaRun) -> tuple[tuple[int, ...], tuple[tuple[str, int], ...]]:
    """The emulator's statistic groups (:class:`~emloc_engine.images.emulator._SharedStats`' rule: within a
    block, linears whose input is the same tensor share one), from a no-grad meta forward."""
    from emloc_engine.images.families import predict
    from emloc_engine.images.pipelines import BLOCK_PATTERN

    model, shapes = run.model, run.shapes
    seen: dict[str, list[tuple[torch.Tensor, int]]] = {}
    groups: list[int] = []
    group_of: dict[str, int] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name in group_of:
                return
            m = BLOCK_PATTERN.match(name)
            block = seen.setdefault(m.group(1) if m else name, [])
            for tensor, g in block:
                if tensor is args[0]:
                    group_of[name] = g
                    return
            groups.append(int(args[0].shape[-1]))
            group_of[name] = len(groups) - 1
            block.append((args[0], group_of[name]))

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in shapes.compressed]
    try:
        with torch.no_grad(), _FusedAttentionMode():
            x, cond, _ = run.inputs()
            predict(run.info.kind, model, x.detach(), run.timestep(), cond)
    finally:
        for h in handles:
            h.remove()
    seen.clear()
    # the emulator's module order (named_modules), not the forward's (SDXL runs mid_block before up_blocks)
    order = {n: i for i, n in enumerate(shapes.compressed)}
    firsts: dict[int, int] = {}
    for n, g in group_of.items():
        firsts[g] = min(firsts.get(g, len(order)), order[n])
    renumber = {g: i for i, g in enumerate(sorted(firsts, key=firsts.__getitem__))}
    return (
        tuple(groups[g] for g in sorted(firsts, key=firsts.__getitem__)),
        tuple((n, renumber[group_of[n]]) for n in shapes.compressed if n in group_of),
    )


def _step_bytes(run: _MetaRun, rank: int) -> int:
    """The peak of live tensors of one batch-1 training step (:func:`~emloc_engine.images.training.train_image_lora`'s
    micro-step: forward, loss, backward) on the meta device, LoRA attached by peft (fp32 adapter), gradient
    checkpointing on a GPU (bf16) as the training enables it, none on the CPU. The weights, the adapter and
    AdamW's moments exist before the step and are not counted; the LoRA gradients it makes are. The adapter
    goes on a deep copy of ``model`` (the meta denoiser; copying it costs no memory).
    """
    import copy

    from accelerate import init_empty_weights

    from emloc_engine.images.families import predict
    from emloc_engine.images.training import attach_image_lora

    net = copy.deepcopy(run.model)
    with init_empty_weights(include_buffers=True):
        peft_model = attach_image_lora(net, sorted(run.shapes.compressed), rank, float(rank), "")
    base = peft_model.get_base_model()
    if run.dtype != torch.float32:  # the training's rule: checkpointing on GPUs (bf16), not on the CPU (fp32)
        # the recompute runs inside the backward, outside any mode entered around it: give it its own
        base.enable_gradient_checkpointing(_checkpoint_fused)
    base.train()
    live = _LiveBytes()
    with _FusedAttentionMode(), live:
        x, cond, _ = run.inputs()
        out = predict(run.info.kind, base, x.detach(), run.timestep(), cond)
        loss = (out.float() - x.detach().float()).pow(2).mean()  # families.denoising_loss's MSE in fp32
        del out
        loss.backward()
        del loss, x, cond
    return live.peak


def _checkpoint_fused(module: Any, *args: Any) -> Any:
    """diffusers' checkpointing (non-reentrant), its recompute with the fused attention too."""
    from torch.utils.checkpoint import checkpoint

    modes = lambda: (_FusedAttentionMode(), _FusedAttentionMode())  # noqa: E731
    return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=modes)


def vae_encode_bytes(info: PipelineInfo, resolution: int) -> int:
    """The most the cache's fp32 VAE encode of one ``resolution``² image holds at once beyond the VAE's weights
    (the image included), from a no-grad encode on the meta device (:func:`~emloc_engine.images.cache._encode`).

    SDXL/FLUX's encoder at 1024²: five 128-channel feature maps at full resolution, 512 MiB each: the
    encoder keeps ``conv_in``'s output while its first block runs, the second resnet keeps its input, and
    its residual ``(input + hidden) / scale`` holds the hidden state, the sum and the quotient.
    """
    import diffusers
    from accelerate import init_empty_weights

    config = component_config(info, "vae")
    cls = getattr(diffusers, info.components.get("vae", ("", "AutoencoderKL"))[1], diffusers.AutoencoderKL)
    with init_empty_weights(include_buffers=True):
        vae = cls.from_config(config)
    nn.Module.to(vae, torch.float32)
    vae.eval()
    live = _LiveBytes()
    with torch.no_grad(), _FusedAttentionMode(), live:
        pixels = torch.empty(1, int(config.get("in_channels", 3)), resolution, resolution, device="meta")
        dist = vae.encode(pixels).latent_dist
        mean, std = dist.mean, dist.std
        del dist, mean, std, pixels
    return live.peak


__all__ = [
    "CHECKPOINT_UNITS",
    "ActivationProfile",
    "DenoiserShapes",
    "activation_profile",
    "component_config",
    "component_params",
    "denoiser_shapes",
    "meta_denoiser",
    "meta_inputs",
    "vae_encode_bytes",
]
