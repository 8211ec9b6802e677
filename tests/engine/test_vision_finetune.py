"""VLM training, correction, merge: adapter loads with peft, merged == original + corrected adapter, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from emloc_engine.data.config import DataConfig
from emloc_engine.data.vision_pipeline import prepare_vision_dataset
from emloc_engine.vision.emulator import VlmEmulatorConfig, build_vlm_emulator, calibration_inputs
from emloc_engine.vision.finetune import (
    VlmTrainConfig,
    correct_vlm_adapter,
    merge_vlm,
    train_vlm_lora,
)
from emloc_engine.vision.processor import load_processor
from tests.engine.test_vision_emulator import visual_dataset
from tests.tiny_vlms import build_tiny_vlm


def _setup(family: str, tmp_path: Path) -> tuple[Path, Path, DataConfig, object]:
    snap = build_tiny_vlm(family, tmp_path / "hub")
    processor = load_processor(snap)
    data = DataConfig(visual_dataset(tmp_path / "data"), eval_fraction=0.25)
    prepared = prepare_vision_dataset(data, processor)
    emu = build_vlm_emulator(
        VlmEmulatorConfig(
            snap,
            tmp_path / "run" / "emulator",
            calibration_inputs(prepared.train, processor, 6),
            ratio=0.4,
            device="cpu",
            compute_dtype="float32",
        )
    ).emulator_dir
    return snap, emu, data, processor


def _logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.double()


@pytest.mark.parametrize("family", ["qwen2_vl", "internvl", "llava"])
def test_train_correct_merge_round_trip(family: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    snap, emu, data, _ = _setup(family, tmp_path)
    run = tmp_path / "run"
    res = train_vlm_lora(
        VlmTrainConfig(
            snap,
            emu,
            data,
            run,
            steps=6,
            lr=5e-3,
            rank=4,
            alpha=8,
            device="cpu",
            dtype="float32",
            checkpoint_every=3,
        )
    )
    assert res.steps_done == 6 and len(res.losses) == 6 and all(math.isfinite(x) for x in res.losses)
    cfg = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]) == snap.resolve()
    # the adapter covers every compressed module: the vision tower's and the language model's
    from emloc_engine.weights.adapters import read_adapter
    from emloc_engine.weights.lowrank import read_emulator_meta

    assert set(read_emulator_meta(emu)["modules"]) <= set(read_adapter(res.adapter_dir).modules)

    corrected = correct_vlm_adapter(snap, emu, res.adapter_dir, run / "adapter-corrected", data, device="cpu")
    assert corrected.lam in (0.0, 1.0, 3.0, math.inf) and len(corrected.table) == 4
    assert (res.adapter_dir / "adapter_model.safetensors").exists()  # the trained adapter is kept

    merged = merge_vlm(snap, corrected.adapter_dir, run / "merged", emu)
    for f in ("preprocessor_config.json", "chat_template.jinja", "processor_config.json", "tokenizer.json"):
        assert (merged / f).exists(), f
    merged_model = AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.float32).eval()
    base = AutoModelForImageTextToText.from_pretrained(snap, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, str(corrected.adapter_dir)).eval()
    prepared = prepare_vision_dataset(data, load_processor(merged))
    inputs = calibration_inputs(prepared.eval, load_processor(merged), 1)[0]
    a, b = _logits(merged_model, inputs), _logits(with_adapter, inputs)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max().item()
    with with_adapter.disable_adapter():
        original = _logits(with_adapter, inputs)
    assert not torch.allclose(a, original, atol=1e-4)  # training changed something


def test_exact_correction_makes_original_match_emulator_on_adapter_directions(tmp_path: Path) -> None:
    from emloc_engine.weights.adapters import read_adapter

    snap, emu, data, _ = _setup("qwen2_vl", tmp_path)
    run = tmp_path / "run"
    res = train_vlm_lora(
        VlmTrainConfig(snap, emu, data, run, steps=2, lr=5e-3, rank=4, alpha=8, device="cpu", dtype="float32")
    )
    out = correct_vlm_adapter(
        snap, emu, res.adapter_dir, run / "exact", data, lambdas=(math.inf,), device="cpu"
    )
    assert out.lam == math.inf
    from safetensors import safe_open

    trained, fixed = read_adapter(res.adapter_dir), read_adapter(out.adapter_dir)
    name = "model.visual.blocks.0.attn.qkv"
    src = {
        k: safe_open(str(snap / "model.safetensors"), "pt").get_tensor(k)
        for k in ["visual.blocks.0.attn.qkv.weight"]
    }
    w = src["visual.blocks.0.attn.qkv.weight"].double()
    with safe_open(str(next(emu.glob("vision-00000.safetensors"))), "pt") as fh:
        we = fh.get_tensor(f"{name}.u.weight").double() @ fh.get_tensor(f"{name}.v.weight").double()
    s = trained.modules[name].scale
    a, b = trained.A(name).double(), trained.B(name).double()
    ac, bc = fixed.A(name).double(), fixed.B(name).double()
    x = torch.randn(5, a.shape[0], dtype=torch.float64) @ a  # inputs in span(Aᵀ)
    lhs = x @ (w + s * bc @ ac).T
    rhs = x @ (we + s * b @ a).T
    assert torch.allclose(lhs, rhs, atol=1e-5), (lhs - rhs).abs().max().item()


def test_training_resumes_exactly(tmp_path: Path) -> None:
    from emloc_engine.weights.adapters import read_adapter

    snap, emu, data, _ = _setup("qwen2_vl", tmp_path)
    kw = dict(steps=4, lr=5e-3, rank=4, alpha=8, device="cpu", dtype="float32", checkpoint_every=2)
    straight = train_vlm_lora(VlmTrainConfig(snap, emu, data, tmp_path / "a", **kw))
    first = train_vlm_lora(VlmTrainConfig(snap, emu, data, tmp_path / "b", stop_after=2, **kw))
    assert first.steps_done == 2 and not (tmp_path / "b" / "adapter").exists()
    second = train_vlm_lora(VlmTrainConfig(snap, emu, data, tmp_path / "b", **kw))
    assert second.resumed_from == 2 and second.steps_done == 4
    assert second.losses == pytest.approx(straight.losses, rel=1e-6)
    x, y = read_adapter(straight.adapter_dir), read_adapter(second.adapter_dir)
    for k, t in x.tensors.items():
        assert torch.allclose(t, y.tensors[k], atol=1e-6), k
