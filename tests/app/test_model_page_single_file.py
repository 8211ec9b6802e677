"""A single-file image checkpoint (``flux1-dev.safetensors`` as ComfyUI/Forge keep them) trained from the app:
the Model page lets it be chosen with a pipeline folder of the same family for its configs, text encoders and
VAE (offered from the catalog, or chosen by hand and checked at once), the image Plan page builds the run with
``pipeline_dir`` = the file and ``config_dir`` = the folder, and the real run trains it (real catalog and engine,
tiny pipelines built from configs)."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from PySide6.QtWidgets import QFileDialog
from safetensors.torch import load_file, save_file

from emloc_app.image_runs import image_state_from_run_dir
from emloc_app.pages import image_plan_page
from emloc_app.pages.image_plan_page import ImagePlanPage, ImagePlanRequest
from emloc_app.state import WizardState
from emloc_app.wizard import EmlocWizard, Page
from emloc_engine.catalog.model_folders import add_model_folder
from emloc_engine.core.errors import ConfigError
from emloc_engine.core.progress import NULL_PROGRESS
from tests.app.fakes import machine
from tests.app.test_image_wizard import _next, photos_to_plan
from tests.tiny_pipelines import build_tiny_pipeline, write_subject_images


def single_file_of(pipeline: Path, out: Path) -> Path:
    """The pipeline's denoiser saved as one file (what ``from_single_file`` reads with the pipeline's configs)."""
    weights = next((pipeline / "transformer").glob("*.safetensors"))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(load_file(str(weights)), str(out))
    return out


def model_page_wizard(qtbot, min_rows: int = 3):  # type: ignore[no-untyped-def]
    """The wizard opened on the Model page (a CPU machine), once the catalog lists ``min_rows`` models."""
    state = WizardState(machine=machine(gpus=(), backend="cpu"), gpu_index=None)
    wizard = EmlocWizard(state=state)
    qtbot.addWidget(wizard)
    wizard.setStartId(int(Page.Model))
    wizard.restart()
    wizard.show()
    page = wizard.model_page
    qtbot.waitUntil(lambda: not page.busy("scan") and page.table_model.rowCount() >= min_rows, timeout=60_000)
    return wizard, state, page


def test_a_single_file_is_chosen_with_a_same_family_pipeline(qtbot, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    hub = Path(os.environ["HF_HUB_CACHE"])  # the test's own cache (tests/conftest.py)
    flux = build_tiny_pipeline("flux", hub)
    sdxl = build_tiny_pipeline("sdxl", hub)
    single = single_file_of(flux, tmp_path / "unet" / "my-flux.safetensors")
    add_model_folder(tmp_path / "unet")
    wizard, state, page = model_page_wizard(qtbot)
    rows = {r.name: r for r in page.table_model.rows}
    row = rows["unet/my-flux.safetensors"]
    assert row.kind == "single-file" and row.usable and "choose its pipeline folder" in row.badge
    assert page.config_row.isHidden()
    page.select_row(page.table_model.rows.index(row))
    # the same family's pipeline is offered (not the SDXL one) and preselected; it passes the check
    assert not page.config_row.isHidden()
    offered = [page.config_choice.itemText(i) for i in range(page.config_choice.count())]
    assert offered == ["emloc-test/tiny-flux"]
    assert page.config_dir == flux and page.isComplete() and page.banner.isHidden()
    # a pipeline of another family is refused with the folder, both families and the fix
    page.use_config_dir(sdxl)
    assert not page.isComplete() and page.config_dir is None and not page.banner.isHidden()
    title, fix = page.banner.title.text(), page.banner.message.text()
    assert title == f"{sdxl} is an SDXL pipeline; my-flux.safetensors is a FLUX.1 checkpoint."
    assert "Fix: Choose a diffusers FLUX.1 pipeline folder" in fix
    assert page.config_choice.findData(str(sdxl)) < 0  # a refused folder is not kept in the list
    # a folder without model_index.json, and a broken one (its index is not JSON), say so
    empty = tmp_path / "empty"
    empty.mkdir()
    page.use_config_dir(empty)
    assert page.banner.title.text() == f"{empty} is not a diffusers pipeline folder (no model_index.json)."
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{")
    page.use_config_dir(broken)
    assert (
        page.banner.title.text()
        == f"The pipeline folder {broken} cannot supply the configs of my-flux.safetensors."
    )
    assert "is not valid JSON" in page.banner.message.text() and not page.isComplete()
    # "Choose folder…" (the data pages' folder chooser) with the right folder: accepted, banner gone
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(flux))
    page.choose_config.click()
    assert page.config_dir == flux and page.isComplete() and page.banner.isHidden()
    assert page.config_choice.currentText() == "emloc-test/tiny-flux"  # the offered pipeline, by its name
    copy = shutil.copytree(flux, tmp_path / "my-flux-pipeline")  # a folder of its own: kept in the list
    page.use_config_dir(copy)
    assert page.config_dir == copy and page.config_choice.itemText(1) == str(copy)
    page.config_choice.setCurrentIndex(0)
    assert page.config_dir == flux and page.isComplete()
    wizard.next()
    assert wizard.currentId() == Page.ImageData
    assert state.model_dir == single and state.config_dir == flux and state.single_file == single
    assert state.pipeline_folder == flux and state.is_image_model
    wizard.back()  # another row: the row under the table goes, and the state forgets the folder
    pipeline_row = rows["emloc-test/tiny-sdxl"]
    page.select_row(page.table_model.rows.index(pipeline_row))
    assert page.config_row.isHidden() and page.config_dir is None and page.isComplete()
    wizard.next()
    assert state.model_dir == sdxl and state.config_dir is None and state.single_file is None
    qtbot.waitUntil(lambda: not wizard.image_data_page.busy() and not page.busy(), timeout=60_000)


def test_a_single_files_pipeline_folder_is_remembered_across_restarts(qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The app restarted: the last model is selected again and, for a single file, the folder chosen by hand
    for it too (not the first pipeline offered); a folder deleted since is not brought back."""
    hub = Path(os.environ["HF_HUB_CACHE"])
    flux = build_tiny_pipeline("flux", hub)
    single = single_file_of(flux, tmp_path / "unet" / "my-flux.safetensors")
    own = shutil.copytree(flux, tmp_path / "my-flux-pipeline")
    add_model_folder(tmp_path / "unet")
    wizard, state, page = model_page_wizard(qtbot, min_rows=2)
    page.select_row(next(i for i, r in enumerate(page.table_model.rows) if r.path == single))
    page.use_config_dir(own)
    wizard.next()
    assert state.config_dir == own
    qtbot.waitUntil(lambda: not wizard.image_data_page.busy() and not page.busy(), timeout=60_000)
    wizard.close()
    wizard, state, page = model_page_wizard(qtbot, min_rows=2)  # the same settings file (EMLOC_HOME)
    qtbot.waitUntil(lambda: page.selected() is not None and page.selected().path == single, timeout=60_000)
    assert not page.config_row.isHidden() and page.config_dir == own and page.isComplete()
    assert page.config_choice.currentText() == str(own)
    wizard.close()
    shutil.rmtree(own)
    wizard, state, page = model_page_wizard(qtbot, min_rows=2)
    qtbot.waitUntil(lambda: page.selected() is not None and page.selected().path == single, timeout=60_000)
    assert state.config_dir is None and page.config_dir == flux  # the offered pipeline again
    wizard.close()


