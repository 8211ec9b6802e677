"""The Plan page of an image run (in place of the text Plan page): resolution, batch, steps, trigger word,
and the image planner's peak and ρ in plain words.

The page builds one :class:`~emloc_engine.images.options.ImageRunConfig` from its widgets and the earlier
pages (pipeline, photo folder, caption prompt, device; for a single-file checkpoint the file as
``pipeline_dir`` and the Model page's pipeline folder as ``config_dir``) and asks
:func:`~emloc_engine.images.planning.plan_for_run` (in a worker: a FLUX.1 plan runs the transformer on
the meta device, about 2 s) for every stage's peak and the largest ρ that fits the budget, which is
the Machine page's (the same rule as text runs). Changing the resolution or the batch plans again.
Next is possible once a plan fits; it keeps ρ in the config the Run page runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QLineEdit,
    QSpinBox,
    QWidget,
)

from emloc_app.pages.common import GIB, BasePage
from emloc_app.state import WizardState
from emloc_engine.core import paths
from emloc_engine.core.errors import ConfigError
from emloc_engine.core.progress import Progress
from emloc_engine.images.options import (  # RESOLUTIONS: tests offer smaller ones
    RESOLUTIONS,
    ImageRunConfig,
    run_default,
)

if TYPE_CHECKING:
    from emloc_engine.images.planning import ImagePlan
STAGE_WORDS = {
    "cache": "encoding your photos",
    "emulator": "building the emulator",
    "train": "training",
    "correct": "the correction",
}
_FIELD = {f.name: f for f in dataclasses.fields(ImageRunConfig)}


def _default(name: str) -> int:
    """An ``ImageRunConfig`` field's default (the engine's, never re-declared here)."""
    return int(run_default(name))


@dataclass(frozen=True)
class ImagePlanRequest:
    """What the planning worker needs (a plain value: it crosses threads)."""

    run: ImageRunConfig
    budget_bytes: int | None
    gpu_memory_bytes: int | None
    machine: Any


def plan(req: ImagePlanRequest, progress: Progress) -> ImagePlan:
    """The worker's task (looked up when it starts, so tests can replace it).

    The planner (torch, on the meta device) is imported here, in the worker, never at the app's start-up.
    """
    from emloc_engine.images.planning import plan_for_run

    return plan_for_run(req.run, req.budget_bytes, req.gpu_memory_bytes, req.machine)


def plan_words(p: ImagePlan) -> str:
    """The plan in plain words, as the text Plan page's presets say it."""
    where = f"{p.config.resolution}×{p.config.resolution} pixels, {p.config.batch_size} image(s) a step"
    worst = max(p.stages, key=lambda s: s.peak_bytes)
    if not p.fits or p.ratio is None:
        return f"<b>Does not fit</b> at {where}. {p.reason} Try a lower resolution or batch 1."
    return (
        f"At {where} the largest need is <b>{worst.peak_gib:.1f} GiB</b> ({STAGE_WORDS.get(worst.name, worst.name)}) "
        f"of your <b>{p.config.budget_bytes / GIB:.1f} GiB</b>. The emulator keeps "
        f"<b>ρ = {p.ratio:.2f}</b> of the denoiser's compressed weights ({p.emulator_params / 1e6:,.0f} M of "
        f"{p.params / 1e6:,.0f} M parameters); the correction then moves the LoRA onto the original. "
        f"Running the original denoiser alone would need {p.inference.peak_gib:.1f} GiB."
        + (" Training is <b>anchored</b> to the original: it runs once more, block by block, before every step."
           if p.config.anchor == "blocks" else "")
    )


