"""Image pipelines in the model catalog: FLUX/SD3/SDXL folders of the HF cache and of added folders are
listed with ``kind="image"`` beside text models; broken ones are listed with the file and the fix; single-file
checkpoints are listed with how to give their pipeline folder, which is checked for its family; the catalog stays
torch-free."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from emloc_engine.catalog.discovery import scan_models
from emloc_engine.catalog.model_folders import add_model_folder
from emloc_engine.core.errors import ConfigError, ModelNotFound
from emloc_engine.images.pipeline_index import check_config_dir, read_pipeline_index, single_file_family
from emloc_engine.images.pipelines import identify_pipeline, load_denoiser
from tests.tiny_models import build_tiny_model
from tests.tiny_pipelines import KINDS, build_tiny_pipeline


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF cache with a tiny pipeline of each family and one tiny text model."""
    cache = tmp_path_factory.mktemp("catalog_hf") / "hub"
    for kind in KINDS:
        build_tiny_pipeline(kind, cache)
    build_tiny_model("llama", cache)
    return cache


def _snapshot(hub: Path, kind: str) -> Path:
    repo = hub / f"models--emloc-test--tiny-{kind}"
    return repo / "snapshots" / (repo / "refs" / "main").read_text().strip()


def test_the_cache_lists_each_pipeline_as_an_image_model_beside_text_models(hub: Path) -> None:
    models = {m.name: m for m in scan_models(hub, include_stores=False, include_added=False).models}
    assert set(models) == {f"emloc-test/tiny-{k}" for k in (*KINDS, "llama")}
    assert models["emloc-test/tiny-llama"].kind == "text"
    for kind in KINDS:
        info = models[f"emloc-test/tiny-{kind}"]
        assert info.kind == "image" and info.model_type == kind and info.supported, info.problem
        assert info.architecture == read_pipeline_index(info.path).pipeline_class
        assert info.source == "hf-cache" and info.refs == ("main",) and info.size_on_disk_bytes > 0
        denoiser = load_denoiser(identify_pipeline(info.path))  # parameters: the denoiser's, from headers
        assert info.num_parameters == sum(p.numel() for p in denoiser.state_dict().values())
        assert info.dtype == "float32"
        assert info.to_dict()["kind"] == "image"


def test_an_added_folder_lists_the_pipeline_once_not_its_components(hub: Path, tmp_path: Path) -> None:
    mine = tmp_path / "my-models"
    shutil.copytree(_snapshot(hub, "sdxl"), mine / "my-sdxl")
    add_model_folder(mine)
    found = scan_models(tmp_path / "no-cache", include_stores=False).models
    assert [(m.name, m.kind, m.model_type, m.supported) for m in found] == [
        ("my-models/my-sdxl", "image", "sdxl", True)
    ]  # not text_encoder/ nor unet/ as models of their own
    add_model_folder(mine / "my-sdxl")  # the pipeline folder itself, added directly
    assert {m.name for m in scan_models(tmp_path / "no-cache", include_stores=False).models} == {
        "my-models/my-sdxl",
        "my-sdxl",
    }


def test_a_broken_model_index_is_listed_with_the_file_and_the_fix(hub: Path, tmp_path: Path) -> None:
    broken = tmp_path / "models" / "broken-flux"
    shutil.copytree(_snapshot(hub, "flux"), broken)
    (broken / "model_index.json").write_text('{"_class_name": "FluxPipeline", ')  # cut off mid-download
    other = tmp_path / "models" / "kandinsky"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    no_weights = tmp_path / "models" / "no-weights"
    shutil.copytree(_snapshot(hub, "sd3"), no_weights)
    for f in (no_weights / "transformer").glob("*.safetensors"):
        f.unlink()
    found = {m.name: m for m in scan_models(tmp_path / "no-cache", [tmp_path / "models"], False).models}
    assert all(m.kind == "image" and not m.supported for m in found.values())
    problem = found["models/broken-flux"].problem or ""
    assert (
        f"{broken / 'model_index.json'} is not valid JSON" in problem
        and "Download the pipeline again" in problem
    )
    assert "KandinskyPipeline" in (found["models/kandinsky"].problem or "")
    assert "has no .safetensors weights" in (found["models/no-weights"].problem or "")
    with pytest.raises(ModelNotFound, match=r"model_index\.json is not valid JSON") as err:
        identify_pipeline(broken)  # the stages say the same, instead of a JSONDecodeError
    assert "Download the pipeline again" in err.value.hint


