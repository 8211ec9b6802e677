"""End to end with img-core's run: the run's corrected adapter exports and reads back through diffusers."""

from __future__ import annotations

from pathlib import Path

import pytest

from emloc_engine.cli.main import main
from emloc_engine.images.run import ImageRunConfig, run_images
from tests.tiny_pipelines import build_tiny_pipeline, write_subject_images


@pytest.mark.parametrize("kind", ["flux", "sdxl"])
def test_run_then_image_export(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    snap = build_tiny_pipeline(kind, tmp_path / "hub", weight_std=0.05)
    photos = tmp_path / "photos"
    write_subject_images(photos, 3, size=(32, 32))
    run = tmp_path / "run"
    result = run_images(
        ImageRunConfig(
            snap,
            photos,
            run,
            min_side_px=16,
            resolution=32,
            max_sequence_length=16,
            calibration_images=2,
            calibration_timesteps=2,
            steps=3,
            lr=1e-2,
            rank=4,
            sample_every=0,
            checkpoint_every=10,
            lam=1.0,
            device="cpu",
        )
    )
    assert result.corrected_dir == run / "adapter-corrected"
    if kind == "flux":  # the run adapts the single blocks' q/k/v/mlp: kohya fuses them at FLUX.1's width only
        assert main(["image-export", str(run), "--format", "kohya,diffusers"]) == 2
        assert "FLUX.1's width 3072" in capsys.readouterr().err
        assert not (run / "export").exists()  # refused before anything was written
    formats = "diffusers,kohya,merged" if kind == "sdxl" else "diffusers,merged"
    assert main(["image-export", str(run), "--format", formats]) == 0
    out = capsys.readouterr().out
    for what in ("diffusers LoRA file", "kohya LoRA file", "merged pipeline's denoiser"):
        assert (f"checked {what}" in out) == (what.split()[0] in formats), what
    assert (run / "export" / "merged" / "model_index.json").is_file()
