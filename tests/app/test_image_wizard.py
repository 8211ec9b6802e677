"""An image run through the wizard with the REAL engine on a tiny SDXL pipeline and generated photos:
Photos → Plan → Run → Gallery (the image pages in place of Data, Plan, Run, Try); the run folder holds the corrected adapter.

The walk starts at the photos page with the state the Model page leaves for a pipeline folder
(``model_dir``); choosing the pipeline on the Model page is tested in ``test_model_page_images.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from emloc_app.pages import image_plan_page
from emloc_app.state import WizardState
from emloc_app.wizard import EmlocWizard, Page
from tests.app.fakes import machine
from tests.tiny_pipelines import build_tiny_pipeline, write_subject_images


def _next(qtbot, wizard: EmlocWizard, expected: Page, timeout: int = 60_000) -> None:  # type: ignore[no-untyped-def]
    page = wizard.currentPage()
    qtbot.waitUntil(lambda: page.isComplete() or not page.banner.isHidden(), timeout=timeout)
    assert page.banner.isHidden(), page.banner.title.text() + " " + page.banner.message.text()
    wizard.next()
    assert wizard.currentId() == expected, f"went to {wizard.currentId()}, not {expected!r}"


def photos_to_plan(qtbot, state: WizardState, photos: Path) -> EmlocWizard:  # type: ignore[no-untyped-def]
    """The wizard opened on the photos page (the state the Model page leaves for an image model), ``photos``
    scanned with the trigger "zxq", and moved on to the image Plan page."""
    wizard = EmlocWizard(state=state)
    qtbot.addWidget(wizard)
    wizard.setStartId(int(Page.ImageData))
    wizard.restart()
    wizard.show()
    assert state.is_image_model and wizard.currentId() == Page.ImageData
    data = wizard.image_data_page
    data.trigger.setText("zxq")
    data.folder.setText(str(photos))
    data.start_scan()
    _next(qtbot, wizard, Page.ImagePlan)
    return wizard


@pytest.mark.slow
def test_image_run_through_the_wizard(qtbot, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(image_plan_page, "RESOLUTIONS", (32, 64))
    pipeline = build_tiny_pipeline("sdxl", tmp_path / "hub", weight_std=0.1)
    photos = tmp_path / "photos"
    write_subject_images(photos, 4, size=(256, 256))
    cpu = machine(gpus=(), backend="cpu")
    state = WizardState(machine=cpu, gpu_index=None, model_dir=pipeline, run_dir=tmp_path / "run")
    wizard = photos_to_plan(qtbot, state, photos)
    # Plan: resolution 32, batch 2, a short training; the plan's words name the peak and ρ
    plan = wizard.image_plan_page
    assert plan.trigger.text() == "zxq"
    plan.resolution.setCurrentIndex(0)
    plan.batch.setValue(2)
    plan.steps.setValue(2)
    plan.sample_every.setValue(2)
    qtbot.waitUntil(lambda: plan.plan is not None and plan.plan.config.batch_size == 2, timeout=60_000)
    assert plan.plan is not None and plan.plan.fits and plan.plan.ratio == 0.9
    words = plan.words.text()
    assert "32×32 pixels, 2 image(s) a step" in words and "ρ = 0.90" in words and "GiB" in words
    _next(qtbot, wizard, Page.ImageRun)
    cfg = state.image_run
    assert cfg is not None and (cfg.resolution, cfg.batch_size, cfg.steps, cfg.ratio) == (32, 2, 2, 0.9)
    assert cfg.device == "cpu" and cfg.trigger == "zxq"
    # Run: the real image stages
    run = wizard.image_run_page
    run.start_button.click()
    _next(qtbot, wizard, Page.Gallery, timeout=180_000)
    assert all(run.stages.state(name) == "done" for name in ("cache", "emulator", "train", "correct"))
    assert (tmp_path / "run" / "adapter-corrected" / "adapter_model.safetensors").is_file()
    gallery = wizard.gallery_page
    qtbot.waitUntil(lambda: gallery.steps.count() > 0, timeout=10_000)
    assert wizard.nextId() == -1


def test_image_run_page_shows_each_stage_and_cancels(qtbot, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import threading

    from emloc_app.pages import image_run_page
    from emloc_engine.images.run import ImageRunConfig

    reached = threading.Event()

    def fake_run(cfg: ImageRunConfig, progress):  # type: ignore[no-untyped-def]
        progress.update(0.05, "encoding")
        while True:  # the cache is done, the emulator half built (sent again: the worker throttles updates)
            threading.Event().wait(0.06)
            progress.update(0.2, "calibrating")
            reached.set()
            progress.check_cancelled()

    monkeypatch.setattr(image_run_page, "run", fake_run)
    state = WizardState()
    state.image_run = ImageRunConfig(tmp_path / "pipe", tmp_path / "photos", tmp_path / "run", ratio=0.4)
    page = image_run_page.ImageRunPage(state)
    qtbot.addWidget(page)
    page.initializePage()
    assert "ρ = 0.40" in page.where.text()
    page.start_button.click()
    qtbot.waitUntil(lambda: reached.is_set() and page.stages.state("emulator") == "running", timeout=10_000)
    assert page.stages.state("cache") == "done" and page.stages.state("train") == "pending"
    assert page.stages.rows["emulator"].bar.value() == 500
    page.cancel_button.click()
    qtbot.waitUntil(lambda: not page.busy("run"), timeout=10_000)
    assert page.stages.state("emulator") == "cancelled" and "Cancelled" in page.where.text()
    assert page.start_button.isEnabled() and not page.isComplete()
