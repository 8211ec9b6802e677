"""Anchored training for image denoisers: every transformer block of the emulator anchored to the original.

For text (:mod:`emloc_engine.stages.training.anchoring`), each decoder block of the emulator gets the
constant offset ``original block output − emulator block output`` (both on the original's block input),
so with a zero adapter the anchored emulator IS the original on the training data and the adapter's
gradients are taken at the original's activations. Text offsets depend only on the example and are
computed once per example.

Why online: an image training example is a noisy latent at a random noise level with a FRESH noise
draw every step, so no offset can be computed ahead of time. :class:`OnlineBlockAnchors` computes them
for every forward of the emulator's denoiser: a forward pre-hook first runs the ORIGINAL denoiser on the
same inputs (no grad), capturing each anchored block's (args, kwargs, output); then runs every emulator
block with the adapter disabled on the original's block input; the differences (computed in fp64,
cast to the block output's dtype, on the training device) are added to the emulator blocks' outputs by
forward hooks during the training forward.

Cost per training forward (each micro-batch, class images included): one no-grad forward of the
original and one no-grad pass of the emulator's anchored blocks. Memory: the offsets of one micro-batch
(one tensor per anchored block output) and, on a GPU, the original streamed one block at a time
(:func:`~emloc_engine.images.placement.streamed`: it lives in CPU memory; its weights outside the blocks
stay on the device while the anchors are attached). The image planner counts both
(:mod:`.planning`, train stage).

Gradient checkpointing: diffusers checkpoints the anchored blocks themselves (FLUX/SD3 transformer
blocks, SDXL's BasicTransformerBlock), so the offset's addition is the last op of a checkpointed region
and its recompute in the backward saves nothing; the offsets stay those of the latest forward.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from emloc_engine.core.errors import ConfigError
from emloc_engine.images.placement import streamed

BLOCK = re.compile(r"(^|\.)(single_)?transformer_blocks\.\d+$")
"""The anchored blocks: FLUX's double- and single-stream blocks, SD3's joint blocks, the transformer blocks
inside SDXL's UNet attentions (every compressed linear lives in one of them)."""


def anchored_block_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s modules that get an anchor (:data:`BLOCK`), in module order."""
    return [n for n, _ in model.named_modules() if BLOCK.search(n)]


def _diff(target: Any, out: Any) -> Any:
    """``target − out`` per tensor of a block's output (a tensor or a tuple; ``None`` where not a tensor),
    computed in fp64 and cast to the output's dtype, on the output's device."""
    if isinstance(out, torch.Tensor):
        return (target.to(out.device, torch.float64) - out.double()).to(out.dtype)
    if isinstance(out, tuple):
        return tuple(_diff(t, o) if isinstance(o, torch.Tensor) else None for t, o in zip(target, out, strict=True))
    return None


def _add(out: Any, offset: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out + offset
    return tuple(o if c is None else o + c for o, c in zip(out, offset, strict=True))


class OnlineBlockAnchors:
    """Anchors every block of ``peft_model``'s denoiser to ``original`` on each forward (module docstring).

    ``original`` is put on ``device`` streamed (:func:`~.placement.streamed`; on the CPU it is simply
    resident; ``stream`` forces streaming on or off, for tests) until :meth:`close`, which also removes
    every hook. While :meth:`paused`, the emulator runs unanchored (no pass of the original).

    Raises:
        ConfigError: the emulator and the original do not have the same anchored blocks.
    """

    def __init__(
        self,
        original: nn.Module,
        peft_model: Any,
        device: torch.device | str = "cpu",
        *,
        stream: bool | None = None,
    ) -> None:
        self.original = original.eval().requires_grad_(False)
        self.peft_model = peft_model
        self.base = peft_model.get_base_model()
        self.names = anchored_block_names(self.base)
        originals = dict(self.original.named_modules())
        if not self.names or any(originals.get(n) is None for n in self.names):
            raise ConfigError(
                "The emulator and the original do not have the same transformer blocks: the emulator was built "
                "from another model.",
                hint="Build the emulator from this pipeline (a new run folder, or delete its emulator/).",
            )
        self.offsets: dict[str, Any] = {}
        self.computing = False
        self.enabled = True
        self.forwards = 0
        self._stack = contextlib.ExitStack()
        self._handles: list[Any] = []
        try:
            self._stack.enter_context(streamed(self.original, torch.device(device), enabled=stream))
            self._handles.append(self.base.register_forward_pre_hook(self._prepare, with_kwargs=True))
            self._handles += [self.base.get_submodule(n).register_forward_hook(self._adder(n)) for n in self.names]
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove every hook, drop the offsets and end the streaming (the original back in CPU memory)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.offsets = {}
        self._stack.close()

    def __enter__(self) -> OnlineBlockAnchors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Within the block the emulator's forwards are not anchored (and the original does not run)."""
        before, self.enabled = self.enabled, False
        self.offsets = {}  # freed while paused (the next anchored forward makes its own)
        try:
            yield
        finally:
            self.enabled = before

    @contextlib.contextmanager
    def _captured(self) -> Iterator[dict[str, tuple[tuple[Any, ...], dict[str, Any], Any]]]:
        seen: dict[str, tuple[tuple[Any, ...], dict[str, Any], Any]] = {}
        inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

        def pre(name: str) -> Any:
            def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                inputs[name] = (args, kwargs)

            return hook

        def post(name: str) -> Any:
            def hook(_m: nn.Module, _a: Any, out: Any) -> None:
                seen[name] = (*inputs.pop(name), out)

            return hook

        handles = []
        for n in self.names:
            block = self.original.get_submodule(n)
            handles.append(block.register_forward_pre_hook(pre(n), with_kwargs=True))
            handles.append(block.register_forward_hook(post(n)))
        try:
            yield seen
        finally:
            for h in handles:
                h.remove()

    def _prepare(self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.computing or not self.enabled:
            return
        self.computing = True
        self.offsets = {}  # the last forward's are freed before this one's are made
        try:
            with torch.no_grad(), self._captured() as seen:
                self.original(*args, **kwargs)
                with self.peft_model.disable_adapter():
                    offsets = {}
                    for n in list(seen):
                        a, kw, out = seen.pop(n)
                        offsets[n] = _diff(out, self.base.get_submodule(n)(*a, **kw))
                        del a, kw, out
            self.offsets = offsets
            self.forwards += 1
        finally:
            self.computing = False

    def _adder(self, name: str) -> Any:
        def hook(_m: nn.Module, _a: Any, out: Any) -> Any:
            if self.computing or not self.enabled or name not in self.offsets:
                return None
            return _add(out, self.offsets[name])

        return hook


__all__ = ["BLOCK", "OnlineBlockAnchors", "anchored_block_names"]
