"""``emloc image``: every stage end to end, stopped and resumed; settings that would mix runs are refused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from emloc_engine.cli.main import main
from emloc_engine.core.errors import ConfigError
from emloc_engine.images.pipelines import PipelineInfo
from emloc_engine.images.run import ImageRunConfig, run_images
from tests.engine.images.conftest import SEQ


def _cfg(info: PipelineInfo, images: Path, run: Path, **kw: object) -> ImageRunConfig:
    base: dict[str, object] = dict(
        min_side_px=16,
        resolution=32,
        max_sequence_length=SEQ,
        steps=4,
        rank=4,
        lr=1e-3,
        checkpoint_every=2,
        sample_every=2,
        sample_steps=2,
        calibration_images=2,
        calibration_timesteps=2,
        device="cpu",
    )
    base.update(kw)
    return ImageRunConfig(info.folder, images, run, trigger="sks", **base)  # type: ignore[arg-type]


def test_run_stops_and_resumes_to_the_same_adapters(
    pipelines: dict[str, PipelineInfo], subject_dir: Path, tmp_path: Path
) -> None:
    info = pipelines["sd3"]
    whole = run_images(_cfg(info, subject_dir, tmp_path / "a"))
    assert whole.finished and whole.kind == "sd3" and len(whole.lambda_table) == 4
    part = run_images(_cfg(info, subject_dir, tmp_path / "b", stop_after=2))
    assert not part.finished and part.steps_done == 2 and not (tmp_path / "b" / "adapter-corrected").exists()
    rest = run_images(_cfg(info, subject_dir, tmp_path / "b"))
    assert rest.finished and rest.lam == whole.lam and rest.losses == pytest.approx(whole.losses, rel=1e-5)
    for sub in ("adapter", "adapter-corrected"):
        a, b = (
            load_file(str(r / sub / "adapter_model.safetensors")) for r in (tmp_path / "a", tmp_path / "b")
        )
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    meta = json.loads((tmp_path / "b" / "cache" / "cache.json").read_text())
    assert [it["split"] for it in meta["items"]].count("eval") == 1  # 6 images: one held out
    assert sorted(p.name for p in (tmp_path / "b" / "samples").iterdir()) == ["step-2", "step-4"]
    with pytest.raises(ConfigError, match="other settings"):
        run_images(_cfg(info, subject_dir, tmp_path / "b", ratio=0.3))


def test_cli(
    pipelines: dict[str, PipelineInfo], subject_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "image",
        str(pipelines["sdxl"].folder),
        str(subject_dir),
        "--trigger",
        "sks",
        "--out",
        str(tmp_path / "run"),
        "--min-side-px",
        "16",
        "--resolution",
        "32",
        "--steps",
        "2",
        "--rank",
        "4",
        "--sample-every",
        "0",
        "--calibration-images",
        "2",
        "--lam",
        "inf",
        "--device",
        "cpu",
        "--anchor",
        "blocks",
        "--sample-prompts",
        "sks circle",
        "a dog",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "λ = inf" in out and "adapter-corrected" in out
    recorded = json.loads((tmp_path / "run" / "image_run.json").read_text())
    assert recorded["anchor"] == "blocks"
    assert float(recorded["stats_budget_gib"]) >= 4.0  # --ratio auto: the plan's statistics budget reaches the run
    assert json.loads((tmp_path / "run" / "cache" / "cache.json").read_text())["sample_prompts"] == [
        "sks circle",
        "a dog",
    ]
    assert main(["image", str(tmp_path), str(subject_dir), "--out", str(tmp_path / "r2")]) == 2


def test_prior_preservation_and_data_problems(
    pipelines: dict[str, PipelineInfo], subject_dir: Path, tmp_path: Path
) -> None:
    from emloc_engine.core.errors import DataError
    from tests.tiny_pipelines import write_subject_images

    info = pipelines["flux"]
    with pytest.raises(DataError, match="smaller than 64"):
        run_images(_cfg(info, subject_dir, tmp_path / "run", min_side_px=64))
    assert not (tmp_path / "run" / "image_run.json").exists()  # nothing recorded: any setting may change
    classes = tmp_path / "classes"
    write_subject_images(classes, 3, shape="square", colour=2, captions=False)
    with_prior = run_images(
        _cfg(
            info,
            subject_dir,
            tmp_path / "run",
            class_dir=classes,
            class_prompt="a square",
            steps=2,
            sample_every=0,
        )
    )
    without = run_images(_cfg(info, subject_dir, tmp_path / "plain", steps=2, sample_every=0))
    meta = json.loads((tmp_path / "run" / "cache" / "cache.json").read_text())
    class_items = [it for it in meta["items"] if it["split"] == "class"]
    assert len(class_items) == 3 and {meta["prompts"][it["caption"]] for it in class_items} == {"a square"}
    assert with_prior.finished and with_prior.losses[0] != pytest.approx(without.losses[0])


def test_a_run_folder_in_use_is_refused_and_left_alone(
    pipelines: dict[str, PipelineInfo], subject_dir: Path, tmp_path: Path
) -> None:
    """The Runs page (or a second ``emloc image``) sees a running image run through the folder's lock."""
    from emloc_engine.core.errors import RunStateError
    from emloc_engine.run.history import delete_run
    from emloc_engine.run.lock import run_folder_lock

    run = tmp_path / "r"
    with run_folder_lock(run):
        with pytest.raises(RunStateError, match="in use"):
            run_images(_cfg(pipelines["sd3"], subject_dir, run))
        with pytest.raises(RunStateError):
            delete_run(run)
    assert run.is_dir() and not (run / "cache").exists()


def test_a_single_file_runs_with_its_pipeline_folder_and_keeps_it(
    pipelines: dict[str, PipelineInfo], subject_dir: Path, tmp_path: Path
) -> None:
    """``pipeline_dir`` = one file, ``config_dir`` = a FLUX.1 folder: its denoiser is converted into the run folder;
    a folder of another family is refused before anything is written, and a resume must keep the folder."""
    import shutil

    from safetensors.torch import save_file

    flux = pipelines["flux"]
    single = tmp_path / "my-flux.safetensors"
    save_file(load_file(str(next(flux.denoiser_dir.glob("*.safetensors")))), str(single))
    wrong = replace(
        _cfg(flux, subject_dir, tmp_path / "wrong"), pipeline_dir=single, config_dir=pipelines["sdxl"].folder
    )
    with pytest.raises(
        ConfigError, match=r"is an SDXL pipeline; my-flux\.safetensors is a FLUX\.1 checkpoint"
    ):
        run_images(wrong)
    assert not (tmp_path / "wrong" / "denoiser").exists()
    cfg = replace(
        _cfg(flux, subject_dir, tmp_path / "run", stop_after=1), pipeline_dir=single, config_dir=flux.folder
    )
    part = run_images(cfg)
    assert part.steps_done == 1 and (tmp_path / "run" / "denoiser" / "config.json").is_file()
    other = shutil.copytree(flux.folder, tmp_path / "flux-copy")
    with pytest.raises(ConfigError, match="config_dir"):
        run_images(replace(cfg, config_dir=other, stop_after=None))
