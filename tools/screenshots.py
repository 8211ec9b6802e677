"""Render every page of the EMLoC Studio wizard to PNGs at 1280×800, light and dark, for review.

    python tools/screenshots.py OUT_DIR                      # the real engine on the demo, both themes
    python tools/screenshots.py OUT_DIR --engine fake        # the app tests' fake engine (8B model, 24 GiB GPU)
    python tools/screenshots.py OUT_DIR --theme dark --gpus 2
    python tools/screenshots.py OUT_DIR --images             # only the image-model pages (photos, gallery)

``--engine real`` (the default) runs what a new user runs: this machine detected, the demo model
prepared, the demo data inspected with its tokenizer, the plan of the Faster preset, a short real run
(``--steps``, 4 by default: minutes on a laptop CPU, much longer on a busy 2-core box) with its live
plots, a real side-by-side answer on the Try page, and the app started again on its Runs page. Nothing is written outside a temporary ``EMLOC_HOME``, removed at the end. ``--engine fake`` shows a large
model on a GPU (the GPU-memory chart with its budget line) without any model work.

Each page is grabbed once per theme: the palette is switched (what the app does when the system
scheme changes), so both themes show the same content. Files: ``OUT/<theme>/<n>_<page>.png``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZE = (1280, 800)
THEMES = ("light", "dark")


def settle(ms: int = 400) -> None:
    """Let queued events (worker signals, layouts, paints) run for ``ms`` milliseconds."""
    from PySide6.QtCore import QCoreApplication

    end = time.monotonic() + ms / 1000
    while time.monotonic() < end:
        QCoreApplication.processEvents()
        time.sleep(0.01)


def wait_until(what: str, ok: Callable[[], bool], timeout_s: float) -> None:
    """Process events until ``ok()``; fail loudly (naming ``what``) after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while not ok():
        if time.monotonic() > end:
            raise SystemExit(f"screenshots: timed out waiting for {what}")
        settle(100)


class Shooter:
    """Grabs the wizard in each theme, switching the application palette between grabs."""

    def __init__(self, app: Any, wizard: Any, out: Path, themes: tuple[str, ...]) -> None:
        self.app, self.wizard, self.out, self.themes = app, wizard, out, themes
        for t in themes:
            (out / t).mkdir(parents=True, exist_ok=True)

    def shot(self, name: str) -> None:
        from emloc_app import theme

        for t in self.themes:
            theme.apply_palette(self.app, t == "dark")  # what the app does when the system scheme changes
            settle(300)
            path = self.out / t / f"{name}.png"
            self.wizard.grab().save(str(path))
            print(path, flush=True)
        theme.apply_palette(self.app, self.themes[0] == "dark")


def install_fakes(tmp: Path, gpus: int) -> None:
    """The app tests' fake engine: an 8B model on a 24 GiB GPU, a chat dataset with two warnings."""
    from tests.app.fakes import FakeEngine, gpu, machine, model_info, problem, report

    models = [
        model_info("meta-llama/Llama-3.1-8B-Instruct", tmp / "llama"),
        model_info("Qwen/Qwen2.5-7B-Instruct", tmp / "qwen", num_parameters=7_600_000_000, size_gib=15,
                   model_type="qwen2"),
        model_info("mistralai/Mistral-Small-24B-big", tmp / "mistral", num_parameters=24_000_000_000, size_gib=47,
                   model_type="mistral"),
        model_info("lmstudio: gemma-3-12b-Q4_K_M.gguf", tmp / "gemma.gguf", model_type="gemma3",
                   needs_conversion=True, dtype="Q4_K_M", size_gib=7,
                   problem="GGUF file: convert it to safetensors first (emloc models convert)."),
        model_info("state-spaces/mamba-2.8b", tmp / "mamba", model_type="mamba", supported=False,
                   problem="Mamba models have no attention/MLP linears EMLoC can compress."),
    ]
    found = report(
        n_samples=1200, n_train=1080, n_eval=120, n_truncated=14,
        rendered_examples=tuple(
            f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nQuestion {i}: how do I "
            f"reverse a list in Python?<|im_end|>\n<|im_start|>assistant\nUse my_list[::-1] or my_list.reverse()."
            "<|im_end|>" for i in range(1, 5)),
        problems=(problem(str(tmp / "chat.jsonl"), 57, "Sample has no assistant turn; it is skipped.", False),
                  problem(str(tmp / "chat.jsonl"), 311, "Sample is 731 tokens, longer than max_length 512; "
                          "it is truncated.", False)))
    detected = machine(gpus=tuple(gpu(i) for i in range(max(1, gpus))))
    FakeEngine(tmp, models=[*models], report=found, machine=detected).install(setattr)  # a one-shot process


