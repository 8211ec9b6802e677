"""Fixed batches of cached images: calibration of the emulator and the held-out loss of the correction.

A batch is one bucket's latents (posterior means), fixed noise (seeded) and fixed noise levels
(:func:`~.families.fixed_timesteps`), so the same batches give the same numbers to every model
they are run through: the original, the emulator, either with any adapter.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from emloc_engine.images.cache import ImageCache
from emloc_engine.images.families import NoiseSchedule, fixed_timesteps, predict


@dataclass
class FixedBatch:
    x0: torch.Tensor
    noise: torch.Tensor
    indices: torch.Tensor
    cond: dict[str, torch.Tensor]


def calibration_batches(
    cache: ImageCache,
    schedule: NoiseSchedule,
    n_images: int,
    n_timesteps: int,
    batch: int,
    seed: int,
    split: str = "train",
) -> list[FixedBatch]:
    """Fixed (image, noise level, noise) batches of ``split``, one bucket per batch (deterministic)."""
    gen = torch.Generator().manual_seed(seed)
    chosen = cache.indices(split)[:n_images]
    fractions = fixed_timesteps(n_timesteps)
    pairs = [(i, f) for i in chosen for f in fractions]
    by_bucket: dict[tuple[int, ...], list[tuple[int, float]]] = {}
    for i, f in pairs:
        by_bucket.setdefault(tuple(cache.items[i]["bucket"]), []).append((i, f))
    out = []
    for _bucket, rows in sorted(by_bucket.items()):
        for s in range(0, len(rows), batch):
            part = rows[s : s + batch]
            idx = [i for i, _ in part]
            x0 = cache.latents(idx, sample=False)
            out.append(
                FixedBatch(
                    x0,
                    torch.randn(x0.shape, generator=gen),
                    schedule.fractions_to_indices([f for _, f in part]),
                    cache.cond(idx),
                )
            )
    return out


def run_batches(
    kind: Any,
    model: Any,
    schedule: NoiseSchedule,
    batches: list[FixedBatch],
    device: torch.device,
    dtype: torch.dtype,
) -> Iterator[torch.Tensor]:
    """Yield the model's prediction for each calibration/evaluation batch (inference mode).

    The inference-mode context is closed before each ``yield``: a grad mode held across a yield is
    thread state that interleaved or abandoned generators would leak into the caller.
    """
    for b in batches:
        yield predict_batch(kind, model, schedule, b, device, dtype)


def predict_batch(
    kind: Any, model: Any, schedule: NoiseSchedule, b: FixedBatch, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The model's prediction for one fixed batch, in inference mode."""
    x_t, t, _ = schedule.noisy_and_target(b.x0, b.noise, b.indices)
    cond = {k: v.to(device, dtype) for k, v in b.cond.items()}
    with torch.inference_mode():
        return predict(kind, model, x_t.to(device, dtype), t.to(device), cond)


def batches_loss(
    kind: Any,
    model: Any,
    schedule: NoiseSchedule,
    batches: list[FixedBatch],
    device: torch.device,
    dtype: torch.dtype,
) -> float:
    """Mean squared error of the model's predictions against the family's targets, averaged over batches' samples."""
    total, n = 0.0, 0
    for b, pred in zip(batches, run_batches(kind, model, schedule, batches, device, dtype), strict=True):
        _, _, target = schedule.noisy_and_target(b.x0, b.noise, b.indices)
        per = (pred.float().cpu() - target.float()).pow(2).flatten(1).mean(1)
        total += float(per.sum())
        n += per.numel()
    return total / max(1, n)


__all__ = ["FixedBatch", "batches_loss", "calibration_batches", "predict_batch", "run_batches"]
