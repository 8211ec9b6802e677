"""The denoiser emulator: exact at full rank for every family; compressed below; statistics shared per input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emloc_engine.images.batches import batches_loss, calibration_batches, run_batches
from emloc_engine.images.cache import ImageCache
from emloc_engine.images.emulator import (
    ImageEmulatorConfig,
    ImageEmulatorResult,
    build_image_emulator,
    load_image_emulator,
)
from emloc_engine.images.families import NoiseSchedule
from emloc_engine.images.pipelines import BLOCK_PATTERN, PipelineInfo, load_denoiser, scheduler_config
from emloc_engine.weights.lowrank import LowRankLinear

CPU = torch.device("cpu")


@pytest.mark.parametrize("kind", ["flux", "sd3", "sdxl"])
def test_full_rank_emulator_reproduces_the_denoiser(
    kind: str, pipelines: dict[str, PipelineInfo], caches: dict[str, Path], tmp_path: Path
) -> None:
    info = pipelines[kind]
    # a tiny statistics budget forces one pass per block: the passes must not change the result
    res = build_image_emulator(
        ImageEmulatorConfig(
            info,
            caches[kind],
            tmp_path / "emu",
            full_rank=True,
            calibration_images=2,
            calibration_timesteps=2,
            device="cpu",
            stats_budget_gib=1e-9,
        )
    )
    blocks = {BLOCK_PATTERN.match(n).group(1) for n in res.modules}  # type: ignore[union-attr]
    assert res.passes == len(blocks) and all(m["rel_error"] < 1e-6 for m in res.modules.values())
    emu, orig = load_image_emulator(res.emulator_dir), load_denoiser(info)
    assert sum(isinstance(m, LowRankLinear) for m in emu.modules()) == len(res.modules) > 0
    cache = ImageCache(caches[kind])
    sched = NoiseSchedule(kind, scheduler_config(info))
    batches = calibration_batches(cache, sched, 6, 3, 4, seed=7, split="train")
    for a, b in zip(
        run_batches(kind, orig, sched, batches, CPU, torch.float32),
        run_batches(kind, emu, sched, batches, CPU, torch.float32),
        strict=True,
    ):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4)
    assert (
        torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    )  # no grad mode leaked by generators


def test_compressed_emulator_is_smaller_and_shares_statistics(
    pipelines: dict[str, PipelineInfo], caches: dict[str, Path], flux_emulator: ImageEmulatorResult
) -> None:
    info, res = pipelines["flux"], flux_emulator
    assert res.params_kept < res.params_original
    groups = {n: m["stat_group"] for n, m in res.modules.items()}
    assert groups["transformer_blocks.0.attn.to_k"] == groups["transformer_blocks.0.attn.to_q"]
    assert groups["single_transformer_blocks.0.proj_mlp"] == groups["single_transformer_blocks.0.attn.to_q"]
    assert groups["transformer_blocks.0.attn.add_q_proj"] != groups["transformer_blocks.0.attn.to_q"]
    assert all(0 < m["rel_error"] < 1 for m in res.modules.values())
    cache, sched = ImageCache(caches["flux"]), NoiseSchedule("flux", scheduler_config(info))
    batches = calibration_batches(cache, sched, 4, 2, 4, seed=3)
    emu_loss = batches_loss("flux", load_image_emulator(res.emulator_dir), sched, batches, CPU, torch.float32)
    orig_loss = batches_loss("flux", load_denoiser(info), sched, batches, CPU, torch.float32)
    assert emu_loss != orig_loss and torch.isfinite(torch.tensor(emu_loss))
