"""The Data page with an image dataset: every image problem at its line, thumbnails beside the preview."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from emloc_app.pages.data_page import DataPage
from emloc_app.state import WizardState
from tests.tiny_vlms import build_tiny_vlm, write_png


def test_data_page_previews_images_beside_the_conversation(qtbot, tmp_path: Path, state: WizardState) -> None:  # type: ignore[no-untyped-def]
    snap = build_tiny_vlm("qwen2_vl", tmp_path / "hub")
    d = tmp_path / "vdata"
    write_png(d / "img" / "red.png", (220, 20, 20))
    write_png(d / "img" / "blue.png", (20, 20, 220))
    rows = [{"image": f"img/{c}.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                          {"from": "gpt", "value": c}]} for c in ("red", "blue")]
    rows.append({"image": "img/gone.png", "conversations": [{"from": "human", "value": "<image> ?"},
                                                            {"from": "gpt", "value": "x"}]})
    data = d / "v.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    state = dataclasses.replace(state, model_dir=snap, data_path=data, data_config=None, data_report=None)
    page = DataPage(state)
    qtbot.addWidget(page)
    page.initializePage()
    page.path.setText(str(data))
    qtbot.waitUntil(lambda: page.inspection is not None and page.inspection.data_path == data, timeout=60_000)
    assert page.inspection.report.format == "vision-chat"
    assert [page.problems.item(0, c).text() for c in (0, 1)] == ["v.jsonl:3", "error"]
    assert "image not found" in page.problems.item(0, 2).text()
    assert not page.isComplete()
    assert page.thumbs.count() == 2 and not page.thumbs.isHidden()
    assert page.thumbs.item(0).toolTip().endswith("red.png") and page.thumbs.item(1).text() == "sample 2"
    assert "<|image_pad|>" in page.preview.toPlainText() and "Colour?" in page.preview.toPlainText()
