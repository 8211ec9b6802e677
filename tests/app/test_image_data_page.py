"""The image dataset page: thumbnails, problems from the engine's scan, captions edited and saved beside the photo."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from PySide6.QtCore import Qt

from emloc_app.pages.image_data_page import ImageDataPage
from emloc_app.state import WizardState
from tests.tiny_pipelines import write_subject_images


def _page(qtbot, state: WizardState, folder: Path, trigger: str = "sks") -> ImageDataPage:  # type: ignore[no-untyped-def]
    page = ImageDataPage(state)
    qtbot.addWidget(page)
    page.initializePage()
    page.trigger.setText(trigger)
    page.folder.setText(str(folder))
    page.start_scan()
    qtbot.waitUntil(lambda: page.scan is not None and not page.busy("scan"), timeout=60_000)
    return page


def test_thumbnails_and_problems(qtbot, tmp_path: Path, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    photos = tmp_path / "photos"
    write_subject_images(photos, 3, size=(260, 300))
    write_subject_images(tmp_path / "small", 1, size=(32, 32))
    (tmp_path / "small" / "img_000.png").rename(photos / "tiny.png")
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    page = _page(qtbot, dataclasses.replace(state, model_dir=tmp_path / "model"), photos)
    assert page.thumbs.count() == 3
    assert not page.thumbs.item(0).icon().isNull()
    assert page.thumbs.item(0).text() == "img_000.png"
    rows = {
        page.problems.item(i, 0).text(): page.problems.item(i, 2).text()
        for i in range(page.problems.rowCount())
    }
    assert "cannot be read" in rows["broken.jpg"] and "smaller than 256" in rows["tiny.png"]
    assert not page.problems.isHidden() and not page.isComplete()
    (photos / "broken.jpg").unlink()
    (photos / "tiny.png").unlink()
    page.start_scan()
    qtbot.waitUntil(lambda: page.isComplete(), timeout=60_000)
    assert page.problems.isHidden() and "3 usable photo(s)" in page.summary.text()
    assert (
        page.validatePage()
        and page.state.image_report is not None
        and len(page.state.image_report.items) == 3
    )
    assert page.state.image_trigger == "sks"


def test_prompt_for_photos_without_caption(qtbot, tmp_path: Path, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    photos = tmp_path / "photos"
    write_subject_images(photos, 2, size=(256, 256), captions=False)
    page = ImageDataPage(state)
    qtbot.addWidget(page)
    page.initializePage()
    page.trigger.setText("sks")
    page.prompt.setText("a photo of my dog")
    page.folder.setText(str(photos))
    page.start_scan()
    qtbot.waitUntil(lambda: page.isComplete(), timeout=60_000)
    assert [i.caption for i in page.scan.report.items] == ["sks, a photo of my dog"] * 2  # type: ignore[union-attr]
    page.thumbs.setCurrentRow(0)
    assert page.caption.toPlainText() == "" and "sks, a photo of my dog" in page.trained_as.text()
    assert page.validatePage() and page.state.image_prompt == "a photo of my dog"


def test_caption_saved_beside_photo(qtbot, tmp_path: Path, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    photos = tmp_path / "photos"
    write_subject_images(photos, 2, size=(256, 256))
    page = _page(qtbot, dataclasses.replace(state, model_dir=tmp_path / "model"), photos)
    page.thumbs.setCurrentRow(1)
    assert page.caption.toPlainText().startswith("a photo of sks circle")
    assert not page.save.isEnabled()
    page.caption.setPlainText("my dog on the beach")
    assert page.save.isEnabled() and "sks, my dog on the beach" in page.trained_as.text()
    qtbot.mouseClick(page.save, Qt.MouseButton.LeftButton)
    assert (photos / "img_001.txt").read_text(encoding="utf-8") == "my dog on the beach\n"
    assert not list(photos.glob("*.partial"))
    qtbot.waitUntil(lambda: not page.busy("scan"), timeout=60_000)
    assert page.selected_path() == photos / "img_001.png"
    assert page.scan is not None and page.scan.report.items[1].caption == "sks, my dog on the beach"


def test_caption_never_written_into_the_model_folder(qtbot, tmp_path: Path, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "model"
    write_subject_images(model / "samples", 1, size=(256, 256))
    before = (model / "samples" / "img_000.txt").read_text()
    page = _page(qtbot, dataclasses.replace(state, model_dir=model), model / "samples")
    page.thumbs.setCurrentRow(0)
    page.caption.setPlainText("changed")
    page.save_caption()
    assert (model / "samples" / "img_000.txt").read_text() == before
    assert not page.banner.isHidden() and "model's folder" in page.banner.findChild(type(page.summary)).text()
