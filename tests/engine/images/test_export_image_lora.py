"""Image LoRA export: each file loaded by diffusers into the original pipeline reproduces original + adapter."""

from __future__ import annotations

from pathlib import Path

import pytest

from emloc_engine.images.export import ImageExportConfig, export_image_lora
from tests.engine.images.image_adapters import make_denoiser_adapter
from tests.tiny_pipelines import build_tiny_pipeline


@pytest.mark.parametrize("kind", ["flux", "sd3", "sdxl"])
def test_every_format_reads_back(kind: str, tmp_path: Path) -> None:
    snap = build_tiny_pipeline(kind, tmp_path / "hub")
    adapter = make_denoiser_adapter(
        snap,
        kind,
        tmp_path / "run" / "adapter-corrected",
        rank_pattern={"to_q": 2} if kind != "flux" else None,
    )
    formats = ("diffusers", "kohya", "merged") if kind != "sd3" else ("diffusers", "merged")
    result = export_image_lora(ImageExportConfig(snap, adapter, tmp_path / "run" / "export", formats=formats))
    assert result.family == kind
    assert len(result.checks) == len(formats)
    for c in result.checks:
        assert c.ok and c.adapter_effect > 100 * c.max_abs_diff, c
    assert (
        result.diffusers_file is not None and result.diffusers_file.name == "pytorch_lora_weights.safetensors"
    )
    assert result.merged_dir is not None and (result.merged_dir / "model_index.json").is_file()
    if kind != "sd3":
        assert result.kohya_file is not None and result.kohya_file.name == "run.safetensors"
    assert not list((tmp_path / "run").glob("export/*.partial"))
