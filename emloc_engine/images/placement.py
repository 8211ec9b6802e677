"""Run a denoiser that lives in CPU memory on a GPU one block at a time.

``streamed(model, device)`` moves everything outside the blocks (embedders, final norm and
projection: a few percent of the weights) to ``device`` and gives every block a forward pre-hook
that moves it there and a forward hook that moves it back, so the GPU holds one block's weights
(plus what the forward keeps alive) however big the model is. Blocks: the entries of
``transformer_blocks`` / ``single_transformer_blocks`` (FLUX, SD3) or the UNet's down blocks, mid
block and up blocks (SDXL). On the CPU, or with ``enabled=False``, the whole model is simply moved
to ``device``.

Used wherever the ORIGINAL denoiser runs: emulator calibration, the λ choice of the correction and the
anchors. Decision: the original is always streamed on a GPU (the premise is that it may not fit next to
anything else); the emulator, which is what training needs, is resident.

A block's device copies are dropped after its forward and its parameters point at their CPU tensors
again: nothing is copied back. The weights as loaded (memory-mapped from the safetensors files, which
the OS can page) therefore never turn into a private copy in RAM, and each streamed forward crosses
PCIe once, not twice. (Until 2026-12-07 the block was moved back with ``.to("cpu")``: after one pass
the whole original was an anonymous copy in RAM, 22 GiB for FLUX.1-dev next to the emulator's
factors, and every block was copied back for nothing.) The contract: blocks are read-only while they
are on the device (a change made there is dropped); change them between forwards, on the CPU, as the
correction's λ search does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "down_blocks", "up_blocks")


def stream_units(model: nn.Module) -> list[nn.Module]:
    """The blocks that are moved one at a time (see the module docstring)."""
    units: list[nn.Module] = []
    for name in _BLOCK_LISTS:
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList):
            units.extend(blocks)
    mid = getattr(model, "mid_block", None)
    if isinstance(mid, nn.Module):
        units.append(mid)
    return units


def _transfer(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The device copy of one tensor (a test replaces it to see copies without a GPU)."""
    return t.to(device)


class _Stash:
    """Each sent module's CPU tensors, to point its parameters and buffers back at them (module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.saved: dict[int, list[tuple[Any, ...]]] = {}

    def send(self, module: nn.Module) -> None:
        saved: list[tuple[Any, ...]] = []
        seen: set[int] = set()
        # The hooks fire inside the callers' inference mode; copies made there would be inference
        # tensors, which autograd later refuses. Copy in normal mode.
        with torch.inference_mode(False), torch.no_grad():
            for m in module.modules():
                for p in m._parameters.values():
                    if p is not None and id(p) not in seen:
                        seen.add(id(p))
                        saved.append((p, p.data))
                        p.data = _transfer(p.data, self.device)
                for name, b in m._buffers.items():
                    if b is not None:
                        saved.append((m, name, b))
                        m._buffers[name] = _transfer(b, self.device)
        self.saved[id(module)] = saved

    def restore(self, module: nn.Module) -> None:
        self._restore(id(module))

    def restore_all(self) -> None:
        for key in list(self.saved):
            self._restore(key)

    def _restore(self, key: int) -> None:
        for entry in reversed(self.saved.pop(key, [])):
            if len(entry) == 2:  # (parameter, its CPU tensor)
                entry[0].data = entry[1]
            else:  # (owner, buffer name, its CPU tensor)
                entry[0]._buffers[entry[1]] = entry[2]


@contextlib.contextmanager
def streamed(model: nn.Module, device: torch.device, *, enabled: bool | None = None) -> Iterator[nn.Module]:
    """Within the block, ``model`` runs on ``device`` with its blocks streamed from the CPU.

    ``enabled`` defaults to streaming on any device but the CPU (tests force it on the CPU).
    """
    if not (device.type != "cpu" if enabled is None else enabled):
        model.to(device)
        yield model
        return
    units = stream_units(model)
    unit_ids = {id(u) for u in units}
    handles: list[Any] = []
    stash = _Stash(device)
    try:
        for _name, child in model.named_children():
            if isinstance(child, nn.ModuleList) and any(id(c) in unit_ids for c in child):
                continue
            if id(child) not in unit_ids:
                stash.send(child)
        with torch.inference_mode(False), torch.no_grad():
            for p in model.parameters(recurse=False):
                stash.saved.setdefault(id(model), []).append((p, p.data))
                p.data = _transfer(p.data, device)
        for unit in units:
            handles.append(unit.register_forward_pre_hook(lambda m, a: stash.send(m)))
            # always_call: a forward stopped by an exception (the emulator's _PassDone ends a calibration
            # pass mid-model) still drops the block's device copy; without it SDXL's up_blocks[0] (2.2 GiB)
            # stayed on the GPU through the pass's factorisation, next to the statistics.
            handles.append(unit.register_forward_hook(lambda m, a, o: stash.restore(m), always_call=True))
        yield model
    finally:
        for h in handles:
            h.remove()
        stash.restore_all()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


__all__ = ["stream_units", "streamed"]
