"""The exported files as users load them, the kohya naming against diffusers' own converter, and refusals."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from emloc_engine.core.errors import MergeError
from emloc_engine.images.export import ImageExportConfig, export_image_lora
from emloc_engine.images.export_readback import denoise, probe_inputs
from emloc_engine.images.lora_formats import UnsupportedKohya, kohya_state_dict
from emloc_engine.stages.export.merge import LoraDelta
from tests.engine.images.image_adapters import make_denoiser_adapter
from tests.tiny_pipelines import build_tiny_pipeline


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("kind", ["flux", "sdxl"])
def test_whole_pipeline_load_lora_weights(kind: str, tmp_path: Path) -> None:
    """What a user does: DiffusionPipeline.from_pretrained(original).load_lora_weights(file)."""
    from diffusers import DiffusionPipeline
    from peft import PeftModel

    snap = build_tiny_pipeline(kind, tmp_path / "hub")
    adapter = make_denoiser_adapter(snap, kind, tmp_path / "adapter", alpha=3.0, seed=1)
    result = export_image_lora(
        ImageExportConfig(snap, adapter, tmp_path / "out", formats=("diffusers", "kohya"), name="subject")
    )
    pipe = DiffusionPipeline.from_pretrained(str(snap))
    den = pipe.transformer if kind == "flux" else pipe.unet
    inputs = probe_inputs(kind, den, seed=3)
    base = denoise(den, inputs)
    peft = PeftModel.from_pretrained(den, str(adapter))
    ref = denoise(peft.base_model.model, inputs)
    den = peft.unload()
    assert float((ref - base).abs().max()) > 1e-2
    for file in (result.diffusers_file, result.kohya_file):
        assert file is not None
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=file.parent.name)
        out = denoise(den, inputs)
        assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), file
        pipe.unload_lora_weights()
    keys = load_file(str(result.kohya_file))
    assert all(k.startswith("lora_unet_") for k in keys)
    if kind == "sdxl":
        assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    else:
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in keys


def test_flux1_fused_linear1_splits_back_exactly() -> None:
    """At FLUX.1's width diffusers' converter turns the fused single-block linear1 back into q/k/v/mlp."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    g = torch.Generator().manual_seed(0)
    w, mlp = 3072, 12288
    parts = {"attn.to_q": w, "attn.to_v": w, "proj_mlp": mlp}  # to_k not adapted: a zero block
    deltas = {
        f"single_transformer_blocks.0.{p}": LoraDelta(
            torch.randn(2 if p == "proj_mlp" else 1, w, generator=g),
            torch.randn(out, 2 if p == "proj_mlp" else 1, generator=g),
            0.5,
        )
        for p, out in parts.items()
    }
    state = kohya_state_dict("flux", deltas, {"num_attention_heads": 24, "attention_head_dim": 128})
    assert state["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (8, w)
    back = _convert_kohya_flux_lora_to_diffusers(dict(state))
    for module, d in deltas.items():
        a = back[f"transformer.{module}.lora_A.weight"]
        b = back[f"transformer.{module}.lora_B.weight"]
        torch.testing.assert_close(b @ a, d.scale * d.B @ d.A, atol=1e-5, rtol=1e-5)
    k_a, k_b = (
        back["transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight"],
        back["transformer.single_transformer_blocks.0.attn.to_k.lora_B.weight"],
    )
    assert float((k_b @ k_a).abs().max()) == 0.0


def test_sd3_kohya_refused_and_nothing_written(tmp_path: Path) -> None:
    snap = build_tiny_pipeline("sd3", tmp_path / "hub")
    adapter = make_denoiser_adapter(snap, "sd3", tmp_path / "adapter")
    with pytest.raises(UnsupportedKohya, match="SD3"):
        export_image_lora(
            ImageExportConfig(snap, adapter, tmp_path / "out", formats=("kohya",), verify=False)
        )
    assert not (tmp_path / "out" / "kohya").exists() and not list((tmp_path / "out").glob("*partial*"))


def test_merged_leaves_original_untouched_and_refuses_nan(tmp_path: Path) -> None:
    snap = build_tiny_pipeline("sdxl", tmp_path / "hub")
    before = _tree_digest(snap)
    adapter = make_denoiser_adapter(snap, "sdxl", tmp_path / "adapter")
    result = export_image_lora(ImageExportConfig(snap, adapter, tmp_path / "out", formats=("merged",)))
    assert _tree_digest(snap) == before
    merged = _tree_digest(result.merged_dir)  # type: ignore[arg-type]
    assert merged["text_encoder/model.safetensors"] == before["text_encoder/model.safetensors"]
    assert (
        merged["unet/diffusion_pytorch_model.safetensors"]
        != before["unet/diffusion_pytorch_model.safetensors"]
    )
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(weights))
    with pytest.raises(MergeError, match="NaN"):
        export_image_lora(
            ImageExportConfig(snap, adapter, tmp_path / "out2", formats=("merged",), verify=False)
        )
    assert not (tmp_path / "out2" / "merged").exists()
    assert _tree_digest(snap) == before


