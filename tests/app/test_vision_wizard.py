"""The whole wizard offscreen on a tiny VLM with the REAL engine: Model → Data → Plan → Run → Try, like a text run."""

from __future__ import annotations

from pathlib import Path

import pytest

from emloc_app.wizard import Page
from tests.app.test_wizard import inspect_data, next_page, plan_and_run, wizard_on_data_page
from tests.engine.test_vision_emulator import visual_dataset
from tests.tiny_vlms import build_tiny_vlm, write_png


@pytest.mark.slow
@pytest.mark.integration
def test_full_wizard_run_of_a_vlm_with_real_engine(qtbot, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "hub"
    snap = build_tiny_vlm("llava", cache)
    data = visual_dataset(tmp_path / "data")
    wizard = wizard_on_data_page(qtbot, cache, snap, monkeypatch)
    assert inspect_data(qtbot, wizard, data, 256).format == "vision-chat"  # checked with the VLM's processor
    # the orchestrator runs the VLM stages, as for text
    root = plan_and_run(
        qtbot, wizard, {"steps": 2, "batch_size": 1, "warmup_steps": 1, "save_every": 1}, 180_000
    )
    assert (root / "adapter-corrected" / "adapter_config.json").exists()
    next_page(qtbot, wizard)
    assert wizard.currentId() == Page.Try
    try_page = wizard.pages[Page.Try]  # an image and a question: base and fine-tuned answers
    assert try_page.image_button.isVisibleTo(try_page)
    try_page.set_image(write_png(tmp_path / "q.png", (20, 200, 20)))
    try_page.max_tokens.setValue(3)
    try_page.generate.click()
    qtbot.waitUntil(lambda: not try_page.busy(), timeout=60_000)
    assert try_page.banner.isHidden(), try_page.banner.title.text() + try_page.banner.message.text()
    assert try_page.gen_status.text() == "Done."
    assert not try_page.export_buttons["ollama"].isEnabled()  # a runtime would get no vision part
    assert "vision part" in try_page.export_buttons["ollama"].toolTip()
    assert try_page.export_buttons["gguf"].isEnabled()  # LLaVA's language model is a Llama
    try_page.export_buttons["merged"].click()
    qtbot.waitUntil(lambda: not try_page.busy(), timeout=120_000)
    assert "merged" in try_page.state.exports, try_page.banner.title.text() + try_page.banner.message.text()
    assert (root / "merged" / "preprocessor_config.json").exists()
