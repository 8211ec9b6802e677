"""The original streamed block by block (emloc_engine.weights.streamed) gives what the resident original gives.

fp64 throughout, all five families: the anchors, the λ table and the export verification numbers of
the streamed path equal the resident path's to 1e-6 relative. And anchors computed a chunk at a time
(emloc_engine.stages.training.anchor_chunks) keep their RAM under the cap whatever the dataset size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from emloc_engine.stages.training.anchor_chunks import streamed_offsets
from emloc_engine.stages.training.anchoring import anchors_for_training
from emloc_engine.weights.lowrank import load_emulator
from emloc_engine.weights.streamed import StreamedModel, Variant
from tests.emulator_factory import write_svd_emulator
from tests.engine.test_training import examples

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


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
            _close(got[0][row, : len(s)], ref(input_ids=torch.tensor([s])).logits[0])


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


# ---------------------------------------------------------------------------------------------
# The λ search: every λ in one pass over the streamed original = the resident evaluator's table.


def _lambda_run(tmp_path: Path, model_dir: Path) -> Path:
    from tests.lora_factory import write_random_adapter

    run = tmp_path / "run"
    write_svd_emulator(model_dir, run / "emulator", ratio=0.3)
    write_random_adapter(model_dir, run / "adapter", b_std=0.2)
    return run


def _eval_examples(n: int = 5) -> tuple:
    from emloc_engine.data.render import Example

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = tuple(int(t) for t in torch.randint(4, 260, (8 + 3 * i,), generator=g))
        out.append(Example(ids, tuple(-100 if j < 3 else t for j, t in enumerate(ids))))
    return tuple(out)


GRID = (0.0, 0.3, 3.0, float("inf"))


def test_streamed_lambda_table_equals_the_resident_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    from emloc_engine.stages.correction.corrector import corrected_weights, prepare_adapter
    from emloc_engine.stages.correction.evaluation import AdapterEvaluator, streamed_losses
    from emloc_engine.weights.adapters import read_adapter

    run = _lambda_run(tmp_path, tiny_model_dir)
    adapter = read_adapter(run / "adapter")
    prepared = prepare_adapter(adapter, tiny_model_dir, run / "emulator", device=CPU)
    candidates = [
        {n: (c.lora_A, c.lora_B) for n, c in corrected_weights(prepared, lam).items()} for lam in GRID
    ]
    examples = _eval_examples()
    with AdapterEvaluator(
        tiny_model_dir, run / "adapter", examples, device=CPU, dtype=torch.float64, batch_size=2
    ) as ev:
        want = [ev.loss(c) for c in candidates]
    blocks: list[int] = []
    got, n_tokens = streamed_losses(
        tiny_model_dir,
        candidates,
        {n: m.scale for n, m in adapter.modules.items()},
        examples,
        device=CPU,
        dtype=torch.float64,
        batch_size=2,
        on_block=blocks.append,
    )
    assert n_tokens == ev.n_tokens and blocks == [0, 1]  # one pass: each block once for the whole grid
    assert len(set(want)) >= 3  # the candidates really differ
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-6)


def test_correction_stage_streams_the_original_when_asked(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from emloc_engine.stages.correction import corrector
    from emloc_engine.stages.correction.corrector import CorrectionConfig, correct_lora

    run = _lambda_run(tmp_path, tiny_llama)
    shutil.copytree(run, tmp_path / "run2")
    kw = dict(device="cpu", lambda_grid=GRID, eval_examples=_eval_examples(), eval_batch_size=2)
    resident = correct_lora(CorrectionConfig(run_dir=run, **kw))
    seen: list[int] = []
    real = corrector.streamed_losses

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["hidden_on_gpu_bytes"])
        return real(*args, **kwargs)

    monkeypatch.setattr(corrector, "streamed_losses", spy)
    # the planner's threshold (0: every hidden state in RAM) reaches the pass that places them
    streamed = correct_lora(CorrectionConfig(run_dir=tmp_path / "run2", stream_original=True, hidden_on_gpu_bytes=0,
                                             **kw))
    assert seen == [0]
    assert streamed.lambda_ == resident.lambda_
    for (lam_s, loss_s), (lam_r, loss_r) in zip(streamed.lambda_table, resident.lambda_table, strict=True):
        assert lam_s == lam_r and loss_s == pytest.approx(loss_r, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Export verification: the streamed numbers are the resident ones.


def _export_pair(
    model_dir: Path,
    tmp_path: Path,
    formats: tuple[str, ...],
    monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype = torch.float64,
) -> tuple:
    import shutil

    from emloc_engine.core.layout import RunLayout
    from emloc_engine.stages.export import exporter
    from emloc_engine.stages.export.exporter import ExportConfig, merge_and_export
    from tests.engine.export_helpers import make_adapter

    monkeypatch.setattr(exporter, "_verify_dtype", lambda _m, _d: dtype)
    run = tmp_path / "resident"
    make_adapter(model_dir, RunLayout(run).adapter_corrected)
    shutil.copytree(run, tmp_path / "streamed")
    resident = merge_and_export(ExportConfig(run_dir=run, model_dir=model_dir, formats=formats))
    streamed = merge_and_export(
        ExportConfig(
            run_dir=tmp_path / "streamed", model_dir=model_dir, formats=formats, stream_original=True
        )
    )
    return resident, streamed


def test_streamed_verification_equals_the_resident_one(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resident, streamed = _export_pair(tiny_model_dir, tmp_path, ("merged", "adapter"), monkeypatch)
    assert resident.adapter_effect > 0.1
    assert streamed.adapter_effect == pytest.approx(resident.adapter_effect, rel=1e-6)
    assert (
        [n for n, _ in streamed.verification]
        == [n for n, _ in resident.verification]
        == ["adapter", "merged"]
    )
    scale = resident.adapter_effect
    for (_, got), (_, want) in zip(streamed.verification, resident.verification, strict=True):
        assert abs(got - want) <= 1e-6 * scale  # both are rounding-sized: compare against the logits' scale
    assert [t for _, t in streamed.tolerances] == pytest.approx([t for _, t in resident.tolerances], rel=1e-6)


@pytest.mark.slow
def test_streamed_verification_of_a_gguf_export(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp32 with an f16 GGUF: the rounding floor and the GGUF's difference match the resident path."""
    resident, streamed = _export_pair(
        tiny_llama, tmp_path, ("merged", "adapter", "gguf"), monkeypatch, dtype=torch.float32
    )
    got, want = dict(streamed.verification), dict(resident.verification)
    assert set(got) == set(want) == {"adapter", "merged", "gguf"}
    assert got["gguf"] == pytest.approx(want["gguf"], rel=1e-3) and want["gguf"] > 1e-4
    assert dict(streamed.tolerances)["gguf"] == pytest.approx(dict(resident.tolerances)["gguf"], rel=1e-3)