def fake_run_plots(run: Any) -> None:
    """A plausible training curve on the Run page (the fake stages are instant)."""
    run.plot.clear()
    for step in range(1, 101):
        loss = 2.4 * math.exp(-step / 35) + 0.9 + 0.05 * math.sin(step)
        run.plot.on_metric("train/loss", loss, step)
        run.plot.on_metric("train/lr", 2e-4 * min(1, step / 10) * (0.5 + 0.5 * math.cos(math.pi * step / 100)), step)
        run.plot.on_metric("gpu/peak_gib", 17.2 + 0.3 * (step > 3), step)
        if step % 25 == 0:
            run.plot.on_metric("eval/loss", loss + 0.08, step)


def walk(wizard: Any, shooter: Shooter, *, real: bool, steps: int) -> None:
    """Go through the six pages as a user would, grabbing each when it shows its result."""
    from emloc_app.wizard import Page

    pages = wizard.pages
    wait_until("the machine", lambda: pages[Page.Machine].isComplete(), 120)
    settle(500)
    shooter.shot("1_machine")
    wizard.next()
    wait_until("the model list", lambda: pages[Page.Model].isComplete(), 600)
    settle(500)
    shooter.shot("2_model")
    wizard.next()
    data = pages[Page.Data]
    wait_until("the data report", lambda: data.isComplete() and not data.busy(), 600)
    settle(500)
    shooter.shot("3_data")
    wizard.next()
    plan = pages[Page.Plan]
    settle(500)
    shooter.shot("4_plan")
    plan.advanced_toggle.setChecked(True)
    settle(300)
    shooter.shot("4_plan_advanced")
    if real:  # a short run: minutes on a CPU (one evaluation, at the end)
        plan.settings["steps"].setValue(steps)
        plan.settings["eval_every"].setValue(steps)
        plan.settings["save_every"].setValue(steps)
    plan.advanced_toggle.setChecked(False)
    wizard.next()
    run = pages[Page.Run]
    settle(300)
    shooter.shot("5_run_before")
    run.start()
    if real:
        wait_until("the run", lambda: run.isComplete(), 3600)
    else:
        settle(1500)
        fake_run_plots(run)
    settle(500)
    shooter.shot("5_run")
    wizard.next()
    try_page = pages[Page.Try]
    settle(300)
    if hasattr(try_page, "max_tokens"):
        try_page.max_tokens.setValue(40)
    try_page.start_generation()  # the real model's answers, or the fake engine's
    wait_until("the answers", lambda: not try_page.busy(), 600)
    settle(500)
    shooter.shot("6_try_export")


