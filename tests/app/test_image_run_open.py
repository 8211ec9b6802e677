"""``emloc-studio --run-dir RUN`` on an image run (``image_run.json``) opens its gallery."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from emloc_app.image_runs import image_state_from_run_dir, is_image_run


def _image_run(tmp_path: Path, **extra: str) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    pipeline = tmp_path / "flux"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    settings = {"pipeline_dir": str(pipeline), "images_dir": str(tmp_path / "photos"), "run_dir": str(run),
                "trigger": "zxq", "prompt": "", "config_dir": "None", **extra}
    (run / "image_run.json").write_text(json.dumps(settings))
    return run


def test_image_run_state(tmp_path: Path) -> None:
    run = _image_run(tmp_path)
    assert is_image_run(run) and not is_image_run(tmp_path)
    state = image_state_from_run_dir(run)
    assert state.model_dir == tmp_path / "flux" and state.is_image_model
    assert state.image_folder == tmp_path / "photos" and state.image_trigger == "zxq" and state.image_prompt == ""
    single = tmp_path / "flux1-dev.safetensors"
    single.write_bytes(b"x")
    (run / "image_run.json").write_text(json.dumps({"pipeline_dir": str(single), "config_dir": str(tmp_path / "flux")}))
    back = image_state_from_run_dir(run)  # a single file: the file, and its pipeline folder as config_dir
    assert back.model_dir == single and back.config_dir == tmp_path / "flux" and back.single_file == single
    assert back.pipeline_folder == tmp_path / "flux" and back.is_image_model
    single.unlink()  # moved since: still a single-file run (the gallery exports with the run's denoiser)
    assert image_state_from_run_dir(run).pipeline_folder == tmp_path / "flux"
    (run / "image_run.json").write_text(json.dumps({"pipeline_dir": str(tmp_path / "flux"),
                                                    "config_dir": str(tmp_path / "other")}))
    assert image_state_from_run_dir(run).config_dir is None  # a folder's run: config_dir is not used


def test_studio_opens_the_gallery(tmp_path: Path) -> None:
    run = _image_run(tmp_path)
    env = {"QT_QPA_PLATFORM": "offscreen", "EMLOC_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
           "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-m", "emloc_app.main", "--run-dir", str(run), "--smoke-test"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "page 'Gallery' shown" in out.stdout
