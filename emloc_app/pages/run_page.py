"""Page 5: run emulator → train → correct, one worker per stage, with live plots, log, cancel, resume."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QObject, Qt, Signal
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
from emloc_app.state import STAGE_ORDER, STAGE_TITLES, StageConfigs, WizardState
from emloc_app.widgets.loss_plot import LossPlot
from emloc_app.widgets.stage_list import StageList
from emloc_engine.core.errors import EngineError, RunStateError
from emloc_engine.core.progress import Progress
from emloc_engine.run.manifest import RunManifest
from emloc_engine.run.runlog import attach_run_log, detach_run_log

if TYPE_CHECKING:
    from emloc_app.state import StageResult
    from emloc_engine.stages.correction.corrector import CorrectionConfig, CorrectionResult
    from emloc_engine.stages.emulator.builder import EmulatorConfig, EmulatorResult
    from emloc_engine.stages.training.trainer import TrainConfig, TrainResult

log = logging.getLogger(__name__)

MAX_LOG_LINES = 5000


# The stage functions, imported when a stage starts (they import torch). Tests replace these module
# attributes with fakes (monkeypatch.setattr).
def build_emulator(cfg: EmulatorConfig, progress: Progress) -> EmulatorResult:
    from emloc_engine.stages.emulator.builder import build_emulator as build

    return build(cfg, progress)


def train_lora(cfg: TrainConfig, progress: Progress) -> TrainResult:
    from emloc_engine.stages.training.trainer import train_lora as train

    return train(cfg, progress)


def train_lora_parallel(configs: StageConfigs, progress: Progress) -> TrainResult:
    """Data-parallel training on GPUs 0..N−1, as ``emloc run --gpus N``."""
    from emloc_engine.stages.training.distributed import ParallelConfig, train_lora_distributed

    parallel = ParallelConfig(processes=configs.gpus, gpu_ids=tuple(range(configs.gpus)))
    return train_lora_distributed(configs.train, parallel, progress)


def correct_lora(cfg: CorrectionConfig, progress: Progress) -> CorrectionResult:
    from emloc_engine.stages.correction.corrector import correct_lora as correct

    return correct(cfg, progress)


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


def summarize(result: StageResult) -> dict[str, object]:
    """A JSON-friendly summary of a stage result for the manifest: its scalar and path fields."""
    out: dict[str, object] = {}
    for name, v in dataclasses.asdict(result).items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[name] = v
        elif isinstance(v, Path):
            out[name] = str(v)
    return out


class RunPage(BasePage):
    """Runs the stages in order; each stage is skipped if the run's manifest says it is done."""

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
        self.current: str | None = None
        self.manifest: RunManifest | None = None
        self._run_log: logging.Handler | None = None
        self._queue: list[str] = []

    # -- state in ----------------------------------------------------------------------------
    def initializePage(self) -> None:
        self.banner.clear()
        run_dir = self.state.run_dir
        self.where.setText(f"Run folder: {run_dir}" if run_dir else "")
        self.state.done |= self.done_in_manifest()
        started = False
        for name in STAGE_ORDER:
            if name in self.state.done:
                self.stages.finish(name, "skipped")
            elif self.stages.state(name) not in ("pending",):
                started = True
        interrupted = self._manifest_has_interrupted() or started
        all_done = self.state.all_stages_done()
        self.start_button.setVisible(not interrupted and not all_done)
        self.resume_button.setVisible(interrupted and not all_done)
        self.start_button.setEnabled(True)
        self.resume_button.setEnabled(True)
        self.completeChanged.emit()

    def _manifest(self) -> RunManifest | None:
        run_dir = self.state.run_dir
        if run_dir is None or not (run_dir / "manifest.json").exists():
            return None
        try:
            return RunManifest.open(run_dir)
        except RunStateError as exc:
            self.banner.show_error(exc, retry=False)
            return None

    def done_in_manifest(self) -> set[str]:
        """The stages the run folder's manifest marks as done."""
        m = self._manifest()
        return set() if m is None else {n for n in STAGE_ORDER if m.is_done(n)}

    def _manifest_has_interrupted(self) -> bool:
        m = self._manifest()
        return m is not None and any(
            m.stage(n).get("status") in ("running", "cancelled", "failed") or m.is_done(n) for n in STAGE_ORDER)

    # -- running -----------------------------------------------------------------------------
    def start(self) -> None:
        """Run every stage that is not done yet, in order."""
        if self.current is not None:
            return
        s = self.state
        if s.run_dir is None or s.configs is None:
            self.banner.show_error(EngineError("The run is not planned yet.", hint="Go back to the Plan page."),
                                   retry=False)
            return
        self.banner.clear()
        self.manifest = RunManifest.open(s.run_dir)
        self._record_inputs(s.configs)
        self._attach_logs()
        self._queue = [n for n in STAGE_ORDER if n not in s.done]
        self.start_button.setEnabled(False)
        self.resume_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self._next()

    def _record_inputs(self, configs: StageConfigs) -> None:
        s, m = self.state, self.manifest
        assert m is not None
        m.set_input("model", str(s.model_dir), (s.model.revision or "") if s.model is not None else "")
        if s.data_path is not None:
            m.set_input("data", str(s.data_path), s.data_report.fingerprint if s.data_report is not None else "")
        m.update_settings({"studio": {
            "model_dir": str(s.model_dir), "data_path": str(s.data_path), "data_format": s.data_format,
            "max_length": s.max_length, "eval_fraction": s.eval_fraction, "train_on": s.train_on,
            "data_seed": s.data_seed, "max_samples": s.max_samples, "ratio": configs.emulator.ratio,
            "budget_bytes": s.budget_bytes, "train": dict(s.train_settings),
            "lambda": None if s.lambda_ is None else str(s.lambda_), "device": s.device,
            "gpus": configs.gpus, "allocation": configs.emulator.allocation, "anchor": configs.train.anchor,
        }})

    def _attach_logs(self) -> None:
        logger = logging.getLogger("emloc_engine")
        if self.handler not in logger.handlers:
            logger.addHandler(self.handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        if self._run_log is None and self.state.run_dir is not None:
            self._run_log = attach_run_log(Path(self.state.run_dir))

    def _detach_logs(self) -> None:
        logging.getLogger("emloc_engine").removeHandler(self.handler)
        if self._run_log is not None:
            detach_run_log(self._run_log)
            self._run_log = None

    def _next(self) -> None:
        configs = self.state.configs
        if not self._queue or configs is None:
            self._all_done()
            return
        name = self._queue.pop(0)
        self.current = name
        self.stages.start(name)
        self.append_log(f"── {STAGE_TITLES[name]} ──")
        assert self.manifest is not None
        predicted = self._predicted_peak_gib(name)
        self.manifest.start_stage(name, **({"predicted_peak_gib": predicted} if predicted is not None else {}))
        progress, metric, cancel = self._on_progress, self.plot.on_metric, self._stage_cancelled
        if name == "emulator":
            self.run_task(name, build_emulator, configs.emulator, self._stage_done, on_progress=progress,
                          on_metric=metric, on_cancel=cancel)
        elif name == "train" and configs.gpus > 1:
            self.run_task(name, train_lora_parallel, configs, self._train_done, on_progress=progress,
                          on_metric=metric, on_cancel=cancel)
        elif name == "train":
            self.run_task(name, train_lora, configs.train, self._train_done, on_progress=progress,
                          on_metric=metric, on_cancel=cancel)
        else:
            self.run_task(name, correct_lora, configs.correct, self._stage_done, on_progress=progress,
                          on_metric=metric, on_cancel=cancel)

    def _predicted_peak_gib(self, name: str) -> float | None:
        """The planner's peak for this stage (stored beside the measured one, so drift shows)."""
        plan = self.state.plan
        try:
            return plan.stage(name).peak_bytes / 2**30 if plan is not None else None
        except KeyError:
            return None

    def _on_progress(self, fraction: float, message: str) -> None:
        if self.current is not None:
            self.stages.set_progress(self.current, fraction, message)

    def _stage_done(self, result: EmulatorResult | TrainResult | CorrectionResult) -> None:
        name = self.current
        assert name is not None and self.manifest is not None
        self.state.results[name] = result
        self.state.done.add(name)
        self.manifest.finish_stage(name, result=summarize(result), measured_peak_gib=result.peak_vram_gib)
        self.stages.finish(name, "done")

    def _train_done(self, result: TrainResult) -> None:
        self._stage_done(result)
        if result.anchor_note:  # what anchoring did (e.g. "auto" turned it off): says why the gain differs
            self.append_log(f"Anchoring: {result.anchor_note}")

    def _stage_cancelled(self) -> None:
        name = self.current
        if name is not None and self.manifest is not None:
            self.manifest.fail_stage(name, "cancelled", "Cancelled by the user.")
            self.stages.finish(name, "cancelled")
        self.append_log("Cancelled. Press Resume to continue from where it stopped.")

    def on_task_failed(self, name: str, exc: BaseException, retry: bool = True) -> None:
        if self.manifest is not None and name in STAGE_ORDER:
            self.manifest.fail_stage(name, "failed", str(exc))
            self.stages.finish(name, "failed")
        super().on_task_failed(name, exc, retry)

    def task_finished(self, name: str) -> None:
        if name in STAGE_ORDER and name == self.current:
            self.current = None
            if name in self.state.done and self._queue:
                self._next()
            elif name in self.state.done:
                self._all_done()
            else:
                self._stopped()
        super().task_finished(name)

    def _stopped(self) -> None:
        self._queue = []
        self._detach_logs()
        self.cancel_button.setEnabled(False)
        self.start_button.hide()
        self.resume_button.show()
        self.resume_button.setEnabled(True)

    def _all_done(self) -> None:
        self._detach_logs()
        self.cancel_button.setEnabled(False)
        self.start_button.hide()
        self.resume_button.hide()
        self.append_log("All stages done. Next: try the model and export it.")
        self.completeChanged.emit()

    def cancel(self) -> None:
        """Ask the running stage to stop at its next check (the run stays resumable)."""
        worker = self.workers.get(self.current or "")
        if worker is not None:
            worker.request_cancel()
            self.cancel_button.setEnabled(False)
            self.append_log("Cancelling at the next safe point…")

    def retry(self) -> None:
        self.banner.clear()
        self.start()

    def append_log(self, line: str) -> None:
        self.log_pane.appendPlainText(line)

    # -- wizard protocol ---------------------------------------------------------------------
    def isComplete(self) -> bool:
        return self.state.all_stages_done() and self.current is None

    def cleanupPage(self) -> None:
        """Going Back while a stage runs cancels it (the run stays resumable)."""
        self.cancel()
