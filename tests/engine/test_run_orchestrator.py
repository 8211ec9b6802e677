"""``emloc run`` / ``run_stages``: every stage end to end on a tiny model, resume, the input and settings guards."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from emloc_engine.cli.main import main
from emloc_engine.core.errors import Cancelled, ConfigError, RunStateError
from emloc_engine.core.progress import RecordingProgress
from emloc_engine.data.config import DataConfig
from emloc_engine.machine.hardware import GpuInfo, MachineInfo
from emloc_engine.run.config import RunConfig
from emloc_engine.run.manifest import read_manifest
from emloc_engine.run.orchestrator import run_stages
from emloc_engine.run.plan import plan_run
from emloc_engine.stages.correction.options import CorrectionOptions
from emloc_engine.stages.export.options import ExportOptions
from emloc_engine.stages.training.options import TrainOptions

STAGES = ("emulator", "train", "correct", "export")


def _data(path: Path, n: int = 24, offset: int = 0) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(offset, offset + n):
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"Double {i}?"},
                                              {"role": "assistant", "content": f"{2 * i}."}]}) + "\n")
    return path


def _cfg(model: Path, data: Path, run: Path, *, exports: tuple[str, ...] = ("merged", "adapter"),
         steps: int = 4, lambda_: float | None = None, **kw: object) -> RunConfig:
    return RunConfig(model_dir=model, data=DataConfig(path=data, max_length=48), run_dir=run, ratio=0.5,
                     calib=6, device="cpu", train=TrainOptions(rank=4, alpha=8.0, steps=steps, batch_size=2),
                     correct=CorrectionOptions(lambda_=lambda_), export=ExportOptions(formats=exports),
                     **kw)  # type: ignore[arg-type]


def _run(cfg: RunConfig, progress: RecordingProgress | None = None, **kw: object):  # type: ignore[no-untyped-def]
    return run_stages(plan_run(cfg), progress or RecordingProgress(), **kw)  # type: ignore[arg-type]


def test_bad_settings_are_listed_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        RunConfig(model_dir=tmp_path, data=DataConfig(path=tmp_path), run_dir=tmp_path, ratio=1.5, gpus=0, calib=0)
    assert len(exc.value.problems) == 3


def test_export_stage_records_its_gpu_peak(tmp_path: Path) -> None:
    """The export's ``peak_vram_gib`` becomes the stage's measured peak in the manifest, as every stage's does."""
    from emloc_engine.run.orchestrator import export_record, open_run, run_stage
    from emloc_engine.stages.export.exporter import ExportResult

    run = tmp_path / "run"
    result = ExportResult(merged_dir=run / "merged", adapter_dir=None, gguf_path=None, verification=(),
                          peak_rss_gib=1.0, peak_vram_gib=2.5)
    with open_run(run) as session:
        run_stage(session, "export", lambda: result, predicted_peak_gib=3.0, result_json=export_record)
    rec = read_manifest(run).stage("export")  # type: ignore[union-attr]
    assert rec.measured_peak_gib == 2.5 and rec.predicted_peak_gib == 3.0
    assert rec.result["peak_vram_gib"] == 2.5