def walk_images(wizard: Any, shooter: Shooter, tmp: Path) -> None:
    """The image-model pages: generated photos (one too small, one broken) and sample images of a run."""
    from PIL import Image, ImageDraw

    from emloc_app.wizard import Page
    from tests.tiny_pipelines import write_subject_images

    model = tmp / "FLUX.1-dev"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    photos = tmp / "photos"
    for i, shape in enumerate(("circle", "square", "triangle")):
        write_subject_images(photos / shape, 3, size=(384, 320), shape=shape, colour=i, seed=i)
        for f in (photos / shape).iterdir():
            f.rename(photos / f"{shape}_{f.name}")
    write_subject_images(tmp / "small", 1, size=(48, 48))
    (tmp / "small" / "img_000.png").rename(photos / "thumbnail_from_chat.png")
    (photos / "IMG_2041.HEIC.jpg").write_bytes(b"\x00not really an image")
    run = tmp / "run"
    for step in (100, 200, 300):
        for k in range(3):
            img = Image.new("RGB", (256, 256), (30 + 60 * k, 40 + step // 5, 90))
            r = 40 + step // 10
            ImageDraw.Draw(img).ellipse((128 - r, 128 - r, 128 + r, 128 + r), fill=(220, 40, 40))
            (run / "samples" / f"step-{step}").mkdir(parents=True, exist_ok=True)
            img.save(run / "samples" / f"step-{step}" / f"{k}.png")
        (run / "samples" / f"step-{step}" / "prompts.txt").write_text(
            "sks circle on the moon\nsks circle as a watercolour\nsks circle in snow\n")
    s = wizard.state
    s.model_dir, s.image_folder, s.image_trigger, s.run_dir = model, photos, "sks", run
    wizard.setStartId(int(Page.ImageData))
    wizard.restart()
    page = wizard.pages[Page.ImageData]
    wait_until("the photo scan", lambda: page.scan is not None and not page.busy(), 120)
    page.thumbs.setCurrentRow(1)
    settle(500)
    shooter.shot("3_image_data")
    wizard.setStartId(int(Page.Gallery))
    wizard.restart()
    settle(800)
    shooter.shot("6_gallery")


def restart(app: Any, settings: Any, shooter: Shooter) -> Any:
    """The app started again on the same settings: the Runs page first, listing the finished run."""
    from emloc_app.state import WizardState
    from emloc_app.wizard import EmlocWizard

    shooter.wizard.shutdown()
    shooter.wizard.close()
    shooter.wizard.deleteLater()
    wizard = EmlocWizard(WizardState(), settings=settings)
    wizard.resize(*SIZE)
    wizard.show()
    shooter.wizard = wizard
    settle(800)
    shooter.shot("0_runs")
    return wizard


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--engine", choices=("real", "fake"), default="real",
                   help="real: this machine and the demo (a short real run); fake: the app tests' fakes.")
    p.add_argument("--theme", choices=(*THEMES, "both"), default="both")
    p.add_argument("--steps", type=int, default=4, help="Training steps of the real run (default 4).")
    p.add_argument("--gpus", type=int, default=1, help="Fake engine: this many 24 GiB GPUs (2+ shows the choice).")
    p.add_argument("--images", action="store_true", help="Only the image-model pages (photos page, gallery).")
    args = p.parse_args()
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    tmp = Path(tempfile.mkdtemp(prefix="emloc-shots-"))
    os.environ["EMLOC_HOME"] = str(tmp / "home")  # settings, the demo and the run folder stay in here

    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    from emloc_app import theme

    theme.apply_theme(app)  # type: ignore[arg-type]
    from emloc_app.settings import Settings
    from emloc_app.state import WizardState
    from emloc_app.wizard import EmlocWizard
    from emloc_app.worker import shutdown_workers

    if args.engine == "fake":
        install_fakes(tmp, args.gpus)
    settings = Settings(tmp / "settings.ini")
    wizard = EmlocWizard(WizardState(), settings=settings)
    wizard.resize(*SIZE)
    wizard.show()
    themes = THEMES if args.theme == "both" else (args.theme,)
    shooter = Shooter(app, wizard, args.out, themes)
    try:
        if args.images:
            walk_images(wizard, shooter, tmp)
        else:
            walk(wizard, shooter, real=args.engine == "real", steps=args.steps)
            wizard = restart(app, settings, shooter)
    finally:
        wizard.shutdown()
        shutdown_workers()
        shutil.rmtree(tmp, ignore_errors=True)  # the demo copy and the run folder: only the PNGs are kept
        wizard.deleteLater()
        settle(200)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Exit without the interpreter's final garbage collection: after a real run (torch and Qt objects
    # alive together) it once aborted there ("none_dealloc") after every PNG had been written.
    os._exit(code)
