"""Image runs (``emloc image``: ``image_run.json``, no manifest) on the Runs page: kind, status, open → gallery."""

from __future__ import annotations

import json
from pathlib import Path

from emloc_app.settings import Settings
from emloc_app.wizard import Page
from emloc_engine.core import paths
from emloc_engine.machine import hardware
from emloc_engine.run.history import find_runs, summarize_image_run
from tests.app.fakes import FakeEngine, gpu, machine
from tests.app.test_runs_page import make_run, select, wizard_on


def make_image_run(root: Path, pipeline: Path, *, finished: bool, device: str = "auto") -> Path:
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
        "device": device,
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


def test_runs_page_deletes_an_image_run_after_asking(
    qtbot, tmp_path: Path, monkeypatch, fake: FakeEngine
) -> None:  # type: ignore[no-untyped-def]
    from PySide6.QtWidgets import QMessageBox

    from emloc_app.pages import runs_page

    runs = paths.runs_dir()
    keep = make_run(runs / "text", finished=True, losses=[2.0], created="2026-11-01T10:00:00+00:00")
    image = make_image_run(runs / "img", tmp_path / "sdxl", finished=False)
    wizard = wizard_on(qtbot, Settings(tmp_path / "s.ini"))
    page = wizard.runs_page
    answers = [QMessageBox.StandardButton.Cancel]
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: answers.pop(0))
    monkeypatch.setattr(QMessageBox, "warning", lambda *a, **k: QMessageBox.StandardButton.Yes)
    trashed: list[Path] = []
    monkeypatch.setattr(runs_page, "move_to_trash", lambda p: trashed.append(p) or False)  # no trash here
    select(page, "img")
    assert page.delete_button.isEnabled()
    page.delete_button.click()  # Cancel: nothing happens
    assert image.exists() and not trashed
    answers.append(QMessageBox.StandardButton.Yes)
    page.delete_button.click()
    assert trashed == [image.resolve()] and not image.exists() and keep.exists()
    assert page.banner.isHidden() and [p.name for p in runs.iterdir()] == ["text"]  # no temporary left
    assert [r.run_dir.name for r in page.runs] == ["text"]
    assert (tmp_path / "sdxl" / "model_index.json").is_file()  # the pipeline is untouched


def _fake_image_run(monkeypatch) -> list:  # type: ignore[no-untyped-def]
    """The image Run page's task replaced: records the config, returns a finished run."""
    from emloc_app.pages import image_run_page
    from emloc_engine.images.run import ImageRunResult

    got: list = []

    def fake_run(cfg, progress):  # type: ignore[no-untyped-def]
        got.append(cfg)
        for f in (0.2, 0.6, 1.0):
            progress.update(f, "step")
        run = cfg.run_dir
        return ImageRunResult(
            run, "sdxl", run / "adapter", run / "adapter-corrected", 0.5, (), (1.0,), (), 3, True
        )

    monkeypatch.setattr(image_run_page, "run", fake_run)
    monkeypatch.setattr(hardware, "detect_machine", lambda: machine())  # one GPU, index 0
    return got


def test_runs_page_resumes_an_image_run_with_its_recorded_settings(
    qtbot, tmp_path: Path, monkeypatch, fake: FakeEngine
) -> None:  # type: ignore[no-untyped-def]
    got = _fake_image_run(monkeypatch)
    image = make_image_run(paths.runs_dir() / "img", tmp_path / "sdxl", finished=False)
    wizard = wizard_on(qtbot, Settings(tmp_path / "s.ini"))
    page = wizard.runs_page
    select(page, "img")
    assert page.resume_button.isEnabled() and page.open_button.isEnabled()
    page.resume_button.click()
    qtbot.waitUntil(lambda: wizard.currentId() == Page.ImageRun, timeout=60_000)
    run = wizard.image_run_page
    qtbot.waitUntil(run.isComplete, timeout=60_000)  # started at once, and finished
    assert len(got) == 1
    cfg = got[0]
    assert (cfg.run_dir, cfg.pipeline_dir, cfg.ratio, cfg.trigger) == (image, tmp_path / "sdxl", 0.4, "zxq")
    assert cfg.config_dir is None and cfg.stop_after is None
    assert wizard.state.image_run == cfg and wizard.state.is_image_model and wizard.state.run_dir == image
    assert page.banner.isHidden()
    wizard.next()
    assert wizard.currentId() == Page.Gallery


def test_opening_an_unfinished_image_run_shows_its_run_page_ready_to_resume(
    qtbot, tmp_path: Path, monkeypatch, fake: FakeEngine
) -> None:  # type: ignore[no-untyped-def]
    got = _fake_image_run(monkeypatch)
    make_image_run(paths.runs_dir() / "img", tmp_path / "sdxl", finished=False)
    wizard = wizard_on(qtbot, Settings(tmp_path / "s.ini"))
    select(wizard.runs_page, "img")
    wizard.runs_page.open_button.click()
    qtbot.waitUntil(lambda: wizard.currentId() == Page.ImageRun, timeout=60_000)
    run = wizard.image_run_page
    assert run.start_button.isEnabled() and not run.busy("run") and not got
    assert "ρ = 0.40" in run.where.text()


def test_resuming_an_image_run_whose_gpu_is_gone_continues_on_a_gpu_of_this_machine(
    qtbot, tmp_path: Path, monkeypatch, fake: FakeEngine
) -> None:  # type: ignore[no-untyped-def]
    got = _fake_image_run(monkeypatch)
    here = machine((gpu(0, free_gib=6), gpu(2, name="NVIDIA RTX A6000", total_gib=48, free_gib=40)))
    monkeypatch.setattr(hardware, "detect_machine", lambda: here)
    make_image_run(paths.runs_dir() / "img", tmp_path / "sdxl", finished=False, device="cuda:1")
    wizard = wizard_on(qtbot, Settings(tmp_path / "s.ini"))
    select(wizard.runs_page, "img")
    wizard.runs_page.open_button.click()
    qtbot.waitUntil(lambda: wizard.currentId() == Page.ImageRun, timeout=60_000)
    run = wizard.image_run_page
    assert wizard.state.image_run is not None and wizard.state.image_run.device == "cuda:2"
    assert wizard.state.gpu_index == 2 and wizard.state.machine == here
    assert "GPU 1" in run.where.text() and "GPU 2 (NVIDIA RTX A6000)" in run.where.text()
    run.start()
    qtbot.waitUntil(run.isComplete, timeout=60_000)
    assert [cfg.device for cfg in got] == ["cuda:2"]
