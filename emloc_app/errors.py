"""Engine errors shown on the page that caused them, with a Retry button.

Bad input and engine errors (:class:`~emloc_engine.core.errors.EngineError`) stay on the page as an
:class:`ErrorBanner`; anything else is a bug and goes to the error dialog
(:func:`emloc_app.error_dialog.show_error_dialog`). :func:`route_error` makes that choice.
"""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from emloc_engine.core.errors import EngineError


def error_text(exc: BaseException) -> str:
    """The user-facing text of an engine error: summary, every problem, and the fix."""
    return str(exc) or type(exc).__name__


class ErrorBanner(QFrame):
    """A red-edged box with the message of an engine error and a Retry button.

    Signals:
        retry_requested(): the user pressed Retry.
    """

    retry_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("ErrorBanner")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.title = QLabel()
        self.title.setObjectName("ErrorTitle")
        self.title.setWordWrap(True)
        self.message = QLabel()
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.retry = QPushButton("&Retry")
        self.retry.clicked.connect(self.retry_requested)
        text = QVBoxLayout()
        text.addWidget(self.title)
        text.addWidget(self.message)
        row = QHBoxLayout(self)
        row.addLayout(text, 1)
        row.addWidget(self.retry, 0, Qt.AlignmentFlag.AlignTop)
        self.exception: BaseException | None = None
        self.hide()

    def show_error(self, exc: BaseException, *, retry: bool = True) -> None:
        """Show ``exc`` (an engine error): its summary in bold, problems and fix below."""
        self.exception = exc
        if isinstance(exc, EngineError):
            self.title.setText(exc.summary)
            rest = [f"• {p}" for p in exc.problems]
            if exc.hint:
                rest.append(f"Fix: {exc.hint}")
            self.message.setText("\n".join(rest))
            self.message.setVisible(bool(rest))
        else:
            self.title.setText(error_text(exc))
            self.message.hide()
        self.retry.setVisible(retry)
        self.show()

    def clear(self) -> None:
        self.exception = None
        self.hide()


def route_error(exc: BaseException, banner: ErrorBanner, *, retry: bool = True,
                dialog: Callable[[BaseException], object] | None = None) -> None:
    """Show an engine error on ``banner``; send anything else to the error dialog."""
    if isinstance(exc, EngineError):
        banner.show_error(exc, retry=retry)
        return
    if dialog is None:
        from emloc_app.error_dialog import show_error_dialog

        dialog = show_error_dialog
    dialog(exc)
