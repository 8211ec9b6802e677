"""An image run's recorded settings read back for a resume, and image run folders deleted like text runs."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from emloc_engine.core.errors import RunStateError
from emloc_engine.images.run import RUN_SETTINGS, ImageRunConfig
from emloc_engine.images.run_record import read_image_run_config
from emloc_engine.run.history import check_deletable, delete_run, find_runs
from emloc_engine.run.lock import run_folder_lock


def _record(cfg: ImageRunConfig) -> Path:
    """``image_run.json`` as ``run_images`` writes it (every field as text)."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / RUN_SETTINGS).write_text(json.dumps({k: str(v) for k, v in asdict(cfg).items()}))
    return cfg.run_dir


def test_the_recorded_settings_come_back_with_their_types(tmp_path: Path) -> None:
    cfg = ImageRunConfig(
        tmp_path / "flux1-dev.safetensors",
        tmp_path / "photos",
        tmp_path / "run",
        trigger="zxq",
        caption_mode="prompt",
        class_dir=tmp_path / "class",
        sample_prompts=("a zxq dog", "zxq, it's 'quoted'"),
        config_dir=tmp_path / "flux-pipeline",
        resolution=512,
        ratio=0.35,
        lr=3e-5,
        lam=0.25,
        anchor="blocks",
        device="cuda:1",
        stop_after=7,
    )
    back = read_image_run_config(_record(cfg))
    assert back == replace(cfg, stop_after=None)  # resuming means finishing the run
    plain = read_image_run_config(_record(ImageRunConfig(tmp_path / "p", tmp_path / "i", tmp_path / "plain")))
    assert plain.class_dir is None and plain.lam is None and plain.sample_prompts == ()
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    assert read_image_run_config(moved).run_dir == moved  # the folder where it is now


def test_an_unreadable_record_names_the_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_SETTINGS).write_text('{"pipeline_dir": "/p", "images_dir": "/i", "ratio": "half"}')
    with pytest.raises(RunStateError, match="ratio = 'half' is not readable") as err:
        read_image_run_config(run)
    assert str(run / RUN_SETTINGS) in err.value.summary and "new image run" in err.value.hint
    (run / RUN_SETTINGS).write_text("[]")
    with pytest.raises(RunStateError, match="is not a JSON object"):
        read_image_run_config(run)


def test_image_run_folders_are_deleted_through_a_hidden_name_and_never_listed_half_deleted(
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    run = _record(ImageRunConfig(tmp_path / "pipe", tmp_path / "photos", runs / "img"))
    (run / "cache").mkdir()
    (run / "cache" / "latents.pt").write_bytes(b"x" * 10)
    assert check_deletable(run) == run.resolve()
    with run_folder_lock(run), pytest.raises(RunStateError, match="in use"):
        delete_run(run)
    leftover = runs / ".old.deleting-1"  # a delete interrupted after its rename
    leftover.mkdir()
    (leftover / RUN_SETTINGS).write_text((run / RUN_SETTINGS).read_text())
    assert [r.run_dir.name for r in find_runs([runs])] == ["img"]
    delete_run(run)
    assert not run.exists() and sorted(p.name for p in runs.iterdir()) == [".old.deleting-1"]
    other = tmp_path / "photos-not-a-run"
    other.mkdir()
    (other / RUN_SETTINGS).write_text('{"something": "else"}')
    with pytest.raises(RunStateError, match="is not an EMLoC run record"):
        delete_run(other)
    assert other.exists()
