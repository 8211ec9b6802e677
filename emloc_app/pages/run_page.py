"""Page 5: run emulator → train → correct through the engine's orchestrator, with live plots, log, cancel, resume.

One worker runs :func:`~emloc_engine.run.orchestrator.run_stages` for the whole run. The orchestrator
alone starts, resumes, records and finishes stages (it writes the manifest and holds the run folder's
lock); the page renders what it reports: stage boundaries through ``RunEvents`` (turned into Qt
signals), progress and metrics through the worker.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QObject, Qt, Signal, Slot
from PySide6.QtWidgets import (
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from emloc_app.pages.common import BasePage
from emloc_app.state import STAGE_ORDER, STAGE_TITLES, WizardState
from emloc_app.widgets.loss_plot import LossPlot
from emloc_app.widgets.stage_list import StageList
from emloc_engine.core.errors import EngineError
from emloc_engine.core.layout import RunLayout
from emloc_engine.core.progress import Progress
from emloc_engine.run.manifest import Manifest, read_manifest
from emloc_engine.run.metrics_log import read_metrics
from emloc_engine.run.orchestrator import SLICES, RunResult, run_stages
from emloc_engine.run.plan import RunPlan

log = logging.getLogger(__name__)

MAX_LOG_LINES = 5000


class LogBridge(QObject):
    """A logging handler's messages as a signal (emitted from any thread, received on the GUI thread)."""

    line = Signal(str)


class QtLogHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.bridge = LogBridge()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(RuntimeError):  # the page is gone
            self.bridge.line.emit(self.format(record))


class StageEvents(QObject):
    """The orchestrator's ``RunEvents`` as Qt signals: called on the worker thread, received on the GUI thread.

    Signals:
        started(name): a stage began.
        finished(name, status): done, skipped (done earlier), cancelled or failed.
    """

    started = Signal(str)
    finished = Signal(str, str)

    def stage_started(self, name: str) -> None:
        self.started.emit(name)

    def stage_finished(self, name: str, status: str) -> None:
        self.finished.emit(name, status)


@dataclass(frozen=True)
class RunRequest:
    """What the run's worker needs (a plain value: it crosses threads)."""

    plan: RunPlan
    events: StageEvents
    stages: tuple[str, ...] = STAGE_ORDER


def run(req: RunRequest, progress: Progress) -> RunResult:
    """The worker's task: :func:`run_stages` of the plan (looked up when it starts, so tests can replace it)."""
    return run_stages(req.plan, progress, stages=req.stages, events=req.events)


