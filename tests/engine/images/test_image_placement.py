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
