"""The original model run block by block from its shards: it never has to fit the device.

:class:`StreamedModel` keeps on the device only the input embedding, the final norm, the head and
the decoder block being run; every other block stays in the safetensors shards until its turn. A
reader thread prefetches block ``b + 1`` (disk → pinned CPU memory → device, ``non_blocking`` on a
side CUDA stream) while block ``b`` computes, so the transfer overlaps the compute: a pass costs
about one read of the weights over PCIe. The skeleton, the capture of block 0's inputs and every
layer's keyword arguments are Stage 1's (:mod:`emloc_engine.stages.emulator.calibration`).

One pass serves many uses at once (:meth:`StreamedModel.run`): each :class:`Variant` (the plain
original, the original with an adapter, with an adapter merged and rounded…) carries its own hidden
states through every block, so the weights are read once for all of them. This is how the λ search
scores every λ, and the export verification every comparison, in one pass over the weights.

Batches are right-padded and run without a padding mask: under causal attention a real token only
sees earlier real tokens, so its values equal those of the unpadded example (as in Stage 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emloc_engine.core.architectures import ArchSpec, arch_spec
from emloc_engine.core.errors import ModelNotFound
from emloc_engine.weights.checkpoint import Checkpoint

LoraWeights = Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]
"""Full module name → ``(A`` r × in, ``B`` out × r, scale ``s)``; the module computes ``W x + s·B(A x)``."""


@dataclass(frozen=True)
class Variant:
    """One version of the original carried through a pass.

    Attributes:
        lora: adapters applied unmerged, as peft does: ``y = W x + s·B(A x)`` with the LoRA product
            in ``promote(dtype, fp32)`` and the sum cast back to the output's dtype.
        merge: add ``s·B·A`` (in the LoRA dtype, cast to the weight dtype) into the weights instead,
            as peft's ``merge_adapter`` does.
        round_weight: applied to every block weight that ``round_filter`` accepts (after a merge),
            e.g. rounding to the dtype a merged file stores.
        round_filter: which weights ``(full name, tensor)`` are rounded; default: the LoRA modules'.
        round_outside: round the matrices outside the blocks too (embeddings, head).
    """

    lora: LoraWeights | None = None
    merge: bool = False
    round_weight: Callable[[torch.Tensor], torch.Tensor] | None = None
    round_filter: Callable[[str, torch.Tensor], bool] | None = None
    round_outside: bool = False


@dataclass
class _Chunk:
    """Right-padded examples between two blocks: one hidden tensor per variant."""

    hidden: list[torch.Tensor]
    token_mask: torch.Tensor | None
    layer_args: list[dict[str, Any]]
    lengths: list[int]


@dataclass
class PinnedBlocks:
    """Decoder blocks kept in CPU memory (pinned on CUDA machines) across passes, in their stored dtype.

    The first pass over a model fills it; later passes copy from it straight to the device, the
    PCIe transfer floor, instead of reading the shards again. It holds the whole model's blocks:
    use it only where that fits the RAM (:func:`cache_fits`).
    """

    blocks: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for blk in self.blocks.values() for t in blk.values())


def cache_fits(model_dir: Path, fraction: float = 0.25) -> bool:
    """Whether a model's weights take at most ``fraction`` of the available RAM (for :class:`PinnedBlocks`)."""
    import psutil

    weights = sum(i.nbytes for i in Checkpoint(Path(model_dir)).infos())
    return weights <= fraction * psutil.virtual_memory().available


def _pinned(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t)


