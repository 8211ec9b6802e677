"""What a VLM training step keeps for its backward pass: the block inputs of both towers, not their activations.

Measured on one training step of a tiny Qwen2.5-VL (4 decoder blocks, 4 vision blocks, 64 patches and 16
image tokens per image): ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor autograd saves for
the backward, and when ``backward()`` starts we add up those still alive (each storage once, parameters
excluded), attributing to the vision tower what was saved while the tower's forward ran. The scale is the
block inputs ``Σ blocks · tokens · width · 4 B`` that activation checkpointing keeps.

Measured: ~1.4× that scale with checkpointing (block inputs, a few norms, the projector), ~20× without
it and with full-vocabulary logits (the code before this test); on Qwen2.5-VL-7B shapes that was a 37 GiB
training peak for a model whose inference peak is 16. A vision tower kept dense (no LoRA) holds nothing:
with transformers' input-embedding hooks left on it held its block inputs for a useless backward.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from emloc_engine.data.config import DataConfig
from emloc_engine.data.render import IGNORE_INDEX
from emloc_engine.data.vision_pipeline import prepare_vision_dataset
from emloc_engine.vision.emulator import VlmEmulatorConfig, build_vlm_emulator, calibration_inputs
from emloc_engine.vision.finetune import VlmTrainConfig, loss_sum, train_vlm_lora
from emloc_engine.vision.processor import load_processor
from tests.tiny_vlms import VLM_FAMILIES, build_tiny_vlm, write_png

LAYERS = 4


def _deeper(config: Any) -> None:
    config.text_config.num_hidden_layers = LAYERS
    config.text_config.layer_types = ["full_attention"] * LAYERS
    config.vision_config.depth = LAYERS
    config.vision_config.fullatt_block_indexes = [LAYERS - 1]


def _is_vision_tower(module: torch.nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel) and "Vision" in type(module).__name__


class _Saved:
    """One tensor autograd saved for the backward; it lives as long as the graph that needs it."""

    __slots__ = ("__weakref__", "tensor", "tower")

    def __init__(self, tensor: torch.Tensor, tower: str) -> None:
        self.tensor, self.tower = tensor, tower


@contextmanager
def saved_at_backward(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, int]]]:
    """Bytes the autograd graph holds when each ``backward()`` starts, by tower ("vision", "language"):
    tensors saved for the backward that are still alive (a graph nobody needs is freed at once), each
    storage counted once, parameters excluded (resident anyway)."""
    live: weakref.WeakSet[_Saved] = weakref.WeakSet()
    params: set[int] = set()  # storages of the weights the forward used
    where = ["language"]
    at_backward: list[dict[str, int]] = []

    def enter(module: torch.nn.Module, args: Any) -> None:
        params.update(p.untyped_storage().data_ptr() for p in module.parameters(recurse=False))
        if _is_vision_tower(module):
            where.append("vision")

    def leave(module: torch.nn.Module, args: Any, out: Any) -> None:
        if _is_vision_tower(module):
            where.pop()

    def pack(t: torch.Tensor) -> _Saved:
        held = _Saved(t, where[-1])
        live.add(held)
        return held

    backward = torch.Tensor.backward

    def measured_backward(self: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        storages = {s.tensor.untyped_storage().data_ptr(): s for s in list(live)}
        totals: dict[str, int] = {}
        for ptr, s in storages.items():
            if ptr not in params:
                totals[s.tower] = totals.get(s.tower, 0) + s.tensor.untyped_storage().nbytes()
        at_backward.append(totals)
        backward(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", measured_backward)
    hooks = [
        torch.nn.modules.module.register_module_forward_pre_hook(enter),
        torch.nn.modules.module.register_module_forward_hook(leave),
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda held: held.tensor):
            yield at_backward
    finally:
        for h in hooks:
            h.remove()


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DataConfig, int, int]:
    """A deeper tiny Qwen2.5-VL, four samples with a 112² image; (model, data, tokens, patches) per sample."""
    tmp = tmp_path_factory.mktemp("vlm-memory")
    snap = build_tiny_vlm("qwen2_5_vl", tmp / "hub", tweak=_deeper)
    pre = json.loads((snap / "preprocessor_config.json").read_text(encoding="utf-8"))
    pre["size"] = {"shortest_edge": 112 * 112, "longest_edge": 112 * 112}  # 64 patches, 16 image tokens
    (snap / "preprocessor_config.json").write_text(json.dumps(pre), encoding="utf-8")
    rows = []
    for i in range(4):
        write_png(tmp / "data" / f"{i}.png", size=112, count=1 + i % 3)
        rows.append(
            {
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour?"},
                    {"from": "gpt", "value": "red"},
                ],
            }
        )
    (tmp / "data" / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = DataConfig(tmp / "data" / "d.jsonl", eval_fraction=0.25)
    processor = load_processor(snap)
    train = prepare_vision_dataset(data, processor).train
    patches = int(calibration_inputs(train, processor, 1)[0]["pixel_values"].shape[0])
    return snap, data, max(len(e) for e in train), patches


@pytest.mark.parametrize(("vision_ratio", "checkpointing"), [(0.5, True), (1.0, True), (0.5, False)])
def test_a_training_step_keeps_block_inputs_not_activations(
    vlm: tuple[Path, DataConfig, int, int],
    vision_ratio: float,
    checkpointing: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    snap, data, tokens, patches = vlm
    processor = load_processor(snap)
    train = prepare_vision_dataset(data, processor).train
    emu = build_vlm_emulator(
        VlmEmulatorConfig(
            snap,
            tmp_path / "emulator",
            calibration_inputs(train, processor, 2),
            ratio=0.5,
            vision_ratio=vision_ratio,
            device="cpu",
            compute_dtype="float32",
        )
    ).emulator_dir
    cfg = VlmTrainConfig(
        snap,
        emu,
        data,
        tmp_path / "run",
        steps=1,
        rank=4,
        alpha=8,
        device="cpu",
        dtype="float32",
        grad_checkpointing=checkpointing,
    )
    with saved_at_backward(monkeypatch) as backwards:
        res = train_vlm_lora(cfg)  # one step: one forward + backward, then the evaluation without grad
    assert res.steps_done == 1 and len(backwards) == 1
    saved = backwards[0]
    width = 32  # both towers of the tiny models
    block_inputs = LAYERS * tokens * width * 4 + LAYERS * patches * width * 4
    if not checkpointing:  # the setting is honoured: every block's activations are kept (~18×)
        assert sum(saved.values()) > 8 * block_inputs and saved["vision"] > 8 * LAYERS * patches * width * 4
        return
    assert sum(saved.values()) < 2 * block_inputs, (saved, block_inputs)
    if vision_ratio == 1.0:  # a dense (not adapted) vision tower builds no autograd graph at all
        assert saved.get("vision", 0) == 0, saved
    else:  # an adapted tower is checkpointed too
        assert saved.get("vision", 0) < 2 * LAYERS * patches * width * 4, saved


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_chunked_loss_equals_the_models_own_loss(family: str, tmp_path: Path) -> None:
    """The head on label positions in chunks (every family's ``.model`` + ``lm_head``) = the model's loss."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    snap = build_tiny_vlm(family, tmp_path / "hub")
    processor = load_processor(snap)
    model = AutoModelForImageTextToText.from_pretrained(snap, dtype=torch.float32).train()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour? " * 8}]}]
    text = processor.tokenizer.apply_chat_template(
        msgs, chat_template=processor.chat_template, tokenize=False
    )
    image = Image.open(write_png(tmp_path / "a.png")).convert("RGB")
    batch = dict(processor(text=[text], images=[image], return_tensors="pt"))
    labels = batch["input_ids"].clone()
    labels[:, : labels.shape[1] // 2] = IGNORE_INDEX
    expected = model(**batch, labels=labels, use_cache=False).loss * int(
        (labels[:, 1:] != IGNORE_INDEX).sum()
    )
    got, n = loss_sum(model, dict(batch, labels=labels))
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum()) > 0
    assert torch.allclose(got, expected, rtol=1e-5), (got.item(), expected.item())
    with torch.no_grad():
        assert torch.allclose(loss_sum(model, dict(batch, labels=labels))[0], expected, rtol=1e-5)
