"""Block streaming: same predictions as the resident model, blocks hooked in and out, parameters left trainable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emloc_engine.images.batches import calibration_batches, run_batches
from emloc_engine.images.cache import ImageCache
from emloc_engine.images.families import NoiseSchedule
from emloc_engine.images.pipelines import PipelineInfo, load_denoiser, scheduler_config
from emloc_engine.images.placement import stream_units, streamed

CPU = torch.device("cpu")


@pytest.mark.parametrize("kind", ["flux", "sdxl"])
def test_streamed_matches_resident(
    kind: str, pipelines: dict[str, PipelineInfo], caches: dict[str, Path]
) -> None:
    info = pipelines[kind]
    model = load_denoiser(info)
    units = stream_units(model)
    assert len(units) == (2 if kind == "flux" else 5)  # flux: 1 double + 1 single; sdxl: 2 down, 2 up, mid
    cache, sched = ImageCache(caches[kind]), NoiseSchedule(kind, scheduler_config(info))
    batches = calibration_batches(cache, sched, 3, 2, 4, seed=5)
    resident = list(run_batches(kind, model, sched, batches, CPU, torch.float32))
    calls: list[str] = []
    handles = [
        u.register_forward_pre_hook(lambda m, a, i=i: calls.append(str(i))) for i, u in enumerate(units)
    ]
    with streamed(model, CPU, enabled=True) as live:
        hooked = sum(len(u._forward_pre_hooks) for u in units)
        out = list(run_batches(kind, live, sched, batches, CPU, torch.float32))
    for h in handles:
        h.remove()
    assert hooked == 2 * len(units) and sum(len(u._forward_pre_hooks) for u in units) == 0
    assert all(torch.equal(a, b) for a, b in zip(resident, out, strict=True)) and len(calls) == len(
        units
    ) * len(batches)
    assert not any(p.is_inference() for p in model.parameters())
    model.requires_grad_(True)
    x0 = cache.latents(cache.indices("train")[:1], sample=False)
    from emloc_engine.images.families import denoising_loss

    loss = denoising_loss(
        kind,
        model,
        sched,
        x0,
        torch.randn_like(x0),
        sched.fractions_to_indices([0.5]),
        cache.cond(cache.indices("train")[:1]),
    )
    loss.backward()  # parameters moved inside inference mode would refuse this



class _Chain(torch.nn.Module):
    """A denoiser-shaped stack: weights outside the blocks, ``transformer_blocks``, a buffer in a block."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_in = torch.nn.Linear(8, 8)
        self.transformer_blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
        self.transformer_blocks[1].register_buffer("scale", torch.full((8,), 2.0))
        self.transformer_blocks[2].weight = self.transformer_blocks[0].weight  # one tensor in two blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x) * getattr(block, "scale", 1.0)
        return x


def _ptrs(model: torch.nn.Module) -> dict[str, int]:
    return {n: t.data_ptr() for n, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Every transfer to the "device" makes a copy (a GPU's would); the CPU stands in for the device."""
    from emloc_engine.images import placement

    made: list[torch.Tensor] = []

    def transfer(t: torch.Tensor, device: torch.device) -> torch.Tensor:
        made.append(t.clone())
        return made[-1]

    monkeypatch.setattr(placement, "_transfer", transfer)
    return made


def test_a_streamed_block_drops_its_device_copy_and_keeps_its_cpu_tensors(copies: list[torch.Tensor]) -> None:
    """A block that ran on the device points at the very tensors it had before (nothing is copied back,
    so memory-mapped weights stay mapped), and gives the same output."""
    model = _Chain()
    x = torch.randn(2, 8)
    want = model(x)
    before = _ptrs(model)
    seen: list[int] = []
    with streamed(model, CPU, enabled=True) as live:
        assert model.proj_in.weight.data_ptr() != before["proj_in.weight"]  # outside the blocks: sent once
        handles = [b.register_forward_pre_hook(lambda m, a: seen.append(m.weight.data_ptr()))
                   for b in model.transformer_blocks]  # after streamed's own: sees what the block runs on
        out = live(x)
        assert model.transformer_blocks[0].weight.data_ptr() == before["transformer_blocks.0.weight"]
    for h in handles:
        h.remove()
    assert torch.equal(out, want)
    assert len(seen) == 3 and not set(seen) & set(before.values())  # each block ran on its copy
    assert _ptrs(model) == before  # and got its own tensors back, the outside too


def test_a_block_stopped_by_an_exception_gets_its_tensors_back_too(copies: list[torch.Tensor]) -> None:
    model = _Chain()

    class Stop(Exception):
        pass

    def stop(m: torch.nn.Module, a: object, o: object) -> None:
        raise Stop

    handle = model.transformer_blocks[1].register_forward_hook(stop)
    before = _ptrs(model)
    with streamed(model, CPU, enabled=True) as live:
        with pytest.raises(Stop):
            live(torch.zeros(2, 8))
        assert model.transformer_blocks[1].weight.data_ptr() == before["transformer_blocks.1.weight"]
        assert model.transformer_blocks[1].scale.data_ptr() == before["transformer_blocks.1.scale"]
    handle.remove()
