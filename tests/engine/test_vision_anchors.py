"""Anchored VLM training: with a zero adapter the anchored emulator reproduces the original on its samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emloc_engine.data.vision_pipeline import prepare_vision_dataset
from emloc_engine.vision.anchors import AnchorsTooLarge, VlmAnchors, emulator_offsets, record_original
from emloc_engine.vision.emulator import load_vlm_emulator
from emloc_engine.vision.finetune import VlmTrainConfig, example_batch, train_vlm_lora
from tests.engine.test_vision_finetune import _setup
from tests.tiny_vlms import VLM_FAMILIES


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    batch = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**batch, use_cache=False).logits.double()


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_anchored_emulator_reproduces_the_original(family: str, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    snap, emu, data, processor = _setup(family, tmp_path)
    examples = prepare_vision_dataset(data, processor).train[:3]
    cpu = torch.device("cpu")

    def batch_of(i: int) -> dict:
        return example_batch(processor, examples[i], cpu, torch.float32)

    original = AutoModelForImageTextToText.from_pretrained(snap, dtype=torch.float32).eval()
    records = record_original(original, len(examples), batch_of, 2**30)
    ref = [_logits(original, batch_of(i)) for i in range(len(examples))]
    emulator = load_vlm_emulator(emu, dtype=torch.float32, device=cpu)
    plain = [_logits(emulator, batch_of(i)) for i in range(len(examples))]
    anchors = VlmAnchors(emulator_offsets(emulator, batch_of, records))
    assert not any(records)  # consumed
    with anchors.attached(emulator):
        got = []
        for i in range(len(examples)):
            anchors.select(i)
            got.append(_logits(emulator, batch_of(i)))
    scale = max(float(r.abs().max()) for r in ref)
    err = max(float((g - r).abs().max()) for g, r in zip(got, ref, strict=True))
    plain_err = max(float((p - r).abs().max()) for p, r in zip(plain, ref, strict=True))
    assert err <= 1e-4 * scale, (err, scale)
    assert plain_err > 100 * err  # the emulator alone is far from the original; anchored, it is the original
    # hooks come off: the bare emulator again
    assert torch.equal(_logits(emulator, batch_of(0)), plain[0])


def test_anchors_beyond_their_ram_are_refused_or_left_out(tmp_path: Path) -> None:
    snap, emu, data, _ = _setup("llava", tmp_path)
    kw = dict(steps=1, rank=4, alpha=8.0, device="cpu", dtype="float32", anchor_ram_gib=1e-9)
    with pytest.raises(AnchorsTooLarge, match="anchor-ram-gib"):
        train_vlm_lora(VlmTrainConfig(snap, emu, data, tmp_path / "a", anchor="blocks", **kw))  # type: ignore[arg-type]
    auto = train_vlm_lora(VlmTrainConfig(snap, emu, data, tmp_path / "b", anchor="auto", **kw))  # type: ignore[arg-type]
    assert auto.anchor == "none" and auto.anchor_note.startswith("not anchored")
    anchored = train_vlm_lora(
        VlmTrainConfig(snap, emu, data, tmp_path / "c", anchor="auto", **{**kw, "anchor_ram_gib": 1.0})  # type: ignore[arg-type]
    )
    assert anchored.anchor == "blocks" and anchored.steps_done == 1
    # anchored, the first loss (zero adapter) is the original's loss on that sample, not the emulator's
    assert anchored.losses[0] != auto.losses[0]
