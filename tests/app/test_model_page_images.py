"""Image models on the Model page: a tiny SDXL pipeline in the Hugging Face cache is listed beside a text
model with its kind, and choosing it leads the wizard to the photos page (the real catalog, no fakes)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from emloc_app.pages.model_page import COL_ARCH, COL_HERE, COL_KIND, ModelTable
from emloc_app.wizard import Page
from emloc_engine.catalog.model_folders import add_model_folder
from tests.app.test_model_page_single_file import model_page_wizard
from tests.tiny_models import build_tiny_model
from tests.tiny_pipelines import build_tiny_pipeline


def test_the_model_page_lists_an_image_pipeline_and_leads_to_the_photos_page(qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    hub = Path(os.environ["HF_HUB_CACHE"])  # the test's own cache (tests/conftest.py)
    pipeline = build_tiny_pipeline("sdxl", hub)
    build_tiny_model("llama", hub)
    unet = tmp_path / "unet"  # ComfyUI's folder of single-file checkpoints, added to the catalog
    unet.mkdir()
    save_file(
        {"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(2)}, unet / "flux1-dev.safetensors"
    )
    add_model_folder(unet)
    wizard, state, page = model_page_wizard(qtbot, min_rows=4)
    rows = {r.name: r for r in page.table_model.rows}
    single = rows["unet/flux1-dev.safetensors"]
    assert (
        ModelTable.text(single, COL_KIND) == "image model" and ModelTable.text(single, COL_ARCH) == "FLUX.1"
    )
    # choosable with a FLUX.1 pipeline folder (none here: tests/app/test_model_page_single_file.py has one)
    assert single.badge == "single file (FLUX.1): choose its pipeline folder below" and single.usable
    page.select_row(page.table_model.rows.index(single))
    assert not page.isComplete() and "diffusers FLUX.1 pipeline folder" in page.detail.text()
    assert not page.config_row.isHidden() and page.config_choice.count() == 0 and page.config_dir is None
    image, text = rows["emloc-test/tiny-sdxl"], rows["emloc-test/tiny-llama"]
    cells = [ModelTable.text(image, c) for c in (COL_KIND, COL_ARCH, COL_HERE)]
    assert cells == ["image model", "SDXL", "image model (SDXL): trains on your photos"]
    assert ModelTable.text(text, COL_KIND) == "text" and text.info is not None and text.info.kind == "text"
    assert image.path == pipeline and image.usable
    page.select_row(page.table_model.rows.index(image))
    qtbot.waitUntil(page.isComplete, timeout=10_000)
    wizard.next()
    assert wizard.currentId() == Page.ImageData, f"went to {wizard.currentId()}"
    assert state.is_image_model and state.model_dir == pipeline
    assert state.model is not None and state.model.kind == "image"
    wizard.back()  # choosing the text model instead goes to the Data page
    page.select_row(page.table_model.rows.index(text))
    qtbot.waitUntil(page.isComplete, timeout=10_000)
    wizard.next()
    assert wizard.currentId() == Page.Data and not state.is_image_model
    qtbot.waitUntil(lambda: not wizard.data_page.busy() and not page.busy(), timeout=60_000)