@pytest.mark.slow
@pytest.mark.integration
def test_run_end_to_end_then_resume_then_guard(tiny_llama: Path, tmp_path: Path) -> None:
    data = _data(tmp_path / "d.jsonl")
    run = tmp_path / "run"
    rec = RecordingProgress()
    result = _run(_cfg(tiny_llama, data, run), rec)
    assert result.stages_run == STAGES
    assert result.lambda_ is not None and result.ratio == 0.5
    fractions = [f for f, _ in rec.updates]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # one bar over all stages, monotone
    assert rec.values("train/loss")
    m = read_manifest(run)
    assert m is not None and all(m.stage(s).done for s in STAGES)
    assert m.config == _cfg(tiny_llama, data, run) and m.plan is not None and m.plan["ratio"] == 0.5
    assert m.stage("train").predicted_peak_gib is not None and m.stage("train").measured_peak_gib is not None
    assert m.stage("train").result["anchor"] == "blocks"  # auto: the tiny model's offsets fit RAM
    assert set(m.stage("export").result["paths"]) == {"merged_dir", "adapter_dir"}
    assert not (run / ".lock").exists()  # released
    # The corrected adapter on the original equals the merged folder.
    orig = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(orig, run / "adapter-corrected").eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    ids = torch.arange(10, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, merged(ids).logits, atol=1e-4)
    # Same settings again: everything is skipped, λ and exports come from the manifest.
    again = _run(_cfg(tiny_llama, data, run))
    assert again.stages_run == () and again.stages_skipped == STAGES
    assert again.lambda_ == result.lambda_ and again.exports == result.exports
    # Another dataset in the same folder is refused; so are other settings, each named.
    with pytest.raises(RunStateError, match="data"):
        _run(_cfg(tiny_llama, _data(tmp_path / "other.jsonl", offset=100), run))
    before = (run / "manifest.json").read_text()
    with pytest.raises(RunStateError) as exc:
        _run(replace(_cfg(tiny_llama, data, run, steps=8), train=TrainOptions(rank=2, alpha=8.0, steps=8,
                                                                              batch_size=2)))
    assert {p.split(":")[0] for p in exc.value.problems} == {"train.rank", "train.steps"}
    assert "--redo-from train" in str(exc.value.hint)
    assert (run / "manifest.json").read_text() == before  # a refused rerun changes nothing
    # Asked to redo from training: the emulator is kept, everything after it is redone with the new steps.
    redone = _run(_cfg(tiny_llama, data, run, steps=6), redo_from="train")
    assert redone.stages_skipped == ("emulator",) and redone.stages_run == ("train", "correct", "export")
    m = read_manifest(run)
    assert m is not None and m.config is not None and m.config.train.steps == 6
    assert m.stage("train").result["steps_done"] == 6


