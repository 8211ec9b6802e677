"""The gallery for image runs (samples per step, newest followed, export through a worker) and the wizard's
branch to the image pages for an image model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from PySide6.QtGui import QColor, QImage

import emloc_engine.images.export as image_export
from emloc_app.pages.gallery_page import GalleryPage
from emloc_app.state import WizardState
from emloc_app.wizard import EmlocWizard, Page
from emloc_engine.core.errors import MergeError
from emloc_engine.images.export import ImageExportConfig, ImageExportResult
from tests.app.fakes import FakeEngine, model_info


def _png(path: Path, colour: str = "red", px: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = QImage(px, px, QImage.Format.Format_RGB32)
    img.fill(QColor(colour))
    assert img.save(str(path))


def _gallery(qtbot, state: WizardState) -> GalleryPage:  # type: ignore[no-untyped-def]
    page = GalleryPage(state)
    qtbot.addWidget(page)
    page.initializePage()
    return page


def test_gallery_follows_the_newest_step_until_one_is_chosen(
    qtbot, tmp_path: Path, state: WizardState
) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    page = _gallery(qtbot, dataclasses.replace(state, run_dir=run))
    assert page.steps.count() == 0 and not page.empty.isHidden()
    for step in (10, 20):
        _png(run / "samples" / f"step-{step}" / "0.png")
        _png(run / "samples" / f"step-{step}" / "1.png", "blue")
    (run / "samples" / "step-20" / "prompts.txt").write_text("sks dog on a beach\nsks dog in snow\n")
    (run / "samples" / "step-30").mkdir()  # being written: no PNG yet, not listed
    page.refresh()
    assert [page.steps.item(i).text() for i in range(page.steps.count())] == ["step 20  (2)", "step 10  (2)"]
    assert page.current_step() == 20 and page.images.count() == 2 and page.empty.isHidden()
    assert page.images.item(1).text() == "sks dog in snow" and not page.images.item(0).icon().isNull()
    _png(run / "samples" / "step-30" / "0.png")
    page.refresh()
    assert page.current_step() == 30 and page.images.count() == 1 and page.images.item(0).text() == "0"
    page.steps.setCurrentRow(2)  # the user looks at an older step: new steps do not take it away
    assert page.current_step() == 10
    _png(run / "samples" / "step-40" / "0.png")
    page.refresh()
    assert page.steps.count() == 4 and page.current_step() == 10 and page.images.count() == 2
    page.cleanupPage()


def test_sd3_is_not_offered_a_kohya_file(qtbot, tmp_path: Path, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "sd3"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    page = _gallery(qtbot, dataclasses.replace(state, run_dir=tmp_path / "run", model_dir=model))
    assert not page.format_boxes["kohya"].isEnabled() and not page.format_boxes["kohya"].isChecked()
    assert page.format_boxes["diffusers"].isChecked()
    page.cleanupPage()


def _result(cfg: ImageExportConfig) -> ImageExportResult:
    return ImageExportResult(
        cfg.out_dir,
        "flux",
        cfg.out_dir / "diffusers" / "pytorch_lora_weights.safetensors",
        cfg.out_dir / "kohya" / "run.safetensors",
        None,
        (),
    )


def test_gallery_export_runs_in_a_worker(qtbot, tmp_path: Path, state: WizardState, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    configs: list[ImageExportConfig] = []

    def fake_export(cfg: ImageExportConfig, progress) -> ImageExportResult:  # type: ignore[no-untyped-def]
        configs.append(cfg)
        for f in (0.2, 0.6, 1.0):
            progress.update(f, "writing")
        return _result(cfg)

    monkeypatch.setattr(image_export, "export_image_lora", fake_export)
    page = _gallery(qtbot, dataclasses.replace(state, run_dir=run, model_dir=tmp_path / "flux"))
    page.start_export()
    assert "no trained adapter" in page.export_status.text() and not configs
    for name in ("adapter", "adapter-corrected"):
        (run / name).mkdir(parents=True)
        (run / name / "adapter_config.json").write_text("{}")
    page.format_boxes["merged"].setChecked(True)
    page.format_boxes["kohya"].setChecked(False)
    page.start_export()
    assert not page.export_button.isEnabled()
    qtbot.waitUntil(lambda: page.export_result is not None and page.export_button.isEnabled(), timeout=60_000)
    assert configs[0].adapter_dir == run / "adapter-corrected" and configs[0].formats == (
        "diffusers",
        "merged",
    )
    assert configs[0].out_dir == run / "export" and configs[0].pipeline_dir == tmp_path / "flux"
    assert "pytorch_lora_weights.safetensors" in page.export_status.text()

    def failing(cfg: ImageExportConfig, progress) -> ImageExportResult:  # type: ignore[no-untyped-def]
        raise MergeError("The kohya LoRA file read back differs.", hint="This is a bug in the export.")

    monkeypatch.setattr(image_export, "export_image_lora", failing)
    page.start_export()
    qtbot.waitUntil(lambda: page.export_button.isEnabled() and not page.banner.isHidden(), timeout=60_000)
    page.cleanupPage()


@pytest.mark.parametrize("image", [True, False])
def test_wizard_shows_image_pages_for_an_image_model(qtbot, tmp_path: Path, monkeypatch, image: bool) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "tiny-flux"
    folder.mkdir()
    if image:
        (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    FakeEngine(tmp_path, models=[model_info("org/tiny-flux", folder)]).install(monkeypatch.setattr)
    wizard = EmlocWizard(WizardState())
    qtbot.addWidget(wizard)
    wizard.setStartId(int(Page.Model))
    wizard.restart()
    page = wizard.pages[Page.Model]
    qtbot.waitUntil(lambda: page.isComplete(), timeout=60_000)
    wizard.next()
    assert wizard.currentId() == (Page.ImageData if image else Page.Data)
    assert wizard.state.is_image_model is image
    qtbot.waitUntil(lambda: not wizard.currentPage().busy(), timeout=60_000)  # the Data page inspects
