"""Anchored training for image denoisers, a benchmark prototype (issue 23; not in the engine yet).

For text, anchoring every block lifted the share of full LoRA's gain that reaches the original from 42 %
to 77 % at ρ 0.5 (benchmarks/RESULTS.md): each block of the emulator gets the constant offset that makes
it reproduce the original's output there, so with a zero adapter the anchored emulator IS the original
on the training data, and the adapter's gradients are taken at the original's activations. Text offsets
depend only on the example and are computed once per example. An image training example is a noisy
latent at a random noise level with a fresh noise draw every step, so here they are computed ONLINE,
for every forward of the emulator: the original denoiser runs on the same inputs first (no grad), its
transformer blocks' inputs and outputs are captured, and every emulator block (adapter disabled) is run
on the original's input; the difference is added to that block's output in the training forward.

Cost: one forward of the original and one of the emulator's blocks per step, without grad. On a GPU the
original would be streamed block by block as the text anchors do; this prototype keeps it resident
(the tiny CPU pipelines of ``bench_images_quality.py``) to measure whether anchoring helps at all.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

BLOCK = re.compile(r"(^|\.)(single_)?transformer_blocks\.\d+$")
"""The anchored blocks: FLUX's double- and single-stream blocks, SD3's joint blocks, the transformer blocks
inside SDXL's UNet attentions (every compressed linear lives in one of them)."""


def _diff(target: Any, out: Any) -> Any:
    """``target − out`` per tensor of a block's output (a tensor or a tuple; ``None`` where not a tensor)."""
    if isinstance(out, torch.Tensor):
        return (target.double() - out.double()).to(out.dtype)
    if isinstance(out, tuple):
        return tuple(_diff(t, o) if isinstance(o, torch.Tensor) else None for t, o in zip(target, out, strict=True))
    return None


def _add(out: Any, offset: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out + offset
    return tuple(o if c is None else o + c for o, c in zip(out, offset, strict=True))


class OnlineBlockAnchors:
    """Anchors every block of ``peft_model``'s denoiser to ``original`` on each forward (module docstring)."""

    def __init__(self, original: nn.Module, peft_model: Any) -> None:
        self.original = original.eval().requires_grad_(False)
        self.peft_model = peft_model
        self.base = peft_model.get_base_model()
        self.names = [n for n, _ in self.base.named_modules() if BLOCK.search(n)]
        if not self.names or not all(dict(self.original.named_modules()).get(n) is not None for n in self.names):
            raise ValueError("The emulator and the original do not have the same transformer blocks.")
        self.offsets: dict[str, Any] = {}
        self.computing = False
        self.forwards = 0
        self._handles = [self.base.register_forward_pre_hook(self._prepare, with_kwargs=True)]
        self._handles += [self.base.get_submodule(n).register_forward_hook(self._adder(n)) for n in self.names]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

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
        if self.computing:
            return
        self.computing = True
        try:
            with torch.no_grad(), self._captured() as seen:
                self.original(*args, **kwargs)
                with self.peft_model.disable_adapter():
                    self.offsets = {
                        n: _diff(out, self.base.get_submodule(n)(*a, **kw)) for n, (a, kw, out) in seen.items()
                    }
            self.forwards += 1
        finally:
            self.computing = False

    def _adder(self, name: str) -> Any:
        def hook(_m: nn.Module, _a: Any, out: Any) -> Any:
            if self.computing or name not in self.offsets:
                return None
            return _add(out, self.offsets[name])

        return hook


__all__ = ["BLOCK", "OnlineBlockAnchors"]
