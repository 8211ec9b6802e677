"""benchmarks/image_anchors.py: with a zero adapter the online-anchored emulator reproduces the original denoiser."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.image_anchors import OnlineBlockAnchors
from emloc_engine.images.batches import batches_loss, calibration_batches
from emloc_engine.images.cache import ImageCache
from emloc_engine.images.emulator import ImageEmulatorConfig, build_image_emulator, load_image_emulator
from emloc_engine.images.families import NoiseSchedule
from emloc_engine.images.pipelines import PipelineInfo, load_denoiser, scheduler_config
from emloc_engine.images.training import attach_image_lora, lora_targets

CPU = torch.device("cpu")


@pytest.mark.parametrize("kind", ["flux", "sd3", "sdxl"])
def test_the_anchored_emulator_with_a_zero_adapter_is_the_original(
    kind: str, pipelines: dict[str, PipelineInfo], caches: dict[str, Path], tmp_path: Path
) -> None:
    info = pipelines[kind]
    emu_dir = build_image_emulator(ImageEmulatorConfig(
        info, caches[kind], tmp_path / "emulator", ratio=0.3, calibration_images=2, calibration_timesteps=2,
        device="cpu")).emulator_dir
    sched = NoiseSchedule(kind, scheduler_config(info))
    batches = calibration_batches(ImageCache(caches[kind]), sched, 3, 2, 8, seed=5)
    peft_model = attach_image_lora(load_image_emulator(emu_dir), lora_targets(emu_dir), 4, 4.0, str(info.folder))
    model = peft_model.get_base_model().eval()
    original = load_denoiser(info).eval()
    want = batches_loss(kind, original, sched, batches, CPU, torch.float32)
    bare = batches_loss(kind, model, sched, batches, CPU, torch.float32)
    anchors = OnlineBlockAnchors(original, peft_model)
    try:
        got = batches_loss(kind, model, sched, batches, CPU, torch.float32)
    finally:
        anchors.close()
    assert anchors.names and anchors.forwards > 0
    assert abs(bare - want) > 1e-3 * abs(want)  # the emulator alone is not the original
    assert got == pytest.approx(want, rel=1e-6)
    assert batches_loss(kind, model, sched, batches, CPU, torch.float32) == pytest.approx(bare, rel=1e-6)  # closed