@pytest.mark.slow
@pytest.mark.integration
def test_cancel_records_stage_and_cli_resumes(tiny_llama: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    data = _data(tmp_path / "d.jsonl")
    run = tmp_path / "run"
    rec = RecordingProgress(cancel_after_updates=8)
    with pytest.raises(Cancelled):
        _run(_cfg(tiny_llama, data, run, exports=()), rec)
    m = read_manifest(run)
    assert m is not None and "cancelled" in {s.status for s in m.stages.values()}
    code = main(["run", str(tiny_llama), str(data), "--out", str(run), "--ratio", "0.5", "--rank", "4",
                 "--alpha", "8", "--steps", "4", "--batch-size", "2", "--calib", "6", "--max-length", "48",
                 "--device", "cpu", "--export", ""])
    assert code == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "Stages run:" in out and "ρ = 0.500" in out
    assert "Plan: ρ = 0.50 within a budget of" in captured.err and "the original is loaded whole" in captured.err
    m = read_manifest(run)
    assert m is not None and all(m.stage(s).done for s in ("emulator", "train", "correct"))


@pytest.mark.slow
@pytest.mark.integration
def test_run_with_two_training_processes(tiny_llama: Path, tmp_path: Path) -> None:
    """``emloc run --gpus 2`` trains data-parallel (gloo on the CPU here) and the run completes."""
    data = _data(tmp_path / "d.jsonl")
    result = _run(_cfg(tiny_llama, data, tmp_path / "run", exports=(), gpus=2, lambda_=0.0))
    assert result.stages_run == ("emulator", "train", "correct")
    m = read_manifest(tmp_path / "run")
    assert m is not None and m.stage("train").result["steps_done"] == 4
    assert (tmp_path / "run" / "adapter-corrected" / "adapter_model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_gguf_is_dropped_up_front_for_families_it_cannot_write(tmp_path: Path) -> None:
    """A Gemma 3 whose layer pattern llama.cpp cannot express has no GGUF: with the default exports the run says so and still exports the
    merged folder and adapter, instead of failing after training."""
    from tests.tiny_models import build_tiny_model

    snap = build_tiny_model("gemma3_text", tmp_path / "hub", head_dim=8, query_pre_attn_scalar=8, layer_types=["full_attention"] * 2)
    result = _run(_cfg(snap, _data(tmp_path / "d.jsonl"), tmp_path / "run", steps=2, lambda_=0.0,
                       exports=("merged", "adapter", "gguf")))
    assert "gguf_path" not in result.exports and "merged_dir" in result.exports
    assert any("GGUF export skipped" in n and "sliding-window" in n for n in result.notes)
    m = read_manifest(tmp_path / "run")
    assert m is not None and any("GGUF export skipped" in n for n in m.notes)


def test_bad_data_is_refused_before_the_folder_exists_and_binds_nothing(tiny_llama: Path, tmp_path: Path) -> None:
    """A run that never got past validation writes nothing, so fixing the data and rerunning works."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}\n', encoding="utf-8")  # broken line
    run = tmp_path / "run"
    with pytest.raises(Exception, match=r"d\.jsonl"):
        _run(_cfg(tiny_llama, data, run))
    assert not run.exists()


@pytest.mark.parametrize("where", ["model", "inside_model", "hf_cache"])
def test_run_folder_in_a_protected_place_is_refused_before_anything_is_written(
        tiny_llama: Path, tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _data(tmp_path / "d.jsonl")
    cache = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(cache))
    out = {"model": tiny_llama, "inside_model": tiny_llama / "run", "hf_cache": cache / "hub" / "run"}[where]
    before = sorted(p.name for p in tiny_llama.iterdir())
    assert main(["run", str(tiny_llama), str(data), "--out", str(out), "--ratio", "0.5", "--device", "cpu"]) == 2
    assert sorted(p.name for p in tiny_llama.iterdir()) == before
    assert not (out / "manifest.json").exists() and not (out / "logs").exists()


def test_toml_values_win_over_defaults_and_typed_options_win_over_toml(tmp_path: Path,
                                                                       tiny_llama: Path) -> None:
    from emloc_engine.cli.commands.run import config_from_args
    from emloc_engine.cli.main import build_parser

    data = _data(tmp_path / "d.jsonl")
    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "{tiny_llama}"\ndata = "{data}"\nout = "{tmp_path / "x"}"\nratio = 0.4\nrank = 8\n'
                    'lambda = "inf"\nexport = ["merged", "adapter"]\nmax-length = 256\nsteps = 50\n')
    # --steps 100 equals the default: typed, so it still wins over the file's 50.
    cfg = config_from_args(build_parser().parse_args(["run", "--config", str(toml), "--rank", "4",
                                                      "--steps", "100"]))
    assert cfg.ratio == 0.4 and cfg.train.rank == 4 and cfg.train.steps == 100
    assert cfg.correct.lambda_ == float("inf") and cfg.export.formats == ("merged", "adapter")
    assert cfg.data.max_length == 256
    toml.write_text('model = "m"\nratoi = 0.4\n')
    with pytest.raises(ConfigError) as exc:
        config_from_args(build_parser().parse_args(["run", "--config", str(toml)]))
    assert "'ratoi'" in str(exc.value.problems)
    with pytest.raises(ConfigError, match="DATA, --out"):
        config_from_args(build_parser().parse_args(["run", str(tiny_llama)]))


def _machine(*totals_gib: float) -> MachineInfo:
    gpus = tuple(GpuInfo(index=i, name=f"gpu{i}", total_bytes=int(t * 2**30), free_bytes=int(t * 2**30), used_bytes=0)
                 for i, t in enumerate(totals_gib))
    return MachineInfo(gpus=gpus, backend="cuda", cpu_cores=2, ram_total_bytes=24 * 2**30,
                       ram_available_bytes=20 * 2**30)


def test_the_plan_is_bounded_by_the_gpu_the_run_uses() -> None:
    from emloc_engine.run.plan import bounding_gpu

    machine = _machine(80, 24, 48)
    assert bounding_gpu(machine, "cuda:1", 1) == machine.gpus[1]  # the chosen card, not the first
    assert bounding_gpu(machine, "auto", 3) == machine.gpus[1]  # several: the smallest bounds every share
    assert bounding_gpu(machine, "auto", 1) == machine.gpus[0]
    assert bounding_gpu(machine, "cpu", 1) is None


def test_a_fixed_ratio_over_the_users_budget_is_planned_but_not_run(tiny_llama: Path, tmp_path: Path) -> None:
    """The budget is a promise: the plan shows that ρ does not fit (the app draws it), running it is refused."""
    from emloc_engine.core.errors import InsufficientMemory

    cfg = replace(_cfg(tiny_llama, _data(tmp_path / "d.jsonl"), tmp_path / "run"), device="auto",
                  ratio=0.9, budget_bytes=2**20)  # 1 MiB: nothing fits
    plan = plan_run(cfg, _machine(24))
    assert not plan.record.fits and plan.ratio == 0.9
    with pytest.raises(InsufficientMemory, match="does not fit the budget"):
        run_stages(plan)
    assert not (tmp_path / "run").exists()
