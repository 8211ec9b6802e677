"""The VLM emulator: both towers compressed, streamed block by block; full rank reproduces the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from emloc_engine.data.config import DataConfig
from emloc_engine.data.vision_pipeline import PreparedVisionData, prepare_vision_dataset
from emloc_engine.vision.emulator import (
    VlmEmulatorConfig,
    build_vlm_emulator,
    calibration_inputs,
    load_vlm_emulator,
    low_rank_modules,
)
from emloc_engine.vision.families import vlm_spec
from emloc_engine.vision.processor import load_processor
from tests.tiny_vlms import VLM_FAMILIES, build_tiny_vlm, write_png

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 220, 20)}


def visual_dataset(folder: Path, n: int = 8) -> Path:
    """A tiny image dataset: n samples "what colour?" → colour name, LLaVA style."""
    rows = []
    names = list(COLOURS)
    for i in range(n):
        c = names[i % len(names)]
        write_png(folder / "img" / f"{i}.png", COLOURS[c], count=1 + i % 3)
        rows.append(
            {
                "image": f"img/{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour are the shapes?"},
                    {"from": "gpt", "value": c},
                ],
            }
        )
    f = folder / "colours.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return f


def _tiny_vlm_and_data(family: str, tmp_path: Path) -> tuple[Path, Any, PreparedVisionData]:
    """The tiny VLM of ``family``, its processor and :func:`visual_dataset` prepared with it (a quarter held out)."""
    snap = build_tiny_vlm(family, tmp_path / "hub")
    processor = load_processor(snap)
    data = prepare_vision_dataset(
        DataConfig(visual_dataset(tmp_path / "data"), eval_fraction=0.25), processor
    )
    return snap, processor, data


def _logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.double()


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_full_rank_emulator_reproduces_the_model(family: str, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    snap, processor, data = _tiny_vlm_and_data(family, tmp_path)
    calib = calibration_inputs(data.train, processor, 4)
    res = build_vlm_emulator(
        VlmEmulatorConfig(
            snap,
            tmp_path / "run" / "emulator",
            calib,
            ratio=0.5,
            device="cpu",
            compute_dtype="float32",
            full_rank=True,
        )
    )
    spec = vlm_spec(json.loads((snap / "config.json").read_text()))
    towers = {t.module_prefix: t for t in spec.towers}
    # every linear of every block of both towers is compressed; nothing else
    assert set(res.modules) == {
        t.module_name(b, m) for t in towers.values() for b in range(t.num_blocks) for m in t.linear_modules
    }
    emulator = load_vlm_emulator(res.emulator_dir)
    assert set(low_rank_modules(emulator)) == set(res.modules)
    original = AutoModelForImageTextToText.from_pretrained(snap, dtype=torch.float32).eval()
    inputs = calibration_inputs(data.eval, processor, 1)[0]
    ref, emu = _logits(original, inputs), _logits(emulator, inputs)
    assert torch.allclose(emu, ref, atol=1e-4, rtol=1e-4), (family, (emu - ref).abs().max().item())
    assert max(m["rel_error"] for m in res.modules.values()) < 1e-5


def test_low_rank_emulator_is_smaller_and_differs(tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    snap, processor, data = _tiny_vlm_and_data("qwen2_vl", tmp_path)
    calib = calibration_inputs(data.train, processor, 6)
    res = build_vlm_emulator(
        VlmEmulatorConfig(
            snap, tmp_path / "emu", calib, ratio=0.3, vision_ratio=0.6, device="cpu", compute_dtype="float32"
        )
    )
    assert res.params_kept < res.params_original
    vision = {n: m for n, m in res.modules.items() if ".visual." in n}
    language = {n: m for n, m in res.modules.items() if ".language_model." in n}
    assert vision and language
    assert {m["ratio"] for m in vision.values()} == {0.6} and {m["ratio"] for m in language.values()} == {0.3}
    # q/k/v of the decoder: k = floor(0.3·32·32/64) = 4
    assert language["model.language_model.layers.0.self_attn.q_proj"]["rank"] == 4
    assert all(0.0 < m["rel_error"] < 1.0 for m in res.modules.values())
    meta = json.loads((res.emulator_dir / "emloc.json").read_text())
    assert meta["kind"] == "vision-language" and (res.emulator_dir / "preprocessor_config.json").exists()
    emulator = load_vlm_emulator(res.emulator_dir)
    original = AutoModelForImageTextToText.from_pretrained(snap, dtype=torch.float32).eval()
    inputs = calibration_inputs(data.eval, processor, 1)[0]
    diff = (_logits(emulator, inputs) - _logits(original, inputs)).abs().max().item()
    assert 0.0 < diff < 50.0
