"""The image Plan page's anchor box: off by default (the engine's default), on → the run is anchored and the
plan counts the anchors (its train stage grows, its words say so)."""

from __future__ import annotations

from pathlib import Path

from emloc_app.pages import image_plan_page
from emloc_app.pages.image_plan_page import ImagePlanPage, ImagePlanRequest
from emloc_app.state import WizardState
from emloc_engine.core.progress import NULL_PROGRESS
from emloc_engine.images.options import run_default
from tests.app.fakes import machine
from tests.tiny_pipelines import build_tiny_pipeline


def test_the_anchor_box_reaches_the_run_and_the_plan(qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    flux = build_tiny_pipeline("flux", tmp_path / "hub")
    cpu = machine(gpus=(), backend="cpu")
    state = WizardState(machine=cpu, gpu_index=None, model_dir=flux, image_folder=tmp_path / "photos",
                        run_dir=tmp_path / "run")
    page = ImagePlanPage(state)
    qtbot.addWidget(page)
    assert page.anchor.isChecked() is (run_default("anchor") == "blocks") and run_default("anchor") == "none"
    plain = page.run_config()
    page.anchor.setChecked(True)
    anchored = page.run_config()
    assert (plain.anchor, anchored.anchor) == ("none", "blocks")
    p0 = image_plan_page.plan(ImagePlanRequest(plain, 8 * 2**30, None, cpu), NULL_PROGRESS)
    p1 = image_plan_page.plan(ImagePlanRequest(anchored, 8 * 2**30, None, cpu), NULL_PROGRESS)
    assert p1.stage("train").peak_bytes > p0.stage("train").peak_bytes
    assert "anchored" in image_plan_page.plan_words(p1) and "anchored" not in image_plan_page.plan_words(p0)