def test_variant_weights_are_not_counted_and_variant_only_is_explained(hub: Path, tmp_path: Path) -> None:
    both, only = tmp_path / "models" / "both", tmp_path / "models" / "only-fp16"
    for folder in (both, only):
        shutil.copytree(_snapshot(hub, "sdxl"), folder)
        main = folder / "unet" / "diffusion_pytorch_model.safetensors"
        shutil.copy(main, main.with_name("diffusion_pytorch_model.fp16.safetensors"))
    (only / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    reference = scan_models(hub, include_stores=False, include_added=False).models
    params = next(m.num_parameters for m in reference if m.name == "emloc-test/tiny-sdxl")
    found = {m.name: m for m in scan_models(tmp_path / "no-cache", [tmp_path / "models"], False).models}
    assert found["models/both"].supported and found["models/both"].num_parameters == params
    problem = found["models/only-fp16"].problem or ""
    assert (
        not found["models/only-fp16"].supported
        and "only variant weights" in problem
        and "--include" in problem
    )
    with pytest.raises(ModelNotFound, match="only variant weights"):
        identify_pipeline(only)


def test_single_file_checkpoints_are_listed_with_the_command_that_trains_them(tmp_path: Path) -> None:
    unet = tmp_path / "comfy" / "models" / "unet"
    unet.mkdir(parents=True)
    one = torch.zeros(2)
    save_file(
        {"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": one},
        unet / "flux1-dev.safetensors",
    )
    save_file({"joint_blocks.0.context_block.adaLN_modulation.1.bias": one}, unet / "sd3.5.safetensors")
    save_file({"lora_unet_down.lora_A.weight": one}, unet / "my-lora.safetensors")  # not a model: not listed
    (unet / "truncated.safetensors").write_bytes(b"\x01")
    assert single_file_family(unet / "flux1-dev.safetensors") == "flux"
    assert single_file_family(unet / "truncated.safetensors") is None
    add_model_folder(tmp_path / "comfy" / "models")
    found = {m.name: m for m in scan_models(tmp_path / "no-cache", include_stores=False).models}
    assert set(found) == {"models/unet/flux1-dev.safetensors", "models/unet/sd3.5.safetensors"}
    flux = found["models/unet/flux1-dev.safetensors"]
    assert flux.kind == "image" and flux.model_type == "flux" and not flux.supported
    assert "--config-dir" in (flux.problem or "") and str(unet / "flux1-dev.safetensors") in (
        flux.problem or ""
    )


def test_a_single_files_params_and_dtype_count_its_denoiser_alone(tmp_path: Path) -> None:
    """An all-in-one SDXL checkpoint carries its VAE and text encoders beside the UNet: the Params and Dtype
    columns count the denoiser (``model.diffusion_model.``) as a pipeline folder's row does."""
    unet = tmp_path / "models" / "checkpoints"
    unet.mkdir(parents=True)
    save_file({"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight":
               torch.zeros(8, 16, dtype=torch.float16),
               "model.diffusion_model.out.2.bias": torch.zeros(4, dtype=torch.float16),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(1000, dtype=torch.float32),
               "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(500)},
              unet / "sdxl.safetensors")
    save_file({"single_transformer_blocks.0.proj_mlp.weight": torch.zeros(6, 5, dtype=torch.bfloat16)},
              unet / "flux-diffusers.safetensors")  # a diffusers-format transformer: every tensor counts
    add_model_folder(tmp_path / "models")
    found = {m.name: m for m in scan_models(tmp_path / "no-cache", include_stores=False).models}
    sdxl, flux = found["models/checkpoints/sdxl.safetensors"], found["models/checkpoints/flux-diffusers.safetensors"]
    assert (sdxl.model_type, sdxl.num_parameters, sdxl.dtype) == ("sdxl", 8 * 16 + 4, "float16")
    assert (flux.model_type, flux.num_parameters, flux.dtype) == ("flux", 30, "bfloat16")


def test_a_single_files_pipeline_folder_is_checked_for_its_family(hub: Path, tmp_path: Path) -> None:
    flux, sdxl = _snapshot(hub, "flux"), _snapshot(hub, "sdxl")
    original = tmp_path / "flux1-dev.safetensors"  # BFL naming, as ComfyUI keeps it
    save_file(
        {"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(2)}, original
    )
    diffusers_named = tmp_path / "flux-transformer.safetensors"  # the diffusers transformer as one file
    save_file({"single_transformer_blocks.0.proj_mlp.weight": torch.zeros(2, 2)}, diffusers_named)
    assert single_file_family(diffusers_named) == "flux"
    assert (
        check_config_dir(original, flux).kind == "flux"
        and check_config_dir(diffusers_named, flux).kind == "flux"
    )
    with pytest.raises(ConfigError) as wrong:
        check_config_dir(original, sdxl)
    assert wrong.value.summary == f"{sdxl} is an SDXL pipeline; flux1-dev.safetensors is a FLUX.1 checkpoint."
    assert "diffusers FLUX.1 pipeline folder" in wrong.value.hint and "model_index.json" in wrong.value.hint
    with pytest.raises(ModelNotFound, match="is not a diffusers pipeline folder"):
        check_config_dir(original, tmp_path)
    broken = tmp_path / "broken"  # a FLUX.1 pipeline whose transformer weights are missing
    shutil.copytree(flux, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ConfigError, match="cannot supply the configs") as missing:
        check_config_dir(original, broken)
    assert any("no .safetensors weights" in p for p in missing.value.problems)
    unknown = tmp_path / "unet.safetensors"  # a family the header does not tell: the folder alone is checked
    save_file({"conv_in.weight": torch.zeros(2)}, unknown)
    assert check_config_dir(unknown, sdxl).kind == "sdxl"
    with pytest.raises(ModelNotFound, match="does not exist"):
        check_config_dir(tmp_path / "gone.safetensors", flux)


def test_a_cache_snapshot_with_only_the_single_file_lists_that_file(tmp_path: Path) -> None:
    snap = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-dev" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    save_file(
        {"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(2)}, snap / "flux1-dev.safetensors"
    )
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc")
    [info] = scan_models(tmp_path / "hub", include_stores=False, include_added=False).models
    assert info.name == "black-forest-labs/FLUX.1-dev/flux1-dev.safetensors" and info.revision == "abc"
    assert info.kind == "image" and info.model_type == "flux" and "--config-dir" in (info.problem or "")


def test_naming_an_image_model_for_a_text_command_says_the_image_command(hub: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from emloc_engine.catalog.resolve import resolve_model

    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    with pytest.raises(ModelNotFound, match="is an image model") as err:
        resolve_model("emloc-test/tiny-flux")
    assert f"emloc image {_snapshot(hub, 'flux')} PHOTOS" in err.value.hint
    assert resolve_model("emloc-test/tiny-llama") == _snapshot(hub, "llama")


def test_the_catalog_imports_neither_torch_nor_diffusers() -> None:
    code = (
        "import sys\nfrom emloc_engine.catalog import discovery\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
