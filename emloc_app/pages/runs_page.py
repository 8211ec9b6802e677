"""The Runs page: every run this app made or opened, with what it is; open, resume, compare, delete.

It is the wizard's start page when runs exist. Runs are the folders under the app's runs folder
(``paths.runs_dir()``) and the recent runs in the settings (folders chosen elsewhere); each row is the
engine's :class:`~emloc_engine.run.history.RunSummary` of its manifest.

* **Open** a finished run: the Try & export page, on that run. An unfinished one: the Run page, planned
  again from its recorded settings on this machine, with Resume ready.
* **Resume**: the same, and the run continues at once (finished stages are skipped by the orchestrator).
* Image runs (``emloc image``, the app's image pages) go the same way to their own pages: a finished one
  opens the gallery; an unfinished one the image Run page with the settings it was started with
  (:func:`~emloc_engine.images.run_record.read_image_run_config`; ρ and the resolution are fixed by
  what the folder holds), and Resume starts it (the cache, emulator and training checkpoints are reused).
* **Compare curves**: two selected runs' train and eval loss on one chart (from their ``metrics.jsonl``,
  else the training result in the manifest).
* **Delete…**: after a confirmation, the folder goes to the system trash; where there is no trash, a
  second confirmation deletes it for good (renamed to a hidden name first, then removed:
  :func:`~emloc_engine.run.history.delete_run`). Only EMLoC run folders (text or image) that no run is
  using are touched (:func:`~emloc_engine.run.history.check_deletable`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QFile, Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QMessageBox,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
    QWizard,
)

from emloc_app.pages.common import BasePage
from emloc_app.settings import Settings
from emloc_app.state import WizardState
from emloc_app.widgets.compare_plot import ComparePlot
from emloc_engine.core import paths
from emloc_engine.core.errors import ConfigError, EngineError, RunStateError
from emloc_engine.core.progress import Progress
from emloc_engine.machine.hardware import MachineInfo
from emloc_engine.run.config import RunConfig
from emloc_engine.run.history import RunSummary, check_deletable, delete_run, find_runs, loss_curves
from emloc_engine.run.plan import RunPlan

if TYPE_CHECKING:
    from emloc_engine.images.run import ImageRunConfig

COLUMNS = ("Model", "Data", "Started", "Status", "Train loss", "Eval loss", "Exports")


def move_to_trash(path: Path) -> bool:
    """Move ``path`` to the system trash (Qt's ``QFile.moveToTrash``); False where there is none."""
    return bool(QFile.moveToTrash(str(path)))


@dataclass(frozen=True)
class Planned:
    machine: MachineInfo
    plan: RunPlan
    device_note: str = ""  # the recorded device is not here: where the run continues instead


@dataclass(frozen=True)
class ImageReopened:
    machine: MachineInfo
    config: ImageRunConfig
    device_note: str = ""


def image_config_again(run_dir: Path, progress: Progress) -> ImageReopened:
    """An image run's recorded settings, on a device of this machine, for the image Run page (the worker's task:
    it imports torch)."""
    from emloc_engine.images.run_record import read_image_run_config
    from emloc_engine.machine.hardware import detect_machine
    from emloc_engine.machine.resume_device import resume_device

    progress.update(0.2, "Reading the run's settings…")
    cfg = read_image_run_config(run_dir)
    progress.update(0.5, "Detecting this machine…")
    machine = detect_machine()
    where = resume_device(cfg.device, machine)
    return ImageReopened(machine, dataclasses.replace(cfg, device=where.device), where.note)


def plan_again(cfg: RunConfig, progress: Progress) -> Planned:
    """The run's recorded settings planned on this machine (as the Plan page would), for the Run page; a recorded
    GPU this machine lacks is replaced (:func:`~emloc_engine.machine.resume_device.resume_device`)."""
    from emloc_engine.machine.hardware import detect_machine
    from emloc_engine.machine.resume_device import resume_device
    from emloc_engine.run.plan import plan_run

    progress.update(0.1, "Detecting this machine…")
    machine = detect_machine()
    where = resume_device(cfg.device, machine)
    progress.update(0.5, "Planning the run's memory…")
    return Planned(machine, plan_run(dataclasses.replace(cfg, device=where.device), machine), where.note)


def _loss(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "–"


class RunsPage(BasePage):
    """Every run with its model, data, date, status, final losses and exports.

    Args:
        state: the wizard's state; opening a run fills it from the run's manifest.
        settings: the app's settings (recent runs).
        targets: page ids to go to: ``new`` (a new run), ``run`` (the Run page), ``try`` (Try & export);
            for image runs ``gallery`` and ``image_run`` (the image Run page).
    """

    def __init__(
        self,
        state: WizardState,
        settings: Settings,
        targets: Mapping[str, int],
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(state, parent)
        self.settings = settings
        self.targets = dict(targets)
        self._target = self.targets["new"]
        self.setTitle("Your runs")
        self.setSubTitle(
            "Open a run to try and export it, resume one that stopped, or start a new one with Next."
        )
        self.setButtonText(QWizard.WizardButton.NextButton, "&New run >")
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setObjectName("runs")
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.verticalHeader().hide()
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        header = self.table.horizontalHeader()
        for i in range(len(COLUMNS)):
            header.setSectionResizeMode(i, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.itemSelectionChanged.connect(self._selection_changed)
        self.table.cellDoubleClicked.connect(lambda row, _col: self.open_selected())
        self.open_button = QPushButton("&Open")
        self.open_button.setToolTip(
            "A finished run: try and export it. An unfinished one: the Run page, ready to resume."
        )
        self.resume_button = QPushButton("&Resume")
        self.resume_button.setToolTip("Continue a stopped or failed run where it stopped.")
        self.compare_button = QPushButton("&Compare curves")
        self.compare_button.setToolTip("Select two runs to see their loss curves on one chart.")
        self.delete_button = QPushButton("&Delete…")
        self.delete_button.setToolTip("Move the run folder to the trash (asks first).")
        self.open_button.clicked.connect(self.open_selected)
        self.resume_button.clicked.connect(self.resume_selected)
        self.compare_button.clicked.connect(self.compare_selected)
        self.delete_button.clicked.connect(self.delete_selected)
        buttons = QHBoxLayout()
        for b in (self.open_button, self.resume_button, self.compare_button, self.delete_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        self.detail = self.hint("")
        self.detail.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.compare = ComparePlot()
        self.compare.hide()
        self.body.addWidget(self.table, 2)
        self.body.addLayout(buttons)
        self.body.addWidget(self.detail)
        self.body.addWidget(self.compare, 2)
        self.runs: list[RunSummary] = []
        self.refresh()

    # -- listing -------------------------------------------------------------------------------
    def list_runs(self) -> list[RunSummary]:
        """The runs under the app's runs folder and the recent runs of the settings, newest first."""
        return find_runs([paths.runs_dir()], self.settings.recent_runs())

    def has_runs(self) -> bool:
        return bool(self.runs)

    def refresh(self) -> None:
        self.runs = self.list_runs()
        self.table.setRowCount(len(self.runs))
        for row, run in enumerate(self.runs):
            exports = ", ".join(run.exports) or "–"
            cells = (
                run.model if not run.is_image else f"{run.model} · {run.kind}",
                run.data,
                run.created_local(),
                run.status_text(),
                _loss(run.final_train_loss),
                _loss(run.final_eval_loss),
                exports,
            )
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(str(run.run_dir) if col != 3 else (run.message or run.status_text()))
                self.table.setItem(row, col, item)
        if self.runs and not self.table.selectedIndexes():
            self.table.selectRow(0)  # the newest run is selected: its buttons work at once
        self._selection_changed()

    def initializePage(self) -> None:
        self.banner.clear()
        self._target = self.targets["new"]
        self.refresh()

    def selected(self) -> list[RunSummary]:
        rows = sorted({i.row() for i in self.table.selectedIndexes()})
        return [self.runs[r] for r in rows if r < len(self.runs)]

    def _selection_changed(self) -> None:
        chosen = self.selected()
        one = len(chosen) == 1
        usable = one and chosen[0].status not in ("unreadable", "running")
        self.open_button.setEnabled(usable)
        self.resume_button.setEnabled(usable and chosen[0].status in ("stopped", "failed"))
        self.compare_button.setEnabled(len(chosen) == 2)
        self.delete_button.setEnabled(one and chosen[0].status != "running")
        if one:
            run = chosen[0]
            ratio = f" · ρ = {run.ratio:.2f}" if run.ratio is not None else ""
            why = f"<br>{run.message}" if run.message else ""
            self.detail.setText(f"{run.run_dir}{ratio}{why}")
        else:
            self.detail.setText("")

    # -- opening -------------------------------------------------------------------------------
    def nextId(self) -> int:
        return self._target

    def adopt(self, run: RunSummary) -> None:
        """Fill the wizard's state from the run's manifest, or an image run's ``image_run.json`` (the machine
        found so far is kept)."""
        from emloc_app.image_runs import image_state_from_run_dir
        from emloc_app.main import state_from_run_dir

        opened = image_state_from_run_dir(run.run_dir) if run.is_image else state_from_run_dir(run.run_dir)[0]
        keep = {"machine": self.state.machine, "gpu_index": self.state.gpu_index}
        for f in dataclasses.fields(WizardState):
            setattr(self.state, f.name, getattr(opened, f.name))
        for name, value in keep.items():
            setattr(self.state, name, value)
        self.adopt_device(opened.config.device if opened.config is not None else "")
        self.settings.add_recent_run(run.run_dir)

    def adopt_device(self, device: str) -> None:
        """The Machine page's device from a run's recorded one (``cuda:N`` or ``cpu``; else unchanged)."""
        if device.startswith("cuda:"):
            self.state.gpu_index = int(device.split(":")[1])
        elif device == "cpu":
            self.state.gpu_index = None

    def open_selected(self) -> None:
        chosen = self.selected()
        if len(chosen) == 1:
            self.open_run(chosen[0])

    def resume_selected(self) -> None:
        chosen = self.selected()
        if len(chosen) == 1:
            self.open_run(chosen[0], resume=True)

    def open_run(self, run: RunSummary, *, resume: bool = False) -> None:
        """Go to the Try page or gallery (finished) or the planned Run page (unfinished; ``resume`` also starts it)."""
        if self.busy("plan"):
            return
        try:
            self.adopt(run)
        except EngineError as exc:
            self.banner.show_error(exc, retry=False)
            return
        if run.finished and not resume:
            self.go(self.targets.get("gallery", self.targets["try"]) if run.is_image else self.targets["try"])
            return
        if run.is_image:
            self.detail.setText("Reading the run's settings…")
            self.run_task("plan", image_config_again, run.run_dir,
                          lambda cfg: self._image_planned(cfg, resume), retry=False)
            return
        cfg = self.state.config
        if cfg is None:
            self.banner.show_error(
                ConfigError(
                    f"{run.run_dir} was made by per-stage commands; its settings are not recorded as a whole run.",
                    hint="Continue it with the emloc command that made it (emloc train / correct / export).",
                ),
                retry=False,
            )
            return
        self.detail.setText("Planning the run on this machine…")
        self.run_task("plan", plan_again, cfg, lambda planned: self._planned(planned, resume), retry=False)

    def _planned(self, planned: Planned, resume: bool) -> None:
        self.state.machine = planned.machine
        self.state.run_plan = planned.plan
        self.state.config = planned.plan.config
        self.state.device_note = planned.device_note
        self.adopt_device(planned.plan.config.device)
        self.go_and_start(self.targets["run"], resume)

    def _image_planned(self, reopened: ImageReopened, resume: bool) -> None:
        self.state.machine = reopened.machine
        self.state.image_run = reopened.config
        self.state.device_note = reopened.device_note
        self.adopt_device(reopened.config.device)
        self.go_and_start(self.targets.get("image_run", self.targets["run"]), resume)

    def go_and_start(self, page_id: int, start: bool) -> None:
        """Go to a Run page (text or image); with ``start``, start (resume) it there."""
        self.go(page_id)
        if start:
            page = self.wizard().currentPage() if self.wizard() is not None else None
            begin = getattr(page, "start", None)
            if callable(begin):
                begin()

    def go(self, page_id: int) -> None:
        """Leave for ``page_id`` (the wizard's Back comes back here)."""
        self._target = page_id
        wizard = self.wizard()
        if wizard is not None:
            wizard.next()
        self._target = self.targets["new"]

    def validatePage(self) -> bool:
        """Next with the default target is "New run": forget any run opened before (the machine stays)."""
        if self._target == self.targets["new"] and self.state.run_dir is not None:
            fresh = WizardState(
                machine=self.state.machine,
                gpu_index=self.state.gpu_index,
                budget_bytes=self.state.budget_bytes,
            )
            for f in dataclasses.fields(WizardState):
                setattr(self.state, f.name, getattr(fresh, f.name))
        return True

    # -- compare, delete ---------------------------------------------------------------------------
    def compare_selected(self) -> None:
        chosen = self.selected()
        if len(chosen) != 2:
            return
        runs = [(f"{r.model} · {r.created_local()}", loss_curves(r.run_dir)) for r in chosen]
        self.compare.show_runs(runs)
        self.compare.show()
        if not self.compare.labels:
            self.detail.setText("Neither run has logged a loss yet.")

    def delete_selected(self) -> None:
        chosen = self.selected()
        if len(chosen) != 1:
            return
        run = chosen[0]
        try:
            folder = check_deletable(run.run_dir)
        except RunStateError as exc:
            self.banner.show_error(exc, retry=False)
            return
        if not self._confirm_delete(
            QMessageBox.question,
            f"Move the run folder\n{folder}\n({run.model}, {run.status_text()}) to the trash?",
        ):
            return
        if not move_to_trash(folder):
            if not self._confirm_delete(
                QMessageBox.warning, f"This system has no trash for {folder}.\nDelete the folder for good?"
            ):
                return
            try:
                delete_run(folder)
            except (RunStateError, OSError) as exc:
                self.banner.show_error(
                    exc if isinstance(exc, EngineError) else RunStateError(str(exc)), retry=False
                )
                return
        if self.state.run_dir is not None and Path(self.state.run_dir).resolve() == folder:
            self.state.run_dir = None
        self.refresh()

    def _confirm_delete(self, ask: Callable[..., QMessageBox.StandardButton], text: str) -> bool:
        """Ask Yes/Cancel (Cancel the default) with ``QMessageBox.question`` or ``.warning``: True on Yes."""
        buttons = QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel
        answer = ask(self, "Delete run", text, buttons, QMessageBox.StandardButton.Cancel)
        return bool(answer == QMessageBox.StandardButton.Yes)

    def isComplete(self) -> bool:
        return True  # "New run" is always possible, also while an opened run is being planned
