"""Run a denoiser that lives in CPU memory on a GPU one block at a time.

``streamed(model, device)`` moves everything outside the blocks (embedders, final norm and
projection: a few percent of the weights) to ``device`` and gives every block a forward pre-hook
that moves it there and a forward hook that moves it back, so the GPU holds one block's weights
(plus what the forward keeps alive) however big the model is. Blocks: the entries of
``transformer_blocks`` / ``single_transformer_blocks`` (FLUX, SD3) or the UNet's down blocks, mid
block and up blocks (SDXL). On the CPU, or with ``enabled=False``, the whole model is simply moved
to ``device``.

Used wherever the ORIGINAL denoiser runs: emulator calibration and the λ choice of the correction.
Decision: the original is always streamed on a GPU (the premise is that it may not fit next to
anything else); the emulator, which is what training needs, is resident.
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


def _to(module: nn.Module, device: torch.device) -> None:
    # The hooks fire inside the callers' inference mode; moving there would turn the parameters into
    # inference tensors, which autograd later refuses. Move in normal mode.
    with torch.inference_mode(False), torch.no_grad():
        module.to(device)


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
    try:
        for _name, child in model.named_children():
            if isinstance(child, nn.ModuleList) and any(id(c) in unit_ids for c in child):
                continue
            if id(child) not in unit_ids:
                child.to(device)
        for p in model.parameters(recurse=False):
            p.data = p.data.to(device)
        for unit in units:
            unit.to("cpu")
            handles.append(unit.register_forward_pre_hook(lambda m, a: _to(m, device)))
            # always_call: a forward stopped by an exception (the emulator's _PassDone ends a calibration
            # pass mid-model) still sends the block back; without it SDXL's up_blocks[0] (2.2 GiB) stayed on
            # the GPU through the pass's factorisation, next to the statistics.
            handles.append(
                unit.register_forward_hook(lambda m, a, o: _to(m, torch.device("cpu")), always_call=True)
            )
        yield model
    finally:
        for h in handles:
            h.remove()
        _to(model, torch.device("cpu"))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


__all__ = ["stream_units", "streamed"]