class StreamedModel:
    """A causal LM whose decoder blocks are read from the shards one at a time.

    Args:
        model_dir: a model folder (config + safetensors), or any folder with a config when ``tensors`` is given.
        device: where blocks run.
        dtype: compute dtype of the weights and the hidden states.
        tensors: the weights by checkpoint name, instead of reading the shards (e.g. a GGUF file
            dequantised by transformers on the CPU).
        with_head: also load the final norm and the head (not needed for block outputs alone).
        config: the model's ``PretrainedConfig`` when ``model_dir`` has none (a GGUF file's folder).
        embed_weight: the input embedding when the caller already holds it on the device (the
            emulator's, which is the original's: never compressed), so it is not loaded twice.
        cache: keeps every block read in (pinned) CPU memory for the next passes, which then read
            no disk: what repeated passes over the same original (anchor chunks) use.

    Raises:
        ModelNotFound: the folder has no config or shards.
        UnsupportedModel: the architecture is not one the engine knows.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        device: torch.device,
        dtype: torch.dtype,
        tensors: Mapping[str, torch.Tensor] | None = None,
        with_head: bool = True,
        config: Any = None,
        embed_weight: torch.Tensor | None = None,
        cache: PinnedBlocks | None = None,
    ) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir, self.device, self.dtype = Path(model_dir), device, dtype
        self.cache = cache
        try:
            self.config: Any = config or AutoConfig.from_pretrained(self.model_dir, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise ModelNotFound(f"Cannot read the config of {self.model_dir}: {exc}") from exc
        self.spec: ArchSpec = arch_spec(self.config)
        self._tensors = tensors
        self._ckpt = Checkpoint(self.model_dir) if tensors is None else None
        with init_empty_weights(include_buffers=False):
            self.skeleton: Any = AutoModelForCausalLM.from_config(
                self.config, dtype=dtype, trust_remote_code=False
            )
        self.skeleton.eval()
        self.num_blocks = len(self.skeleton.get_submodule(self.spec.block_prefix))
        head = self.skeleton.get_output_embeddings().weight
        self._tied = head is self.skeleton.get_input_embeddings().weight or bool(
            getattr(self.config.get_text_config(), "tie_word_embeddings", False)
        )
        self._outside: dict[str, torch.Tensor] = {}
        embed = self.skeleton.get_input_embeddings().weight
        for name, p in self.skeleton.named_parameters():
            if name.startswith(self.spec.block_prefix + ".") or (self._tied and p is head):
                continue
            if not with_head and p is not embed:
                continue
            if p is embed and embed_weight is not None:
                self._outside[name] = embed_weight.to(device=device, dtype=dtype)
                continue
            self._outside[name] = self._get(name).to(device=device, dtype=dtype)
        self._set_outside(self._outside)
        self.lora_dtype = torch.promote_types(dtype, torch.float32)
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    # -- weights ---------------------------------------------------------------------------------
    def _get(self, name: str) -> torch.Tensor:
        if self._tensors is not None:
            if name not in self._tensors:
                raise ModelNotFound(f"Tensor {name!r} is missing from the weights of {self.model_dir}.")
            return self._tensors[name]
        assert self._ckpt is not None
        return self._ckpt.get(name)

    def _set_outside(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            parent, _, leaf = name.rpartition(".")
            self.skeleton.get_submodule(parent)._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        if self._tied:
            self.skeleton.get_output_embeddings().weight = self.skeleton.get_input_embeddings().weight

    def _block_prefix(self, b: int) -> str:
        return f"{self.spec.block_prefix}.{b}."

    def _read_block(self, b: int) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
        """Block ``b``'s tensors on the device (cast to the compute dtype); runs on the reader thread."""
        prefix = self._block_prefix(b)
        cached = self.cache.blocks.get(b) if self.cache is not None else None
        if cached is not None:
            host = cached
        elif self._tensors is not None:
            host = {n[len(prefix) :]: t for n, t in self._tensors.items() if n.startswith(prefix)}
        else:
            ckpt = Checkpoint(self.model_dir)  # one per read: its memory maps pin no more than a block
            try:
                host = ckpt.read_prefix(prefix)
            finally:
                ckpt.close()
        if self.copy_stream is None:
            if self.cache is not None and cached is None:
                self.cache.blocks[b] = {k: v.clone() for k, v in host.items()}
            return {k: v.to(device=self.device, dtype=self.dtype) for k, v in host.items()}, None
        if cached is None:
            host = {k: _pinned(v) for k, v in host.items()}
            if self.cache is not None:
                self.cache.blocks[b] = host
        with torch.cuda.stream(self.copy_stream):
            dev = {k: v.to(self.device, non_blocking=True).to(self.dtype) for k, v in host.items()}
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return dev, event

    def layers(self) -> Iterator[tuple[int, nn.Module, dict[str, torch.Tensor]]]:
        """``(b, block, its tensors)`` for every block in order, one materialised at a time.

        Block ``b + 1`` is read (and copied to the device) while the caller computes with block ``b``;
        block ``b`` goes back to the meta device when the caller asks for the next one.
        """
        blocks = self.skeleton.get_submodule(self.spec.block_prefix)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="emloc-stream") as reader:
            pending: Future[tuple[dict[str, torch.Tensor], Any]] = reader.submit(self._read_block, 0)
            for b in range(self.num_blocks):
                tensors, event = pending.result()
                if b + 1 < self.num_blocks:
                    pending = reader.submit(self._read_block, b + 1)
                if event is not None:
                    main = torch.cuda.current_stream(self.device)
                    main.wait_event(event)
                    for t in tensors.values():  # made on the copy stream, used and freed on this one
                        t.record_stream(main)
                layer = blocks[b]
                layer.load_state_dict(tensors, assign=True, strict=True)
                layer.to(self.device)  # buffers (rotary tables of some families)
                try:
                    yield b, layer, tensors
                finally:
                    layer.to("meta")
                    del tensors

    def close(self) -> None:
        """Give the device memory back."""
        self._outside = {}
        self.skeleton = None
        if self._ckpt is not None:
            self._ckpt.close()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- inputs ----------------------------------------------------------------------------------
    def embed(
        self, batches: Sequence[Sequence[Sequence[int]]], n_variants: int = 1, offload: bool = False
    ) -> list[_Chunk]:
        """The input of block 0 (and every layer's keyword arguments) for each batch of token-id lists."""
        from emloc_engine.stages.emulator.calibration import capture_block_inputs

        samples = [list(s) for batch in batches for s in batch]
        groups, at = [], 0
        for batch in batches:
            groups.append(list(range(at, at + len(batch))))
            at += len(batch)
        pad = self.config.pad_token_id if isinstance(getattr(self.config, "pad_token_id", None), int) else 0
        embed_name = next(
            n for n, p in self.skeleton.named_parameters() if p is self.skeleton.get_input_embeddings().weight
        )
        try:
            captured = capture_block_inputs(
                self.skeleton,
                self.spec,
                self._outside[embed_name],
                samples,
                groups,
                device=self.device,
                dtype=self.dtype,
                pad_id=pad,
                offload=offload,
            )
        finally:
            self._set_outside({embed_name: self._outside[embed_name]})  # the capture leaves it on meta
        return [
            _Chunk([c.hidden] * n_variants, c.token_mask, c.layer_args, [len(samples[i]) for i in g])
            for c, g in zip(captured, groups, strict=True)
        ]

    # -- the pass --------------------------------------------------------------------------------
    def run(
        self,
        batches: Sequence[Sequence[Sequence[int]]],
        variants: Sequence[Variant],
        finish: Callable[[int, int, torch.Tensor], None],
        *,
        offload: bool = False,
        on_block: Callable[[int], None] | None = None,
    ) -> None:
        """One pass over the weights for every batch and every variant.

        Args:
            batches: batches of token-id lists (right-padded inside a batch).
            variants: the versions of the model to run.
            finish: called with ``(variant, batch, normed hidden)`` after the final norm: the caller
                turns it into logits or a loss (:meth:`logits`, :func:`head_loss_sum`).
            offload: keep the hidden states on the CPU between blocks.
            on_block: called after each block (progress, cancel).
        """
        chunks = self.embed(batches, len(variants), offload)
        with torch.inference_mode():
            for b, layer, tensors in self.layers():
                for v, variant in enumerate(variants):
                    with self._variant(layer, b, tensors, variant):
                        for chunk in chunks:
                            h = chunk.hidden[v]
                            out = layer(h.to(self.device, non_blocking=True), **chunk.layer_args[b])
                            out = out[0] if isinstance(out, tuple) else out
                            chunk.hidden[v] = out.to("cpu") if h.device != out.device else out
                if on_block is not None:
                    on_block(b)
            norm = self.final_norm()
            for v, variant in enumerate(variants):
                with self._outside_variant(variant):
                    for c, chunk in enumerate(chunks):
                        finish(v, c, norm(chunk.hidden[v].to(self.device)))
                        chunk.hidden[v] = chunk.hidden[v][:0]

    def final_norm(self) -> nn.Module:
        base = getattr(self.skeleton, self.skeleton.base_model_prefix)
        norm: nn.Module = base.norm
        return norm

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from normed hidden states, as the model's forward makes them (scaling, soft-capping)."""
        logits: torch.Tensor = self.skeleton.get_output_embeddings()(hidden)
        scaling = getattr(self.config, "logits_scaling", None)
        softcap = getattr(self.config, "final_logit_softcapping", None)
        if scaling:
            logits = logits / scaling
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    @contextlib.contextmanager
    def _variant(
        self, layer: nn.Module, b: int, tensors: dict[str, torch.Tensor], variant: Variant
    ) -> Iterator[None]:
        prefix = self._block_prefix(b)
        lora = {n[len(prefix) :]: w for n, w in (variant.lora or {}).items() if n.startswith(prefix)}
        handles: list[Any] = []
        changed: dict[str, torch.Tensor] = {}
        if variant.merge or variant.round_weight is not None:
            for path, (a, bb, s) in lora.items() if variant.merge else ():
                w = tensors[f"{path}.weight"]
                delta = (bb.to(self.device, self.lora_dtype) @ a.to(self.device, self.lora_dtype)) * s
                changed[f"{path}.weight"] = w + delta.to(w.dtype)
            if variant.round_weight is not None:
                keep = variant.round_filter or (lambda name, t: name[len(prefix) : -len(".weight")] in lora)
                for key, t in tensors.items():
                    if t.dim() >= 2 and keep(prefix + key, t):
                        changed[key] = variant.round_weight(changed.get(key, t))
            layer.load_state_dict({**tensors, **changed}, assign=True, strict=True)
        elif lora:
            for path, (a, bb, s) in lora.items():
                handles.append(
                    layer.get_submodule(path).register_forward_hook(
                        self._lora_hook(
                            a.to(self.device, self.lora_dtype), bb.to(self.device, self.lora_dtype), s
                        )
                    )
                )
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            if changed:
                layer.load_state_dict(tensors, assign=True, strict=True)

    @staticmethod
    def _lora_hook(a: torch.Tensor, b: torch.Tensor, scale: float) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            return (out.to(a.dtype) + (x.to(a.dtype) @ a.T @ b.T) * scale).to(out.dtype)

        return hook

    @contextlib.contextmanager
    def _outside_variant(self, variant: Variant) -> Iterator[None]:
        if not (variant.round_outside and variant.round_weight is not None):
            yield
            return
        rounded = {n: variant.round_weight(t) if t.dim() >= 2 else t for n, t in self._outside.items()}
        self._set_outside(rounded)
        try:
            yield
        finally:
            self._set_outside(self._outside)


def adapter_weights(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """An adapter's ``(A, B, scale)`` per full module name (:class:`Variant`'s ``lora``)."""
    from emloc_engine.weights.adapters import read_adapter

    adapter = read_adapter(Path(adapter_dir))
    return {name: (adapter.A(name), adapter.B(name), float(m.scale)) for name, m in adapter.modules.items()}


__all__ = ["LoraWeights", "PinnedBlocks", "StreamedModel", "Variant", "adapter_weights", "cache_fits"]
