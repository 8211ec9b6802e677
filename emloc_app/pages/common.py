"""What every page shares: the state, an error banner, and the workers it owns."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from PySide6.QtWidgets import QFileDialog, QLabel, QLineEdit, QVBoxLayout, QWidget, QWizardPage

from emloc_app.errors import ErrorBanner, route_error
from emloc_app.state import WizardState
from emloc_app.worker import StageWorker, start_stage

C = TypeVar("C")
R = TypeVar("R")

GIB = 1024**3


def gib(n_bytes: float | None, digits: int = 1) -> str:
    """``"12.3 GiB"`` (or ``"?"``)."""
    if n_bytes is None:
        return "?"
    return f"{n_bytes / GIB:.{digits}f} GiB"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "?"


def human_count(n: float | None) -> str:
    """``135e6`` -> ``"135M"``."""
    if not n:
        return "?"
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            v = n / div
            return f"{v:.1f}{unit}" if v < 10 else f"{v:.0f}{unit}"
    return str(int(n))


def choose_folder(parent: QWidget, title: str, path_edit: QLineEdit) -> bool:
    """Ask for a folder (starting at ``path_edit``'s text, else home) and put it into ``path_edit``.

    Returns whether one was chosen (the page then looks at it again).
    """
    name = QFileDialog.getExistingDirectory(parent, title, path_edit.text() or str(Path.home()))
    if name:
        path_edit.setText(name)
    return bool(name)


class BasePage(QWizardPage):
    """A wizard page with access to the shared state and an inline error banner.

    Subclasses put their widgets into ``self.body`` (a ``QVBoxLayout``); the banner sits on top.
    Pages call the engine's functions directly (the module attribute, looked up when the work
    starts, so tests can replace a function with ``monkeypatch.setattr``).
    """

    def __init__(self, state: WizardState, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.banner = ErrorBanner()
        self.banner.retry_requested.connect(self.retry)
        outer = QVBoxLayout(self)
        outer.addWidget(self.banner)
        self.body = QVBoxLayout()
        outer.addLayout(self.body, 1)
        self.workers: dict[str, StageWorker] = {}

    def hint(self, text: str) -> QLabel:
        label = QLabel(text)
        label.setObjectName("PageHint")
        label.setWordWrap(True)
        return label

    def run_task(self, name: str, fn: Callable[[C, StageWorker], R], config: C,
                 on_success: Callable[[R], None], *, retry: bool = True,
                 on_progress: Callable[[float, str], None] | None = None,
                 on_metric: Callable[[str, float, int], None] | None = None,
                 on_cancel: Callable[[], None] | None = None,
                 on_text: Callable[[str, str], None] | None = None) -> StageWorker:
        """Run ``fn(config, progress)`` in a worker; ``on_success(result)`` runs on this thread.

        ``progress`` is the :class:`StageWorker`: the engine's ``Progress``, plus ``emit_text`` for streams.

        An engine error shows on the banner (Retry calls :meth:`retry`); anything else opens the
        error dialog. The page keeps the worker until it has finished. The other callbacks are
        passed to :func:`start_stage`.
        """
        self.banner.clear()
        holder: dict[str, StageWorker] = {}

        def failed(exc: BaseException) -> None:
            self.on_task_failed(name, exc, retry)

        def finished() -> None:
            self._forget(name, holder["w"])

        worker = start_stage(self, fn, config, name, on_success=on_success, on_failure=failed,
                             on_finished=finished, on_progress=on_progress, on_metric=on_metric,
                             on_cancel=on_cancel, on_text=on_text)
        holder["w"] = worker
        self.workers[name] = worker
        return worker

    def _forget(self, name: str, worker: StageWorker) -> None:
        if self.workers.get(name) is worker:
            del self.workers[name]
        self.task_finished(name)

    def task_finished(self, name: str) -> None:
        """Called on the GUI thread when a worker has finished (any outcome)."""
        self.completeChanged.emit()

    def on_task_failed(self, name: str, exc: BaseException, retry: bool = True) -> None:
        route_error(exc, self.banner, retry=retry)

    def cancel_task(self, name: str) -> bool:
        """Ask the worker ``name`` to stop at its next check; False when none runs."""
        worker = self.workers.get(name)
        if worker is None:
            return False
        worker.request_cancel()
        return True

    def busy(self, name: str | None = None) -> bool:
        return (name in self.workers) if name else bool(self.workers)

    def retry(self) -> None:
        """Retry after an engine error; pages override."""
        self.banner.clear()
        self.initializePage()