def test_adapter_of_another_model_is_refused(tmp_path: Path) -> None:
    flux = build_tiny_pipeline("flux", tmp_path / "hub")
    sdxl = build_tiny_pipeline("sdxl", tmp_path / "hub")
    adapter = make_denoiser_adapter(sdxl, "sdxl", tmp_path / "adapter", targets=["to_q"])
    with pytest.raises(MergeError) as err:
        export_image_lora(
            ImageExportConfig(flux, adapter, tmp_path / "out", formats=("merged",), verify=False)
        )
    assert "does not fit" in str(err.value) and "another model" in str(err.value)
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q: not in this denoiser" in str(
        err.value
    )
    assert not (tmp_path / "out" / "merged").exists()
    with pytest.raises(MergeError, match="does not fit"):
        export_image_lora(ImageExportConfig(flux, adapter, tmp_path / "out", formats=("diffusers",)))


def test_pass_rule_is_relative_to_the_adapter_effect() -> None:
    from emloc_engine.images.export_readback import compare

    ref, base = torch.ones(4), torch.ones(4) - 1e-3  # a small adapter: effect 1e-3
    close = compare("x", ref + 5e-5, ref, base, 1e-4)
    far = compare("x", ref + 5e-4, ref, base, 1e-4)  # within 1e-4 × |ref| but half the adapter's effect
    assert close.ok and not far.ok
    assert compare("x", ref + 5e-4, ref, base, 1e-3, None).ok  # merged bf16: the effect rule waived
    assert not compare("x", ref, ref, ref, 1e-4).ok  # an adapter that changes nothing proves nothing


def test_read_back_catches_a_file_missing_a_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import emloc_engine.images.export_writers as writers

    real = writers.diffusers_state_dict

    def drop_one(deltas):  # type: ignore[no-untyped-def]
        state = real(deltas)
        first = next(iter(deltas))
        return {k: v for k, v in state.items() if not k.startswith(first + ".")}

    monkeypatch.setattr(writers, "diffusers_state_dict", drop_one)
    snap = build_tiny_pipeline("sd3", tmp_path / "hub")
    adapter = make_denoiser_adapter(snap, "sd3", tmp_path / "adapter")
    with pytest.raises(MergeError, match="differs from the original \\+ adapter") as err:
        export_image_lora(ImageExportConfig(snap, adapter, tmp_path / "out", formats=("diffusers",)))
    assert "Nothing was written" in str(err.value)
    assert not (tmp_path / "out" / "diffusers").exists() and not list((tmp_path / "out").glob("*partial*"))


def test_cancel_between_outputs_leaves_nothing_half_written(tmp_path: Path) -> None:
    from emloc_engine.core.errors import Cancelled
    from emloc_engine.core.progress import RecordingProgress

    snap = build_tiny_pipeline("sdxl", tmp_path / "hub")
    adapter = make_denoiser_adapter(snap, "sdxl", tmp_path / "adapter")
    progress = RecordingProgress(cancel_after_updates=2)  # after the reference and the first file
    with pytest.raises(Cancelled):
        export_image_lora(
            ImageExportConfig(snap, adapter, tmp_path / "out", formats=("diffusers", "kohya", "merged")),
            progress,
        )
    out = tmp_path / "out"
    assert (out / "diffusers" / "pytorch_lora_weights.safetensors").is_file()  # finished before the cancel
    assert not (out / "kohya").exists() and not (out / "merged").exists() and not list(out.glob("*partial*"))