def test_the_plan_page_builds_and_plans_the_run_of_a_single_file(qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    flux = build_tiny_pipeline("flux", tmp_path / "hub")
    sdxl = build_tiny_pipeline("sdxl", tmp_path / "hub")
    single = single_file_of(flux, tmp_path / "unet" / "my-flux.safetensors")
    cpu = machine(gpus=(), backend="cpu")
    state = WizardState(
        machine=cpu,
        gpu_index=None,
        model_dir=single,
        config_dir=flux,
        image_folder=tmp_path / "photos",
        run_dir=tmp_path / "run",
    )
    page = ImagePlanPage(state)
    qtbot.addWidget(page)
    cfg = page.run_config()
    assert cfg.pipeline_dir == single and cfg.config_dir == flux
    # the real planner plans it from the folder's configs; with a folder of another family it refuses
    plan = image_plan_page.plan(ImagePlanRequest(cfg, 8 * 2**30, None, cpu), NULL_PROGRESS)
    assert plan.fits and plan.params > 0
    wrong = replace(cfg, config_dir=sdxl)
    with pytest.raises(ConfigError, match="is an SDXL pipeline"):
        image_plan_page.plan(ImagePlanRequest(wrong, 8 * 2**30, None, cpu), NULL_PROGRESS)
    state.config_dir = None  # no folder chosen (a state from before): said on the page, never run without
    with pytest.raises(ConfigError, match="no pipeline folder chosen"):
        page.run_config()
    # a folder model: no config_dir even if one is left in the state
    folder_state = WizardState(
        machine=cpu,
        model_dir=flux,
        config_dir=sdxl,
        image_folder=tmp_path / "photos",
        run_dir=tmp_path / "run3",
    )
    assert ImagePlanPage(folder_state).run_config().config_dir is None


def test_a_single_file_trains_from_the_app(qtbot, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Photos → Plan → Run → Gallery with a single file: the real run converts its denoiser once into the run
    folder, trains and corrects; the gallery exports against that denoiser; reopening the run keeps both paths."""
    monkeypatch.setattr(image_plan_page, "RESOLUTIONS", (32, 64))
    flux = build_tiny_pipeline("flux", tmp_path / "hub", weight_std=0.1)
    single = single_file_of(flux, tmp_path / "unet" / "my-flux.safetensors")
    photos = tmp_path / "photos"
    write_subject_images(photos, 4, size=(256, 256))
    state = WizardState(
        machine=machine(gpus=(), backend="cpu"),
        gpu_index=None,
        model_dir=single,
        config_dir=flux,
        run_dir=tmp_path / "run",
    )
    wizard = photos_to_plan(qtbot, state, photos)
    plan = wizard.image_plan_page
    plan.resolution.setCurrentIndex(0)
    plan.steps.setValue(2)
    plan.sample_every.setValue(0)
    qtbot.waitUntil(lambda: plan.plan is not None and plan.plan.config.resolution == 32, timeout=60_000)
    _next(qtbot, wizard, Page.ImageRun)
    cfg = state.image_run
    assert cfg is not None and cfg.pipeline_dir == single and cfg.config_dir == flux and cfg.steps == 2
    run = wizard.image_run_page
    assert "Single file my-flux.safetensors" in run.where.text()
    run.start_button.click()
    _next(qtbot, wizard, Page.Gallery, timeout=300_000)
    run_dir = tmp_path / "run"
    assert (run_dir / "denoiser" / "config.json").is_file()  # the file's denoiser, converted once
    assert (run_dir / "adapter-corrected" / "adapter_model.safetensors").is_file()
    export = wizard.gallery_page.export_config()
    assert export is not None and export.pipeline_dir == flux and export.denoiser_dir == run_dir / "denoiser"
    reopened = image_state_from_run_dir(run_dir)
    assert reopened.model_dir == single and reopened.config_dir == flux and reopened.is_image_model
