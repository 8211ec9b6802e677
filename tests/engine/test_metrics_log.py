"""Metrics leave the run folder as TensorBoard event files and ``metrics.jsonl`` (``RUN_DIR/tensorboard/``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emloc_engine.core.progress import RecordingProgress
from emloc_engine.data.config import DataConfig
from emloc_engine.run.config import RunConfig
from emloc_engine.run.metrics_log import JSONL_NAME, MetricsWriter, RecordingMetrics, read_metrics
from emloc_engine.run.orchestrator import run_stages
from emloc_engine.run.plan import plan_run
from emloc_engine.stages.export.options import ExportOptions
from emloc_engine.stages.training.options import TrainOptions


def _data(path: Path, n: int = 16) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"Double {i}?"},
                            {"role": "assistant", "content": f"{2 * i}."},
                        ]
                    }
                )
                + "\n"
            )
    return path


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.integration
def test_a_tiny_run_writes_event_files_that_tensorboard_reads_back(tiny_llama: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = RunConfig(
        model_dir=tiny_llama,
        data=DataConfig(path=_data(tmp_path / "d.jsonl"), max_length=48),
        run_dir=run,
        ratio=0.5,
        calib=4,
        device="cpu",
        export=ExportOptions(formats=()),
        train=TrainOptions(rank=4, alpha=8.0, steps=3, batch_size=2, anchor="none"),
    )
    rec = RecordingProgress()
    run_stages(plan_run(cfg), rec, stages=("emulator", "train"))
    folder = run / "tensorboard"
    assert list(folder.glob("events.out.tfevents.*"))
    scalars = _scalars(folder)
    logged = [(s, v) for n, v, s in rec.metrics if n == "train/loss"]
    assert len(logged) == 3
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([v for _, v in logged], rel=1e-6)
    assert [s for s, _ in scalars["eval/loss"]] == [3]
    assert "train/lr" in scalars and "train/gpu/peak_gib" in scalars  # GPU memory carries its stage
    assert "emulator/rel_error" in scalars  # every stage's metrics, not only training's
    jsonl = read_metrics(folder)
    assert jsonl["train/loss"] == [(s, pytest.approx(v)) for s, v in logged]


def test_jsonl_without_tensorboard_and_last_value_of_a_step_wins(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path / "tb", tensorboard=False)
    progress = RecordingMetrics(RecordingProgress(), writer, "train")
    for step, value in ((1, 2.0), (2, 1.5), (2, 1.25), (3, float("nan"))):  # step 2 again: a resumed run
        progress.log("train/loss", value, step)
    writer.close()
    assert not list((tmp_path / "tb").glob("events.out.tfevents.*"))
    lines = [json.loads(x) for x in (tmp_path / "tb" / JSONL_NAME).read_text().splitlines()]
    assert lines[0]["stage"] == "train" and lines[0]["name"] == "train/loss" and lines[0]["step"] == 1
    assert lines[-1]["value"] is None  # NaN stays valid JSON
    assert read_metrics(tmp_path / "tb") == {"train/loss": [(1, 2.0), (2, 1.25)]}


def test_no_metrics_no_folder(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path / "tb")
    writer.close()
    assert not (tmp_path / "tb").exists() and read_metrics(tmp_path / "tb") == {}