class ImagePlanPage(BasePage):
    """Training settings of an image run and the planner's ρ."""

    def __init__(self, state: WizardState, parent: QWidget | None = None) -> None:
        super().__init__(state, parent)
        self.setTitle("Plan")
        self.setSubTitle(
            "How large the training images are, how many a step, how long, and the word that names your "
            "subject. The plan picks the largest emulator that fits your GPU memory."
        )
        self.resolution = QComboBox()
        for r in RESOLUTIONS:
            self.resolution.addItem(f"{r} × {r}", r)
        self.resolution.setCurrentIndex(len(RESOLUTIONS) - 1)
        self.resolution.setToolTip(_FIELD["resolution"].metadata["help"])
        self.batch = QSpinBox()
        self.batch.setRange(1, 16)
        self.batch.setValue(_default("batch_size"))
        self.batch.setToolTip(_FIELD["batch_size"].metadata["help"])
        self.steps = QSpinBox()
        self.steps.setRange(1, 100_000)
        self.steps.setValue(_default("steps"))
        self.steps.setToolTip(_FIELD["steps"].metadata["help"])
        self.sample_every = QSpinBox()
        self.sample_every.setRange(0, 100_000)
        self.sample_every.setValue(_default("sample_every"))
        self.sample_every.setToolTip(_FIELD["sample_every"].metadata["help"] + " They appear in the gallery.")
        self.trigger = QLineEdit()
        self.trigger.setToolTip(_FIELD["trigger"].metadata["help"])
        self.anchor = QCheckBox("Anchor the training to the original model (slower, more GPU memory)")
        self.anchor.setChecked(run_default("anchor") == "blocks")
        self.anchor.setToolTip(
            _FIELD["anchor"].metadata["help"]
            + " On the tiny test pipeline it moved what reaches the original from worse than nothing to most of"
            " full LoRA's gain. On an H100 at 1024 × 1024, 10 steps took 20 s instead of 11 (SDXL) and 50 s"
            " instead of 20 (FLUX.1-dev)."
        )
        box = QGroupBox("Training")
        form = QFormLayout(box)
        form.addRow("&Resolution", self.resolution)
        form.addRow("&Batch (images a step)", self.batch)
        form.addRow("&Steps", self.steps)
        form.addRow("Sample &images every", self.sample_every)
        form.addRow("&Trigger word", self.trigger)
        form.addRow("", self.anchor)
        self.words = QLabel()
        self.words.setWordWrap(True)
        self.words.setObjectName("PlanWords")
        self.body.addWidget(box)
        self.body.addWidget(self.words)
        self.body.addStretch(1)
        self.plan: ImagePlan | None = None
        self._replan = QTimer(self)
        self._replan.setSingleShot(True)
        self._replan.setInterval(150)
        self._replan.timeout.connect(self.start_plan)
        self.resolution.currentIndexChanged.connect(self._changed)
        self.batch.valueChanged.connect(self._changed)
        self.anchor.toggled.connect(self._changed)  # the anchors' memory is in the plan

    # -- the config ----------------------------------------------------------------------------
    def run_config(self, plan: ImagePlan | None = None) -> ImageRunConfig:
        """The run's settings from this page and the earlier ones (ρ and the statistics budget: the plan's,
        once planned)."""
        s = self.state
        if s.model_dir is None or s.image_folder is None:
            raise ConfigError("Choose the model and the photos first.", hint="Go back to the earlier pages.")
        if s.run_dir is None:
            s.run_dir = s.new_run_dir(paths.runs_dir())
        single = s.single_file
        if single is not None and s.config_dir is None:
            raise ConfigError(
                f"{single.name} is a single-file checkpoint and has no pipeline folder chosen for its configs, "
                "text encoders and VAE.",
                hint="Go back to the Model page and choose its pipeline folder.",
            )
        run = ImageRunConfig(
            pipeline_dir=Path(s.model_dir),
            config_dir=s.config_dir if single is not None else None,
            images_dir=Path(s.image_folder),
            run_dir=s.run_dir,
            trigger=self.trigger.text().strip() or str(run_default("trigger")),
            prompt=s.image_prompt,
            resolution=int(self.resolution.currentData()),
            batch_size=self.batch.value(),
            steps=self.steps.value(),
            sample_every=self.sample_every.value(),
            anchor="blocks" if self.anchor.isChecked() else "none",
            ratio=run_default("ratio"),
            device=s.device,
        )
        if plan is None:
            return run
        from emloc_engine.images.planning import with_plan  # torch and diffusers: only once planned

        return with_plan(run, plan)

    # -- planning ------------------------------------------------------------------------------
    def initializePage(self) -> None:
        self.banner.clear()
        self.trigger.setText(self.state.image_trigger or str(run_default("trigger")))
        self.start_plan()

    def _changed(self) -> None:
        self.plan = None
        self.completeChanged.emit()
        self._replan.start()

    def start_plan(self) -> None:
        if self.busy("plan"):
            self._replan.start()  # plan again once the running one is done
            return
        try:
            cfg = self.run_config()
        except ConfigError as exc:
            self.banner.show_error(exc, retry=False)
            return
        s = self.state
        self.plan = None
        self.words.setText("Planning the memory of every stage…")
        req = ImagePlanRequest(cfg, s.budget_bytes, s.gpu_memory_bytes, s.machine)
        self.run_task("plan", plan, req, self._planned)
        self.completeChanged.emit()

    def _planned(self, result: ImagePlan) -> None:
        wanted = (int(self.resolution.currentData()), self.batch.value())
        if (result.config.resolution, result.config.batch_size) != wanted:
            return  # the settings changed meanwhile; the timer plans again
        self.plan = result
        self.words.setText(plan_words(result))
        self.completeChanged.emit()

    def isComplete(self) -> bool:
        return self.plan is not None and self.plan.fits and not self.busy("plan")

    def validatePage(self) -> bool:
        if self.plan is None or self.plan.ratio is None:
            return False
        cfg = self.run_config(self.plan)
        self.state.image_trigger = cfg.trigger
        self.state.image_run = cfg
        self.state.image_plan = self.plan
        return True

    def nextId(self) -> int:
        from emloc_app.wizard import Page

        return int(Page.ImageRun)


__all__ = ["RESOLUTIONS", "ImagePlanPage", "ImagePlanRequest", "plan", "plan_words"]
