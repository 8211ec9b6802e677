"""The EMLoC Studio wizard: six pages from "what can this machine do" to an exported model."""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path

from PySide6.QtCore import QSize
from PySide6.QtGui import QCloseEvent, QIcon
from PySide6.QtWidgets import QWidget, QWizard

from emloc_app.pages.common import BasePage
from emloc_app.pages.data_page import DataPage
from emloc_app.pages.gallery_page import GalleryPage
from emloc_app.pages.image_data_page import ImageDataPage
from emloc_app.pages.image_plan_page import ImagePlanPage
from emloc_app.pages.image_run_page import ImageRunPage
from emloc_app.pages.machine_page import MachinePage
from emloc_app.pages.model_page import ModelPage
from emloc_app.pages.plan_page import PlanPage
from emloc_app.pages.run_page import RunPage
from emloc_app.pages.runs_page import RunsPage
from emloc_app.pages.try_page import TryPage
from emloc_app.settings import Settings
from emloc_app.state import WizardState
from emloc_app.worker import shutdown_workers


class Page(IntEnum):
    """Page ids, in order."""

    Machine = 0
    Model = 1
    Data = 2
    Plan = 3
    Run = 4
    Try = 5
    Runs = 6  # the start page when runs exist (its Next goes to Machine; the Try page is the last)
    ImageData = 7  # image models: in place of Data (its Next goes to Plan)
    Gallery = 8  # image runs: in place of Try (the last page)
    ImagePlan = 9  # image models: in place of Plan (its Next goes to ImageRun)
    ImageRun = 10  # image models: in place of Run (its Next goes to Gallery)


IMAGE_PAGES = {Page.Data: Page.ImageData, Page.Plan: Page.ImagePlan, Page.Run: Page.ImageRun,
               Page.Try: Page.Gallery}
"""For an image model (``WizardState.is_image_model``) the wizard shows these pages in place of the keys."""


class EmlocWizard(QWizard):
    """Thin container: pages read and write ``state`` and call the engine themselves."""

    def __init__(self, state: WizardState | None = None, settings: Settings | None = None,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.state = state or WizardState()
        self.settings = settings or Settings()
        self.setWindowTitle("EMLoC Studio")
        self.setWizardStyle(QWizard.WizardStyle.ModernStyle)
        self.setOption(QWizard.WizardOption.NoBackButtonOnStartPage, True)
        self.setOption(QWizard.WizardOption.NoCancelButton, False)
        self.setButtonText(QWizard.WizardButton.FinishButton, "&Done")
        self.setButtonText(QWizard.WizardButton.CancelButton, "&Quit")
        self.setMinimumSize(QSize(960, 700))
        icon = Path(__file__).parent / "resources" / "icon.svg"
        if icon.exists():
            self.setWindowIcon(QIcon(str(icon)))
        self.machine_page = MachinePage(self.state)
        self.model_page = ModelPage(self.state)
        self.data_page = DataPage(self.state)
        self.plan_page = PlanPage(self.state)
        self.run_page = RunPage(self.state)
        self.try_page = TryPage(self.state)
        self.runs_page = RunsPage(self.state, self.settings, {"new": Page.Machine, "run": Page.Run, "try": Page.Try,
                                                                     "gallery": Page.Gallery,
                                                                     "image_run": Page.ImageRun})
        self.image_data_page = ImageDataPage(self.state)
        self.gallery_page = GalleryPage(self.state)
        self.image_plan_page = ImagePlanPage(self.state)
        self.image_run_page = ImageRunPage(self.state)
        self.pages: dict[Page, BasePage] = {
            Page.Machine: self.machine_page, Page.Model: self.model_page, Page.Data: self.data_page,
            Page.Plan: self.plan_page, Page.Run: self.run_page, Page.Try: self.try_page,
            Page.Runs: self.runs_page, Page.ImageData: self.image_data_page, Page.Gallery: self.gallery_page,
            Page.ImagePlan: self.image_plan_page, Page.ImageRun: self.image_run_page,
        }
        for pid, page in self.pages.items():
            self.setPage(int(pid), page)
        self.currentIdChanged.connect(self._page_changed)
        self.setStartId(int(Page.Runs if self.runs_page.has_runs() else Page.Machine))
        if self.state.model_dir is None and self.settings.last_model is not None:
            self.state.model_dir = self.settings.last_model
            config_dir = self.settings.last_config_dir  # a single file's pipeline folder, preselected again
            if self.state.config_dir is None and config_dir is not None and config_dir.is_dir() \
                    and self.state.model_dir.is_file():
                self.state.config_dir = config_dir
        if self.state.data_path is None and self.settings.last_data is not None \
                and self.settings.last_data.exists():
            self.state.data_path = self.settings.last_data
        geometry = self.settings.geometry()
        if geometry is not None:
            self.restoreGeometry(geometry)
        else:
            self.resize(1040, 780)

    def nextId(self) -> int:
        """The pages' own order, with the image pages in place of Data and Try for an image model."""
        nxt = super().nextId()
        if nxt >= 0 and self.state.is_image_model:
            return int(IMAGE_PAGES.get(Page(nxt), Page(nxt)))
        return nxt

    def page_widget(self, pid: Page) -> QWidget:
        return self.pages[pid]

    def _page_changed(self, pid: int) -> None:
        s = self.state
        if pid in (Page.Data, Page.ImageData) and s.model_dir is not None:
            self.settings.last_model = s.model_dir
            self.settings.last_config_dir = s.config_dir
        if pid == Page.Plan and s.data_path is not None:
            self.settings.last_data = s.data_path
        if pid == Page.Run and s.run_dir is not None:
            self.settings.add_recent_run(s.run_dir)

    def closeEvent(self, event: QCloseEvent) -> None:
        self.shutdown()
        super().closeEvent(event)

    def done(self, result: int) -> None:
        self.shutdown()
        super().done(result)

    def shutdown(self) -> None:
        """Remember the window, cancel every running stage and wait for its thread."""
        self.settings.set_geometry(self.saveGeometry())
        self.settings.sync()
        shutdown_workers()
