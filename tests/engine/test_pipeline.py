"""``emloc run``: every stage end to end on a tiny model, resume from the manifest, input guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from emloc_engine.cli.main import main
from emloc_engine.core.errors import Cancelled, ConfigError, RunStateError
from emloc_engine.core.progress import RecordingProgress
from emloc_engine.run.manifest import RunManifest
from emloc_engine.run.orchestrator import RunConfig, parse_lambda, run_pipeline


def _data(path: Path, n: int = 24, offset: int = 0) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(offset, offset + n):
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"Double {i}?"},
                                              {"role": "assistant", "content": f"{2 * i}."}]}) + "\n")
    return path


def _cfg(model: Path, data: Path, run: Path, **kw: object) -> RunConfig:
    base: dict[str, object] = dict(model_dir=model, data_path=data, run_dir=run, ratio=0.5, rank=4, alpha=8.0,
                                   steps=4, batch_size=2, calib=6, max_length=48, device="cpu",
                                   exports=("merged", "adapter"))
    base.update(kw)
    return RunConfig(**base)  # type: ignore[arg-type]


def test_parse_lambda() -> None:
    assert parse_lambda("auto") is None and parse_lambda(None) is None
    assert parse_lambda("inf") == float("inf") and parse_lambda("3") == 3.0
    with pytest.raises(ConfigError):
        parse_lambda("-1")
    with pytest.raises(ConfigError):
        parse_lambda("much")


def test_bad_settings_are_listed_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        RunConfig(model_dir=tmp_path, data_path=tmp_path, run_dir=tmp_path, ratio=1.5, rank=0,
                  exports=("zip",))
    assert len(exc.value.problems) == 3


@pytest.mark.slow
@pytest.mark.integration
def test_run_end_to_end_then_resume_then_guard(tiny_llama: Path, tmp_path: Path) -> None:
    data = _data(tmp_path / "d.jsonl")
    run = tmp_path / "run"
    rec = RecordingProgress()
    result = run_pipeline(_cfg(tiny_llama, data, run), rec)
    assert result.stages_run == ("emulator", "train", "correct", "export")
    assert result.lambda_ is not None and result.ratio == 0.5
    fractions = [f for f, _ in rec.updates]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # one bar over all stages, monotone
    assert rec.values("train/loss")
    m = RunManifest.open(run)
    assert all(m.is_done(s) for s in ("emulator", "train", "correct", "export"))
    assert m.data["settings"]["ratio"] == 0.5 and "plan" in m.data["settings"]
    assert "predicted_peak_gib" in m.stage("train") and "measured_peak_gib" in m.stage("train")
    assert m.stage("train")["result"]["anchor"] == "blocks"  # auto: the tiny model's offsets fit RAM
    # The corrected adapter on the original equals the merged folder.
    orig = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(orig, run / "adapter-corrected").eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    ids = torch.arange(10, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, merged(ids).logits, atol=1e-4)
    # Same command again: everything is skipped.
    again = run_pipeline(_cfg(tiny_llama, data, run))
    assert again.stages_run == () and again.stages_skipped == ("emulator", "train", "correct", "export")
    # Another dataset in the same folder is refused.
    with pytest.raises(RunStateError, match="different data"):
        run_pipeline(_cfg(tiny_llama, _data(tmp_path / "other.jsonl", offset=100), run))


@pytest.mark.slow
@pytest.mark.integration
def test_cancel_records_stage_and_cli_resumes(tiny_llama: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    data = _data(tmp_path / "d.jsonl")
    run = tmp_path / "run"
    rec = RecordingProgress(cancel_after_updates=8)
    with pytest.raises(Cancelled):
        run_pipeline(_cfg(tiny_llama, data, run, exports=()), rec)
    statuses = {k: v["status"] for k, v in RunManifest.open(run).data["stages"].items()}
    assert "cancelled" in statuses.values()
    code = main(["run", str(tiny_llama), str(data), "--out", str(run), "--ratio", "0.5", "--rank", "4",
                 "--alpha", "8", "--steps", "4", "--batch-size", "2", "--calib", "6", "--max-length", "48",
                 "--device", "cpu", "--export", ""])
    assert code == 0
    out = capsys.readouterr().out
    assert "Stages run:" in out and "ρ = 0.500" in out
    m = RunManifest.open(run)
    assert all(m.is_done(s) for s in ("emulator", "train", "correct"))


@pytest.mark.slow
@pytest.mark.integration
def test_run_with_two_training_processes(tiny_llama: Path, tmp_path: Path) -> None:
    """``emloc run --gpus 2`` trains data-parallel (gloo on the CPU here) and the run completes."""
    data = _data(tmp_path / "d.jsonl")
    result = run_pipeline(_cfg(tiny_llama, data, tmp_path / "run", exports=(), gpus=2, lambda_=0.0))
    assert result.stages_run == ("emulator", "train", "correct")
    m = RunManifest.open(tmp_path / "run")
    assert m.stage("train")["result"]["steps"] == 4
    assert (tmp_path / "run" / "adapter-corrected" / "adapter_model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_gguf_is_dropped_up_front_for_families_it_cannot_write(tmp_path: Path) -> None:
    """Phi-3 has no GGUF writer here: the run says so and still exports the merged folder and adapter,
    instead of failing after training."""
    from tests.tiny_models import build_tiny_model

    snap = build_tiny_model("phi3", tmp_path / "hub")
    result = run_pipeline(_cfg(snap, _data(tmp_path / "d.jsonl"), tmp_path / "run", steps=2, lambda_=0.0,
                               exports=("merged", "adapter", "gguf")))
    assert "gguf_path" not in result.exports and "merged_dir" in result.exports
    assert any("GGUF export skipped" in n and "phi3" in n for n in result.notes)
    assert RunManifest.open(tmp_path / "run").data["settings"]["exports"] == ["merged", "adapter"]


def test_run_reads_a_toml_file_and_the_command_line_wins(tmp_path: Path) -> None:
    from emloc_engine.cli.commands.run import apply_config_file
    from emloc_engine.cli.main import build_parser

    toml = tmp_path / "run.toml"
    toml.write_text('model = "m"\ndata = "d.jsonl"\nout = "runs/x"\nratio = 0.4\nrank = 8\n'
                    'lambda = "inf"\nexport = ["merged", "adapter"]\nmax-length = 256\n')
    args = apply_config_file(build_parser().parse_args(["run", "--config", str(toml), "--rank", "4"]))
    assert (args.model, args.data, args.out, args.ratio) == ("m", "d.jsonl", "runs/x", 0.4)
    assert args.rank == 4 and args.lambda_ == "inf" and args.export == "merged,adapter" and args.max_length == 256
    toml.write_text('model = "m"\nratoi = 0.4\n')
    with pytest.raises(ConfigError) as exc:
        apply_config_file(build_parser().parse_args(["run", "--config", str(toml)]))
    assert "'ratoi'" in str(exc.value)
    with pytest.raises(ConfigError, match="needs data, out"):
        apply_config_file(build_parser().parse_args(["run", "m"]))
