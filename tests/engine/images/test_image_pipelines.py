"""Kind detection, refusals, the compressed-module choice and the latent/prompt cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from emloc_engine.core.errors import ModelNotFound, UnsupportedModel
from emloc_engine.images.cache import CacheConfig, ImageCache, bucket_for, build_cache
from emloc_engine.images.dataset import ImageFolderConfig, scan_image_folder
from emloc_engine.images.pipelines import PipelineInfo, compressible_modules, identify_pipeline, load_denoiser


def test_kinds_and_denoisers(pipelines: dict[str, PipelineInfo]) -> None:
    assert {k: (p.kind, p.denoiser, p.pipeline_class) for k, p in pipelines.items()} == {
        "flux": ("flux", "transformer", "FluxPipeline"),
        "sd3": ("sd3", "transformer", "StableDiffusion3Pipeline"),
        "sdxl": ("sdxl", "unet", "StableDiffusionXLPipeline"),
    }
    flux = compressible_modules("flux", load_denoiser(pipelines["flux"]))
    assert "transformer_blocks.0.attn.to_q" in flux and "single_transformer_blocks.0.proj_out" in flux
    assert not any(n.startswith(("proj_out", "x_embedder")) or ".norm" in n for n in flux)
    sdxl = compressible_modules("sdxl", load_denoiser(pipelines["sdxl"]))
    assert any(n.endswith("attn2.to_k") for n in sdxl) and not any(
        "proj_in" in n or "time_emb" in n for n in sdxl
    )


def test_refusals(pipelines: dict[str, PipelineInfo], tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"model_index\.json"):
        identify_pipeline(tmp_path)
    other = tmp_path / "other"
    shutil.copytree(pipelines["sdxl"].folder, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps(dict(index, _class_name="StableDiffusionPipeline")))
    with pytest.raises(UnsupportedModel, match="StableDiffusionPipeline"):
        identify_pipeline(other)
    (other / "model_index.json").write_text(json.dumps(dict(index, unet=["my_module", "MyUNet"])))
    with pytest.raises(UnsupportedModel, match="code shipped with the model"):
        identify_pipeline(other)
    single = tmp_path / "flux1-dev.safetensors"
    single.write_bytes(b"")
    with pytest.raises(UnsupportedModel, match="config_dir"):
        identify_pipeline(single)


def test_buckets() -> None:
    assert bucket_for(1024, 1024, 1024, 64) == (1024, 1024)
    w, h = bucket_for(1536, 1024, 1024, 64)
    assert w > h and w % 64 == 0 and h % 64 == 0 and abs(w * h / 1024**2 - 1) < 0.1


def test_cache_contents(caches: dict[str, Path]) -> None:
    for kind, folder in caches.items():
        cache = ImageCache(folder)
        assert len(cache.indices("train")) == 5 and len(cache.indices("eval")) == 1
        assert set(cache.buckets("train")) == {(32, 32), (40, 28)}
        idx = cache.buckets("train")[(40, 28)]
        x = cache.latents(idx, sample=False)
        assert x.shape == (2, 4, 14, 20) and torch.isfinite(x).all()
        cond = cache.cond(idx)
        assert cond["embeds"].shape[0] == 2 and cond["pooled"].shape[0] == 2
        assert ("time_ids" in cond) == (kind == "sdxl")
        assert cache.meta["sample_prompts"] == ["sks circle"] and "" in cache.meta["prompts"]


def test_cache_reused_unless_images_change(
    pipelines: dict[str, PipelineInfo], subject_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "imgs"
    shutil.copytree(subject_dir, folder)
    items = scan_image_folder(ImageFolderConfig(folder, trigger="sks", min_side_px=16)).items
    cfg = CacheConfig(
        pipelines["sd3"], tmp_path / "cache", items[:2], resolution=32, max_sequence_length=8, device="cpu"
    )
    assert not build_cache(cfg).reused and build_cache(cfg).reused
    (folder / "img_000.txt").write_text("another caption")
    items = scan_image_folder(ImageFolderConfig(folder, trigger="sks", min_side_px=16)).items
    assert not build_cache(
        CacheConfig(
            pipelines["sd3"],
            tmp_path / "cache",
            items[:2],
            resolution=32,
            max_sequence_length=8,
            device="cpu",
        )
    ).reused


def test_single_file_with_a_config_folder(pipelines: dict[str, PipelineInfo], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from emloc_engine.images.pipelines import convert_single_file

    info = pipelines["flux"]
    state = load_file(str(next(info.denoiser_dir.glob("*.safetensors"))))
    single = tmp_path / "my-flux.safetensors"
    save_file(state, str(single))
    converted = convert_single_file(single, info.folder, tmp_path / "run" / "denoiser")
    assert converted.kind == "flux" and converted.denoiser_dir == tmp_path / "run" / "denoiser"
    a, b = load_denoiser(converted).state_dict(), load_denoiser(info).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bad = tmp_path / "not-flux.safetensors"
    save_file({"x": torch.zeros(2)}, str(bad))
    with pytest.raises(UnsupportedModel, match="could not read"):
        convert_single_file(bad, info.folder, tmp_path / "run2" / "denoiser")


def test_find_pipelines_in_a_cache(pipelines: dict[str, PipelineInfo], tmp_path: Path) -> None:
    from emloc_engine.images.pipelines import find_pipelines

    hub = pipelines["flux"].folder.parents[2]
    other = hub / "models--someone--sd15" / "snapshots" / "abc"
    other.mkdir(parents=True)
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    found = {f.repo_id: f for f in find_pipelines([hub])}
    assert {k: f.kind for k, f in found.items()} == {
        "emloc-test/tiny-flux": "flux",
        "emloc-test/tiny-sd3": "sd3",
        "emloc-test/tiny-sdxl": "sdxl",
        "someone/sd15": "unsupported",
    }
    assert "StableDiffusionPipeline" in found["someone/sd15"].problem
    shutil.rmtree(other.parents[1])


def test_missing_diffusers_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    from emloc_engine.core.errors import MissingTool

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a)
    )
    with pytest.raises(MissingTool, match="diffusers") as err:
        identify_pipeline(tmp_path)
    assert "emloc-studio[images]" in str(err.value)
