"""``emloc train RUN_DIR DATA``: end to end on a tiny emulator, resume, restart, errors."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from emloc_engine.cli.main import main
from emloc_engine.run.manifest import read_manifest
from tests.emulator_factory import write_svd_emulator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def run_dir(tiny_llama: Path, tmp_path: Path) -> Path:
    write_svd_emulator(tiny_llama, tmp_path / "run" / "emulator", ratio=0.5)
    return tmp_path / "run"


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    rows = [{"prompt": f"Q{i}: what is {i}+{i}?", "completion": f" {2 * i}"} for i in range(8)]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ARGS = ["--steps", "4", "--rank", "4", "--alpha", "8", "--batch-size", "2", "--warmup-steps", "1",
        "--eval-every", "2", "--save-every", "2", "--device", "cpu", "--max-length", "64", "--targets", "q_proj",
        "v_proj", "down_proj"]


def test_train_end_to_end_then_resume_and_restart(run_dir: Path, data_file: Path, tiny_llama: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(run_dir), str(data_file), *ARGS]) == 0
    out = capsys.readouterr().out
    assert "4 steps; train loss" in out and "eval loss" in out and f"adapter: {run_dir / 'adapter'}" in out
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == str(tiny_llama)
    manifest = read_manifest(run_dir)
    assert manifest is not None
    record = manifest.stage("train")
    assert record.status == "done" and record.result["steps_done"] == 4
    assert len(record.result["loss_history"]) == 4
    assert manifest.inputs["data"].path == str(data_file)

    assert main(["train", str(run_dir), str(data_file), *ARGS]) == 0  # done already: resumes at the end
    assert "(resumed from step 4)" in capsys.readouterr().out
    assert main(["train", str(run_dir), str(data_file), *ARGS, "--steps", "6"]) == 0  # extend the run
    assert "6 steps (resumed from step 4)" in capsys.readouterr().out
    assert main(["train", str(run_dir), str(data_file), *ARGS, "--restart", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 steps; train loss")


def test_bad_settings_and_missing_emulator_exit_2(run_dir: Path, data_file: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(run_dir), str(data_file), "--rank", "0", "--lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert "LoRA rank must be at least 1" in err and "learning rate must be positive" in err
    assert main(["train", str(run_dir), str(data_file), *ARGS, "--targets", "u"]) == 2
    assert "'u'" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "nowhere"), str(data_file), "--device", "cpu"]) == 2
    assert "emloc build" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()


def test_ctrl_c_stops_at_step_boundary_with_checkpoint(run_dir: Path, data_file: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import emloc_engine.stages.training.trainer as training

    real, calls = training.lm_loss_sum, []

    def loss_then_ctrl_c(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:  # during step 2 (batch 2, no accumulation: one forward per step)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "lm_loss_sum", loss_then_ctrl_c)
    # Python's default handler, whatever this process inherited: a pytest started in the background
    # from a non-interactive shell begins with SIGINT ignored (and `emloc train` rightly restores that).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(["train", str(run_dir), str(data_file), *ARGS, "--save-every", "0", "--eval-every", "0"]) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after the run
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert "Stopping after this step" in capsys.readouterr().err
    assert (run_dir / "checkpoints" / "step-2" / "adapter_model.safetensors").exists()
    manifest = read_manifest(run_dir)
    assert manifest is not None and manifest.stage("train").status == "cancelled"
