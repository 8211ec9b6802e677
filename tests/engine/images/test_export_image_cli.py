"""``emloc image-export RUN``: defaults from the run folder, errors as messages with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emloc_engine.cli.main import main
from tests.engine.images.image_adapters import make_denoiser_adapter
from tests.tiny_pipelines import build_tiny_pipeline


def test_image_export_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    snap = build_tiny_pipeline("sdxl", tmp_path / "hub")
    run = tmp_path / "my-dog"
    assert main(["image-export", str(run), "--model", str(snap)]) == 2
    assert "holds no adapter" in capsys.readouterr().err
    make_denoiser_adapter(snap, "sdxl", run / "adapter")
    make_denoiser_adapter(snap, "sdxl", run / "adapter-corrected", seed=5)
    assert main(["image-export", str(run)]) == 2
    assert "records no original pipeline" in capsys.readouterr().err
    (run / "image_run.json").write_text(json.dumps({"pipeline_dir": str(snap)}))
    assert main(["image-export", str(run), "--format", "diffusers,gguf"]) == 2
    assert "Unknown export format(s) gguf" in capsys.readouterr().err
    assert main(["image-export", str(run), "--device", "gpu"]) == 2
    assert "device must be auto, cpu or cuda" in capsys.readouterr().err
    assert main(["image-export", str(run), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "adapter-corrected" in out and "checked kohya LoRA file" in out
    assert (run / "export" / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "export" / "kohya" / "my-dog.safetensors").is_file()
    assert not (run / "export" / "merged").exists()
