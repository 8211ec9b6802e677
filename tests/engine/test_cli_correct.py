"""``emloc correct RUN_DIR``: end to end on the tiny Llama, λ table, manifest record, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emloc_engine.cli.main import main
from emloc_engine.data.config import DataConfig
from emloc_engine.run.config import RunConfig
from emloc_engine.run.manifest import Manifest, StageRecord, read_manifest, write_manifest
from emloc_engine.weights.adapters import CORRECTION_META
from tests.emulator_factory import write_svd_emulator
from tests.lora_factory import write_random_adapter


def _dataset(path: Path, n: int = 24) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def run_dir(tiny_llama: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    write_svd_emulator(tiny_llama, run / "emulator", ratio=0.3)
    write_random_adapter(tiny_llama, run / "adapter", b_std=0.2)
    return run


def _stage(run: Path) -> StageRecord:
    manifest = read_manifest(run)
    assert manifest is not None
    return manifest.stage("correct")


@pytest.mark.slow
def test_auto_lambda_with_data(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _dataset(tmp_path / "chat.jsonl")
    assert main(["correct", str(run_dir), "--data", str(data), "--device", "cpu", "--max-length", "64"]) == 0
    out = capsys.readouterr().out
    assert "<- chosen" in out and "held-out loss" in out
    stage = _stage(run_dir)
    assert stage.status == "done"
    result = stage.result
    assert result["lambda_mode"] == "auto"
    assert [row[0] for row in result["lambda_table"]] == [0.0, 0.5, 1.0, 3.0, "inf"]
    meta = json.loads((run_dir / "adapter-corrected" / CORRECTION_META).read_text())
    assert meta["lambda"] == result["lambda_"] and len(meta["lambda_table"]) == 5
    assert (run_dir / "logs" / "emloc.log").exists()


def test_auto_lambda_uses_the_run_manifest_dataset(run_dir: Path, tmp_path: Path, tiny_llama: Path) -> None:
    data = _dataset(tmp_path / "chat.jsonl")
    cfg = RunConfig(model_dir=tiny_llama, data=DataConfig(path=data, max_length=64), run_dir=run_dir)
    write_manifest(Manifest(root=run_dir, config=cfg))
    assert main(["correct", str(run_dir), "--device", "cpu", "--max-eval-batches", "1"]) == 0
    assert _stage(run_dir).result["lambda_mode"] == "auto"


def test_fixed_lambda_then_overwrite(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["correct", str(run_dir), "--lambda", "inf", "--device", "cpu"]) == 0
    assert "λ = inf (fixed)" in capsys.readouterr().out
    assert _stage(run_dir).result["lambda_"] == "inf"
    assert main(["correct", str(run_dir), "--lambda", "3", "--device", "cpu"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _stage(run_dir).status == "failed"
    assert main(["correct", str(run_dir), "--lambda", "3", "--device", "cpu", "--overwrite"]) == 0
    assert json.loads((run_dir / "adapter-corrected" / CORRECTION_META).read_text())["lambda"] == 3.0


def test_corrected_adapter_as_input_is_refused(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run_dir / "adapter" / CORRECTION_META).write_text("{}")
    assert main(["correct", str(run_dir), "--lambda", "3", "--device", "cpu"]) == 2
    assert "already corrected" in capsys.readouterr().err
    assert not (run_dir / "adapter-corrected").exists()


@pytest.mark.parametrize("bad", ["-1", "abc", "nan"])
def test_bad_lambda(run_dir: Path, bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["correct", str(run_dir), f"--lambda={bad}"]) == 2
    assert "--lambda" in capsys.readouterr().err


def test_auto_without_data_explains(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["correct", str(run_dir), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "--lambda" in err


def test_help_mentions_auto(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["correct", "--help"])
    assert "auto" in capsys.readouterr().out
