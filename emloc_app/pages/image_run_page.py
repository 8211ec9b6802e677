"""The Run page of an image run (in place of the text Run page): cache → emulator → training → correction.

One worker runs :func:`~emloc_engine.images.run.run_images` on the Plan page's config. The engine
reports the whole run's fraction; the page shows each stage's own bar from the slices
``run_images`` gives its stages (:data:`IMAGE_SLICES`), the training loss on the chart, and Cancel
stops at the next image, block or step (the run folder resumes: Start again continues). When the
run finishes, Next goes to the gallery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PySide6.QtWidgets import QGroupBox, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from emloc_app.pages.common import BasePage
from emloc_app.state import WizardState
from emloc_app.widgets.loss_plot import LossPlot
from emloc_app.widgets.stage_list import StageList
from emloc_engine.core.errors import EngineError
from emloc_engine.core.progress import Progress

if TYPE_CHECKING:
    from emloc_engine.images.options import ImageRunConfig, ImageRunResult

IMAGE_SLICES = (
    ("cache", "Encode the photos and captions", 0.0, 0.1),
    ("emulator", "Build the emulator", 0.1, 0.3),
    ("train", "Train LoRA on the emulator", 0.3, 0.9),
    ("correct", "Correct the LoRA for the original model", 0.9, 1.0),
)
"""Each stage's slice of :func:`~emloc_engine.images.run.run_images`'s progress (its ``sub`` calls)."""


def run(cfg: ImageRunConfig, progress: Progress) -> ImageRunResult:
    """The worker's task (looked up when it starts, so tests can replace it).

    The stage modules (torch, diffusers) are imported here, in the worker, never at the app's start-up.
    """
    from emloc_engine.images.run import run_images

    return run_images(cfg, progress)


class ImageRunPage(BasePage):
    """Runs (or resumes) every image stage in one worker."""

    def __init__(self, state: WizardState, parent: QWidget | None = None) -> None:
        super().__init__(state, parent)
        self.setTitle("Fine-tune")
        self.setSubTitle(
            "Encode your photos, build the emulator, train the LoRA on it, then correct the LoRA for the "
            "original model. Cancel stops at the next step; Start continues from there."
        )
        self.stages = StageList()
        self.stages.set_stages([(name, title) for name, title, _, _ in IMAGE_SLICES])
        self.start_button = QPushButton("&Start")
        self.start_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("&Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.where = QLabel()
        self.where.setWordWrap(True)
        self.where.setObjectName("PageHint")
        buttons = QHBoxLayout()
        buttons.addWidget(self.where, 1)
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.cancel_button)
        box = QGroupBox("Stages")
        inner = QVBoxLayout(box)
        inner.addWidget(self.stages)
        inner.addLayout(buttons)
        self.plot = LossPlot()
        self.body.addWidget(box)
        self.body.addWidget(self.plot, 1)
        self.result: ImageRunResult | None = None
        self.current: str | None = None

    def initializePage(self) -> None:
        self.banner.clear()
        cfg = self.state.image_run
        single = (
            f"<br>Single file {cfg.pipeline_dir.name} with the configs, text encoders and VAE of {cfg.config_dir} "
            "(its denoiser is converted once into the run folder)."
            if cfg is not None and cfg.config_dir is not None and not cfg.pipeline_dir.is_dir()
            else ""
        )
        self.where.setText(
            (f"Run folder: {cfg.run_dir} · ρ = {cfg.ratio:.2f}{single}" if cfg is not None else "")
            + (f"<br>{self.state.device_note}" if self.state.device_note else "")
        )
        self.plot.configure(on_gpu=False, budget_gib=None)
        self.start_button.setEnabled(cfg is not None and not self.busy("run"))
        self.completeChanged.emit()

    def start(self) -> None:
        cfg = self.state.image_run
        if self.busy("run"):
            return
        if cfg is None:
            self.banner.show_error(
                EngineError("The run is not planned yet.", hint="Go back to the Plan page."), retry=False
            )
            return
        self.result = None
        self.current = None
        self.stages.set_stages([(name, title) for name, title, _, _ in IMAGE_SLICES])
        self.start_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.run_task(
            "run",
            run,
            cfg,
            self._done,
            on_progress=self._on_progress,
            on_metric=self.plot.on_metric,
            on_cancel=self._cancelled,
        )

    def _on_progress(self, fraction: float, message: str) -> None:
        """Mark the stages before ``fraction`` done and show the running stage's own fraction."""
        for name, _, a, b in IMAGE_SLICES:
            if fraction >= b and self.stages.state(name) in ("pending", "running"):
                if self.stages.state(name) == "pending":
                    self.stages.start(name)
                self.stages.finish(name, "done")
            elif a <= fraction < b:
                if self.stages.state(name) != "running":
                    self.stages.start(name)
                    self.current = name
                self.stages.set_progress(name, (fraction - a) / (b - a), message)

    def _done(self, result: ImageRunResult) -> None:
        self.result = result
        self.state.run_dir = result.run_dir
        if result.finished:
            for name, _, _, _ in IMAGE_SLICES:
                if self.stages.state(name) != "done":
                    self.stages.finish(name, "done")
            self.where.setText(f"Finished: λ = {result.lam:g}. Corrected adapter: {result.corrected_dir}")
        else:
            self.where.setText(f"Stopped after step {result.steps_done}; Start continues.")
        self.completeChanged.emit()

    def _cancelled(self) -> None:
        if self.current is not None:
            self.stages.finish(self.current, "cancelled")
        self.where.setText("Cancelled. Start continues from where it stopped.")

    def task_finished(self, name: str) -> None:
        if name == "run":
            self.cancel_button.setEnabled(False)
            self.start_button.setEnabled(self.result is None or not self.result.finished)
        super().task_finished(name)

    def cancel(self) -> None:
        """Ask the run to stop at its next check (the run folder resumes)."""
        if self.cancel_task("run"):
            self.cancel_button.setEnabled(False)

    def cleanupPage(self) -> None:
        """Going Back while the run goes cancels it (resumable)."""
        self.cancel()

    def isComplete(self) -> bool:
        return self.result is not None and self.result.finished and not self.busy("run")

    def nextId(self) -> int:
        from emloc_app.wizard import Page

        return int(Page.Gallery)


__all__ = ["IMAGE_SLICES", "ImageRunPage", "run"]
