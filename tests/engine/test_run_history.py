"""Run history from manifests: status in plain words, final losses, exports, curves, listing and deleting."""

from __future__ import annotations

from pathlib import Path

import pytest

from emloc_engine.core.errors import RunStateError
from emloc_engine.data.config import DataConfig
from emloc_engine.run.config import RunConfig
from emloc_engine.run.history import delete_run, display_name, find_runs, loss_curves, summarize_run
from emloc_engine.run.lock import run_folder_lock
from emloc_engine.run.manifest import Manifest, StageRecord, write_manifest
from emloc_engine.run.metrics_log import MetricsWriter

MODEL = "/home/u/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/abc"


def make_run(
    root: Path, stages: dict[str, StageRecord], *, created: str = "2026-12-01T10:00:00+00:00"
) -> Path:
    cfg = RunConfig(
        model_dir=Path(MODEL), data=DataConfig(path=Path("/data/shakespeare.jsonl")), run_dir=root, ratio=0.4
    )
    m = Manifest(root=root, config=cfg, stages=stages, created=created)
    root.mkdir(parents=True, exist_ok=True)
    write_manifest(m)
    return root


def done(**result: object) -> StageRecord:
    return StageRecord(status="done", result=dict(result))


def test_finished_run_with_losses_and_exports(tmp_path: Path) -> None:
    run = make_run(
        tmp_path / "a",
        {
            "emulator": done(),
            "correct": done(),
            "train": done(loss_history=[[1, 2.5], [2, 2.0]], final_eval_loss=2.25),
        },
    )
    (run / "model.gguf").write_bytes(b"GGUF")
    (run / "merged").mkdir()  # an export cut off before config.json: not listed
    s = summarize_run(run)
    assert s.status == "finished" and s.status_text() == "finished" and s.stage is None
    assert s.model == "HuggingFaceTB/SmolLM2-135M" and s.data == "shakespeare.jsonl" and s.ratio == 0.4
    assert (s.final_train_loss, s.final_eval_loss) == (2.0, 2.25)
    assert s.exports == {"gguf": str(run / "model.gguf")}
    assert s.stages_done == ("emulator", "train", "correct")
    assert loss_curves(run) == {"train/loss": [(1, 2.5), (2, 2.0)]}


def test_stopped_failed_interrupted_and_running(tmp_path: Path) -> None:
    stopped = make_run(tmp_path / "stopped", {"emulator": done(), "train": StageRecord(status="cancelled")})
    writer = MetricsWriter(stopped / "tensorboard", tensorboard=False)
    for step, loss in ((1, 3.0), (2, 2.5)):
        writer.log("train", "train/loss", loss, step)
    writer.close()
    s = summarize_run(stopped)
    assert (
        s.status_text() == "stopped at training" and s.final_train_loss == 2.5 and s.final_eval_loss is None
    )
    assert loss_curves(stopped) == {"train/loss": [(1, 3.0), (2, 2.5)]}  # a stopped run's curve, from metrics
    failed = make_run(
        tmp_path / "failed",
        {
            "emulator": done(),
            "train": done(),
            "correct": StageRecord(status="failed", message="Out of memory."),
        },
    )
    assert summarize_run(failed).status_text() == "failed at correction"
    assert summarize_run(failed).message == "Out of memory."
    crashed = make_run(tmp_path / "crashed", {"emulator": StageRecord(status="running")})
    assert summarize_run(crashed).status_text() == "stopped at building the emulator"
    with run_folder_lock(crashed):
        assert summarize_run(crashed).status == "running"
    assert (
        make_run(tmp_path / "new", {})
        and summarize_run(tmp_path / "new").status_text() == "stopped at building the emulator"
    )


def test_find_runs_lists_each_run_once_newest_first(tmp_path: Path) -> None:
    parent = tmp_path / "runs"
    old = make_run(parent / "old", {}, created="2026-11-01T10:00:00+00:00")
    new = make_run(parent / "new", {}, created="2026-12-02T10:00:00+00:00")
    elsewhere = make_run(tmp_path / "elsewhere", {}, created="2026-11-15T10:00:00+00:00")
    (parent / "not-a-run").mkdir()
    broken = parent / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    runs = find_runs([parent, tmp_path / "missing"], [elsewhere, new, tmp_path / "gone"])
    assert [r.run_dir.name for r in runs if r.status != "unreadable"] == ["new", "elsewhere", "old"]
    assert [r.status for r in runs if r.run_dir == broken] == ["unreadable"]
    assert len(runs) == 4 and old.exists()


def test_delete_only_run_folders_not_in_use(tmp_path: Path) -> None:
    plain = tmp_path / "photos"
    plain.mkdir()
    (plain / "manifest.json").write_text('{"something": "else"}')
    with pytest.raises(RunStateError, match="not an EMLoC manifest"):
        delete_run(plain)
    with pytest.raises(RunStateError, match="not an EMLoC run folder"):
        delete_run(tmp_path)
    run = make_run(tmp_path / "run", {"emulator": done()})
    with run_folder_lock(run), pytest.raises(RunStateError, match="in use"):
        delete_run(run)
    delete_run(run)
    assert not run.exists() and plain.exists()


def test_display_names() -> None:
    assert display_name(MODEL) == "HuggingFaceTB/SmolLM2-135M"
    assert display_name("/x/datasets--org--chat/snapshots/1/data") == "org/chat"
    assert display_name("/data/d.jsonl") == "d.jsonl" and display_name("") == "?"


def test_exports_made_one_at_a_time_are_all_listed(tmp_path: Path) -> None:
    from emloc_engine.run.orchestrator import open_run, run_stage

    run = make_run(tmp_path / "run", {"emulator": done(), "train": done(), "correct": done()})
    adapter = run / "adapter-corrected"
    adapter.mkdir()
    with open_run(run) as session:  # as the Try page exports: the adapter, then the GGUF
        run_stage(
            session, "export", lambda: None, result_json=lambda _: {"paths": {"adapter_dir": str(adapter)}}
        )
        (run / "model.gguf").write_bytes(b"GGUF")
        run_stage(
            session,
            "export",
            lambda: None,
            result_json=lambda _: {"paths": {"gguf_path": str(run / "model.gguf")}},
        )
    assert summarize_run(run).exports == {"adapter": str(adapter), "gguf": str(run / "model.gguf")}
