"""A vision-language run through the one orchestrator: ``run_stages`` / ``emloc run`` / ``emloc vlm``.

Same manifest, resume, settings guard and run folder as a text run; the export stage writes the
merged folder, the adapter and the language model's GGUF, and never an mmproj file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emloc_engine.cli.main import main
from emloc_engine.core.errors import Cancelled, DataError, RunStateError, UnsupportedModel
from emloc_engine.core.progress import RecordingProgress
from emloc_engine.data.config import DataConfig
from emloc_engine.run.config import RunConfig
from emloc_engine.run.history import exports_of, loss_curves, summarize_run
from emloc_engine.run.manifest import read_manifest
from emloc_engine.run.orchestrator import run_stages
from emloc_engine.run.plan import plan_run
from emloc_engine.stages.correction.options import CorrectionOptions
from emloc_engine.stages.export.options import ExportOptions
from emloc_engine.stages.training.options import TrainOptions
from tests.engine.test_vision_emulator import visual_dataset
from tests.tiny_vlms import build_tiny_vlm

STAGES = ("emulator", "train", "correct", "export")


def _cfg(
    model: Path,
    data: Path,
    run: Path,
    *,
    exports: tuple[str, ...] = ("merged", "adapter"),
    steps: int = 4,
    **kw: object,
) -> RunConfig:
    return RunConfig(
        model_dir=model,
        data=DataConfig(path=data, max_length=256, eval_fraction=0.25),
        run_dir=run,
        ratio=0.5,
        calib=4,
        device="cpu",
        train=TrainOptions(rank=4, alpha=8.0, steps=steps, batch_size=1, warmup_steps=1, save_every=2),
        correct=CorrectionOptions(lambda_=1.0),
        export=ExportOptions(formats=exports),
        **kw,
    )  # type: ignore[arg-type]


class _CancelAtStep(RecordingProgress):
    """Cancels once training has logged ``step`` (the next step's cancel check raises)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def check_cancelled(self) -> None:
        if any(n == "train/loss" and s >= self.step for n, _, s in self.metrics):
            raise Cancelled()


@pytest.mark.slow
@pytest.mark.integration
def test_vlm_run_end_to_end_cancel_resume_and_guard(tmp_path: Path) -> None:
    snap = build_tiny_vlm("llava", tmp_path / "hub")
    data = visual_dataset(tmp_path / "data")
    run = tmp_path / "run"
    plan = plan_run(_cfg(snap, data, run, exports=("merged", "adapter", "gguf")))
    assert plan.vision is not None and plan.exports == ("merged", "adapter", "gguf")
    assert any("mmproj" in n for n in plan.notes)  # the GGUF is the language model only, and says so
    with pytest.raises(Cancelled):  # cancelled after step 2 of 4 (a checkpoint was saved at step 2)
        run_stages(plan, _CancelAtStep(2))
    m = read_manifest(run)
    assert m is not None and m.stage("emulator").done and m.stage("train").status == "cancelled"
    assert (run / "checkpoints" / "step-2" / "state.pt").is_file()
    rec = RecordingProgress()
    result = run_stages(plan, rec)  # the same run again: resumes training from step 2
    assert result.stages_skipped == ("emulator",) and result.stages_run == ("train", "correct", "export")
    fractions = [f for f, _ in rec.updates]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    m = read_manifest(run)
    assert m is not None and all(m.stage(s).done for s in STAGES)
    train = m.stage("train").result
    assert train["resumed_from"] == 2 and train["steps_done"] == 4 and len(train["loss_history"]) == 4
    assert result.lambda_ == 1.0 and result.final_eval_loss == train["final_eval_loss"]
    assert set(result.exports) == {"merged_dir", "adapter_dir", "gguf_path"}
    verified = dict(map(tuple, m.stage("export").result["verification"]))  # type: ignore[arg-type]
    assert set(verified) == {"merged", "gguf"}
    assert not list(run.glob("*mmproj*")) and not list(run.glob("*.partial"))
    # the run history shows it like a text run
    summary = summarize_run(run)
    assert summary.status == "finished" and summary.final_train_loss == train["loss_history"][-1][1]
    assert summary.ratio == 0.5 and set(exports_of(run)) >= {"merged", "gguf"}
    assert [s for s, _ in loss_curves(run)["train/loss"]] == [1, 2, 3, 4]
    # the same settings again: nothing to do; other settings: refused, each named
    again = run_stages(plan_run(_cfg(snap, data, run, exports=("merged", "adapter", "gguf"))))
    assert again.stages_run == () and again.stages_skipped == STAGES
    with pytest.raises(RunStateError) as exc:
        run_stages(plan_run(_cfg(snap, data, run, steps=6, exports=("merged", "adapter", "gguf"))))
    assert [p.split(":")[0] for p in exc.value.problems] == ["train.steps"]


@pytest.mark.slow
def test_the_gguf_holds_the_language_model_as_its_text_family(tmp_path: Path) -> None:
    """model.gguf of a LLaVA run is a Llama file whose tensors are the merged language model's."""
    import gguf
    from safetensors.torch import load_file

    from emloc_engine.stages.export.gguf_readback import gguf_state_dict
    from emloc_engine.vision.export import write_language_model

    snap = build_tiny_vlm("llava", tmp_path / "hub")
    lm = write_language_model(snap, tmp_path / "lm")
    tensors = {k: v for f in lm.glob("*.safetensors") for k, v in load_file(f).items()}
    assert "model.layers.0.self_attn.q_proj.weight" in tensors and "lm_head.weight" in tensors
    assert not any("vision" in k or "projector" in k for k in tensors)
    from emloc_engine.stages.export.gguf_export import GgufConfig, export_gguf

    out = export_gguf(GgufConfig(lm, tmp_path / "model.gguf", "f32"))
    reader = gguf.GGUFReader(str(out.path))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    back = gguf_state_dict(out.path, lm)
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert torch.equal(back[k], t.float()), k


def test_vlm_exports_are_decided_before_any_work(tmp_path: Path) -> None:
    data = visual_dataset(tmp_path / "data", n=4)

    def plan(model: Path, run: str, formats: tuple[str, ...] | None = None) -> object:
        export = ExportOptions() if formats is None else ExportOptions(formats=formats)
        cfg = RunConfig(
            model_dir=model,
            data=DataConfig(path=data),
            run_dir=tmp_path / run,
            ratio=0.5,
            device="cpu",
            export=export,
        )
        return plan_run(cfg)

    qwen = build_tiny_vlm("qwen2_vl", tmp_path / "hub")
    # default exports: the GGUF of a Qwen2-VL is dropped with a note naming the family and the fix
    planned = plan(qwen, "r1")
    assert planned.exports == ("merged", "adapter")  # type: ignore[attr-defined]
    assert any("qwen2_vl" in n and "convert_hf_to_gguf" in n for n in planned.notes)  # type: ignore[attr-defined]
    # asked for explicitly: refused, before the run folder exists
    with pytest.raises(UnsupportedModel, match="qwen2_vl") as exc:
        plan(qwen, "r2", ("gguf",))
    assert "M-RoPE" in str(exc.value)
    llava = build_tiny_vlm("llava", tmp_path / "hub")
    for fmt in ("ollama", "adapter-gguf", "lmstudio"):
        with pytest.raises(UnsupportedModel, match="without its vision part"):
            plan(llava, "r3", (fmt,))
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


def test_bad_images_are_refused_before_the_folder_exists(tmp_path: Path) -> None:
    snap = build_tiny_vlm("llava", tmp_path / "hub")
    data = visual_dataset(tmp_path / "data", n=4)
    (tmp_path / "data" / "img" / "2.png").unlink()
    with pytest.raises(DataError) as exc:
        run_stages(plan_run(_cfg(snap, data, tmp_path / "run")))
    assert any("colours.jsonl:3" in p for p in exc.value.problems)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_cli_run_and_its_vlm_alias(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    snap = build_tiny_vlm("gemma3", tmp_path / "hub")
    data = visual_dataset(tmp_path / "data")
    out = tmp_path / "run"
    argv = [
        str(snap),
        str(data),
        "--out",
        str(out),
        "--steps",
        "2",
        "--device",
        "cpu",
        "--calib",
        "4",
        "--rank",
        "4",
        "--lambda",
        "1.0",
        "--max-length",
        "256",
        "--ratio",
        "0.5",
        "--batch-size",
        "1",
        "--export",
        "merged",
    ]
    assert main(["run", *argv]) == 0
    assert "merged_dir:" in capsys.readouterr().out and (out / "merged" / "config.json").exists()
    built = (out / "emulator" / "emloc.json").stat().st_mtime_ns
    # `emloc vlm` is `emloc run`: the same options, the same guard, the same --redo-from
    assert main(["vlm", *argv[:5], "3", *argv[6:]]) == 2  # more steps in a finished folder: refused, named
    assert "train.steps: 2 → 3" in capsys.readouterr().err
    assert main(["vlm", *argv[:5], "3", *argv[6:], "--redo-from", "train"]) == 0
    assert (out / "emulator" / "emloc.json").stat().st_mtime_ns == built  # the emulator is kept
    m = read_manifest(out)
    assert m is not None and m.stage("train").result["steps_done"] == 3
    # a per-stage export adds a format to the finished run (the manifest lists both)
    assert main(["export", str(out), "--export", "adapter"]) == 0
    m = read_manifest(out)
    assert m is not None and set(m.stage("export").result["paths"]) == {"merged_dir", "adapter_dir"}