class RunPage(BasePage):
    """Runs the stages the run folder has not finished; the orchestrator skips the finished ones."""

    def __init__(self, state: WizardState, parent: QWidget | None = None) -> None:
        super().__init__(state, parent)
        self.setTitle("Fine-tune")
        self.setSubTitle("Build the emulator, train the LoRA on it, then correct the LoRA for the original "
                         "model. Cancel stops at the next step and can be resumed.")
        self.stages = StageList()
        self.stages.set_stages([(n, STAGE_TITLES[n]) for n in STAGE_ORDER])
        self.start_button = QPushButton("&Start")
        self.start_button.setObjectName("start")
        self.start_button.clicked.connect(self.start)
        self.resume_button = QPushButton("&Resume")
        self.resume_button.setObjectName("resume")
        self.resume_button.setToolTip("Continue the interrupted run: finished stages are kept, training "
                                      "continues from its last checkpoint.")
        self.resume_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("&Cancel")
        self.cancel_button.setObjectName("cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.where = QLabel()
        self.where.setWordWrap(True)
        self.where.setObjectName("PageHint")
        self.where.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        buttons = QHBoxLayout()
        buttons.addWidget(self.where, 1)
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.resume_button)
        buttons.addWidget(self.cancel_button)
        stage_box = QGroupBox("Stages")
        sl = QVBoxLayout(stage_box)
        sl.addWidget(self.stages)
        sl.addLayout(buttons)
        self.plot = LossPlot()
        self.log_pane = QPlainTextEdit()
        self.log_pane.setObjectName("LogPane")
        self.log_pane.setReadOnly(True)
        self.log_pane.setMaximumBlockCount(MAX_LOG_LINES)
        self.log_pane.setPlaceholderText("The engine's log appears here.")
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.plot)
        split.addWidget(self.log_pane)
        split.setSizes([300, 140])
        self.body.addWidget(stage_box)
        self.body.addWidget(split, 1)
        self.handler = QtLogHandler()
        self.handler.bridge.line.connect(self.append_log)
        self.events = StageEvents(self)
        self.events.started.connect(self._stage_started)
        self.events.finished.connect(self._stage_finished)
        self.current: str | None = None  # the stage running now
        self._shown_run: Path | None = None  # the run folder whose stages, log and curves the page shows

    # -- state in ----------------------------------------------------------------------------
    def initializePage(self) -> None:
        self.banner.clear()
        run_dir = self.state.run_dir
        if run_dir != self._shown_run and not self.busy("run"):
            self._show_run(run_dir)
        self.where.setText((f"Run folder: {run_dir}" if run_dir else "")
                           + (f"<br>{self.state.device_note}" if self.state.device_note else ""))
        plan = self.state.run_plan
        if plan is not None:  # the GPU-memory chart: hidden on the CPU, with the budget line on a GPU
            self.plot.configure(on_gpu=plan.record.device != "cpu", budget_gib=plan.record.budget_gib)
        manifest = self._manifest()
        if manifest is not None:
            self.state.done |= {n for n in STAGE_ORDER if manifest.stage(n).done}
        for name in STAGE_ORDER:
            if name in self.state.done and self.stages.state(name) == "pending":
                self.stages.finish(name, "skipped")
        interrupted = manifest is not None and any(manifest.stage(n).status != "pending" for n in STAGE_ORDER)
        interrupted = interrupted or any(self.stages.state(n) in ("cancelled", "failed") for n in STAGE_ORDER)
        all_done = self.state.all_stages_done()
        self.start_button.setVisible(not interrupted and not all_done)
        self.resume_button.setVisible(interrupted and not all_done)
        self.start_button.setEnabled(True)
        self.resume_button.setEnabled(True)
        self.completeChanged.emit()

    def _show_run(self, run_dir: Path | None) -> None:
        """Another run than the one on the page (a second run opened in one session): its stages start
        pending, the log is emptied, and the charts show what the run recorded instead of the last run's."""
        self._shown_run = run_dir
        self.stages.set_stages([(n, STAGE_TITLES[n]) for n in STAGE_ORDER])
        self.log_pane.clear()
        self.plot.show_recorded(read_metrics(RunLayout(run_dir).tensorboard) if run_dir is not None else {})

    def _manifest(self) -> Manifest | None:
        """The run folder's manifest (what the orchestrator recorded), None for a new folder."""
        if self.state.run_dir is None:
            return None
        try:
            return read_manifest(self.state.run_dir)
        except EngineError as exc:
            self.banner.show_error(exc, retry=False)
            return None

    # -- running -----------------------------------------------------------------------------
    def start(self) -> None:
        """Run (or resume) the planned run in one worker; finished stages are skipped by the orchestrator."""
        if self.busy("run"):
            return
        plan = self.state.run_plan
        if plan is None:
            self.banner.show_error(EngineError("The run is not planned yet.", hint="Go back to the Plan page."),
                                   retry=False)
            return
        self._attach_log()
        self.start_button.setEnabled(False)
        self.resume_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.run_task("run", run, RunRequest(plan, self.events), self._run_done, on_progress=self._on_progress,
                      on_metric=self.plot.on_metric, on_cancel=self._cancelled)

    def _attach_log(self) -> None:
        logger = logging.getLogger("emloc_engine")
        if self.handler not in logger.handlers:
            logger.addHandler(self.handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)

    def _detach_log(self) -> None:
        logging.getLogger("emloc_engine").removeHandler(self.handler)

    @Slot(str)
    def _stage_started(self, name: str) -> None:
        if name not in self.stages.rows:
            return
        self.current = name
        self.stages.start(name)
        self.append_log(f"── {STAGE_TITLES[name]} ──")

    @Slot(str, str)
    def _stage_finished(self, name: str, status: str) -> None:
        if name not in self.stages.rows:
            return
        if status in ("done", "skipped"):
            self.state.done.add(name)
        self.stages.finish(name, status)
        if name == self.current:
            self.current = None

    def _on_progress(self, fraction: float, message: str) -> None:
        """The orchestrator reports the whole run's fraction; the running stage's row shows its own."""
        if self.current is not None:
            a, b = SLICES[self.current]
            self.stages.set_progress(self.current, min(1.0, max(0.0, (fraction - a) / (b - a))), message)

    def _run_done(self, result: RunResult) -> None:
        from emloc_engine.stages.training.trainer import (
            TrainResult,  # loaded: the run just trained (or skipped)
        )

        self.state.run_result = result
        self.state.results.update(result.results)
        train = result.results.get("train")
        if isinstance(train, TrainResult) and train.anchor_note:
            # what anchoring did (e.g. "auto" turned it off): says why the gain differs between runs
            self.append_log(f"Anchoring: {train.anchor_note}")
        for note in result.notes:
            self.append_log(note)

    def _cancelled(self) -> None:
        self.append_log("Cancelled. Press Resume to continue from where it stopped.")

    def task_finished(self, name: str) -> None:
        if name == "run":
            self.current = None
            self._detach_log()
            self.cancel_button.setEnabled(False)
            self.start_button.hide()
            if self.state.all_stages_done():
                self.resume_button.hide()
                self.append_log("All stages done. Next: try the model and export it.")
            else:
                self.resume_button.show()
                self.resume_button.setEnabled(True)
        super().task_finished(name)

    def cancel(self) -> None:
        """Ask the running stage to stop at its next check (the run stays resumable)."""
        if self.cancel_task("run"):
            self.cancel_button.setEnabled(False)
            self.append_log("Cancelling at the next safe point…")

    def retry(self) -> None:
        self.banner.clear()
        self.start()

    def append_log(self, line: str) -> None:
        self.log_pane.appendPlainText(line)

    # -- wizard protocol ---------------------------------------------------------------------
    def isComplete(self) -> bool:
        return self.state.all_stages_done() and not self.busy("run")

    def cleanupPage(self) -> None:
        """Going Back while a stage runs cancels it (the run stays resumable)."""
        self.cancel()