# ---------------------------------------------------------------------------------------------
# Every stage of a run with the original streamed: the same run as the resident one.


@pytest.mark.slow
@pytest.mark.integration
def test_a_run_with_the_original_streamed_everywhere_equals_the_resident_run(
    tiny_llama: Path, tmp_path: Path
) -> None:
    import dataclasses

    from emloc_engine.core.progress import RecordingProgress
    from emloc_engine.run.manifest import read_manifest
    from emloc_engine.run.orchestrator import run_stages
    from emloc_engine.run.plan import plan_run
    from tests.engine.test_run_orchestrator import _cfg, _data

    data = _data(tmp_path / "d.jsonl")
    plans = {name: plan_run(_cfg(tiny_llama, data, tmp_path / name)) for name in ("resident", "streamed")}
    p = plans["streamed"]
    assert p.export is not None
    plans["streamed"] = dataclasses.replace(
        p,
        train=dataclasses.replace(p.train, stream_original=True),
        correct=dataclasses.replace(p.correct, stream_original=True),
        export=dataclasses.replace(p.export, stream_original=True),
    )
    results = {name: run_stages(plan, RecordingProgress()) for name, plan in plans.items()}
    assert results["streamed"].lambda_ == results["resident"].lambda_
    got, want = (read_manifest(tmp_path / n) for n in ("streamed", "resident"))
    assert got is not None and want is not None
    train_got, train_want = got.stage("train").result, want.stage("train").result
    assert train_got["anchor"] == train_want["anchor"] == "blocks"
    assert [v for _, v in train_got["loss_history"]] == pytest.approx(
        [v for _, v in train_want["loss_history"]], rel=1e-4
    )
    table_got, table_want = (m.stage("correct").result["lambda_table"] for m in (got, want))
    assert [r[1] for r in table_got] == pytest.approx([r[1] for r in table_want], rel=1e-4)
    assert got.stage("export").result["adapter_effect"] == pytest.approx(
        want.stage("export").result["adapter_effect"], rel=1e-4
    )
