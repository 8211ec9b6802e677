"""Image runs (``emloc image``: ``image_run.json``, no manifest) on the Runs page: kind, status, open → gallery."""

from __future__ import annotations

import json
from pathlib import Path

from emloc_app.settings import Settings
from emloc_app.wizard import Page
from emloc_engine.core import paths
from emloc_engine.run.history import find_runs, summarize_image_run
from tests.app.fakes import FakeEngine
from tests.app.test_runs_page import make_run, select, wizard_on


def make_image_run(root: Path, pipeline: Path, *, finished: bool) -> Path:
    """An image run folder as ``run_images`` leaves it (the marker files of the stages done)."""
    root.mkdir(parents=True)
    pipeline.mkdir(parents=True, exist_ok=True)
    (pipeline / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    settings = {
        "pipeline_dir": str(pipeline),
        "images_dir": str(root.parent / "photos"),
        "run_dir": str(root),
        "trigger": "zxq",
        "prompt": "",
        "config_dir": "None",
        "ratio": "0.4",
    }
    (root / "image_run.json").write_text(json.dumps(settings))
    markers = ["cache/cache.json", "emulator/emloc.json", "adapter/adapter_model.safetensors"]
    if finished:
        markers.append("adapter-corrected/adapter_model.safetensors")
    for m in markers:
        (root / m).parent.mkdir(parents=True, exist_ok=True)
        (root / m).write_text('{"family": "sdxl"}' if m.endswith("emloc.json") else "x")
    if finished:
        (root / "export" / "diffusers").mkdir(parents=True)
    return root


def test_history_summarises_image_runs(tmp_path: Path) -> None:
    done = make_image_run(tmp_path / "runs" / "img-done", tmp_path / "sdxl", finished=True)
    part = make_image_run(tmp_path / "runs" / "img-part", tmp_path / "sdxl", finished=False)
    s = summarize_image_run(done)
    assert s.kind == "image (sdxl)" and s.is_image and s.finished and s.ratio == 0.4
    assert (
        s.model == "sdxl"
        and s.data == "photos"
        and s.exports == {"diffusers": str(done / "export" / "diffusers")}
    )
    p = summarize_image_run(part)
    assert p.status == "stopped" and p.stage == "correct" and p.status_text() == "stopped at correction"
    assert {r.run_dir.name for r in find_runs([tmp_path / "runs"])} == {"img-done", "img-part"}
    (part / "emulator" / "emloc.json").unlink()  # the family then comes from the pipeline's model_index.json
    assert summarize_image_run(part).kind == "image (sdxl)" and summarize_image_run(part).stage == "emulator"


def test_runs_page_lists_image_runs_and_opens_the_gallery(qtbot, tmp_path: Path, fake: FakeEngine) -> None:  # type: ignore[no-untyped-def]
    runs = paths.runs_dir()
    make_run(runs / "text", finished=True, losses=[2.0], created="2026-11-01T10:00:00+00:00")
    image = make_image_run(runs / "img", tmp_path / "sdxl", finished=True)
    settings = Settings(tmp_path / "s.ini")
    wizard = wizard_on(qtbot, settings)
    page = wizard.runs_page
    rows = {page.table.item(r, 0).text(): page.table.item(r, 3).text() for r in range(page.table.rowCount())}
    assert rows == {"SmolLM2": "finished", "sdxl · image (sdxl)": "finished"}
    select(page, "img")
    assert page.open_button.isEnabled() and not page.resume_button.isEnabled()
    page.open_button.click()
    assert wizard.currentId() == Page.Gallery
    assert (
        wizard.state.run_dir == image and wizard.state.is_image_model and wizard.state.image_trigger == "zxq"
    )
    assert settings.recent_runs() == [image]
