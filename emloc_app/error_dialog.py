"""The one place unexpected errors are shown: a dialog with a "Details…" traceback and the log path.

:func:`install_excepthooks` routes ``sys.excepthook`` and ``threading.excepthook`` here (uncaught
exceptions in slots and in plain Python threads), after writing them to the log file.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from pathlib import Path
from types import TracebackType

from PySide6.QtCore import QObject, Qt, Signal, Slot
from PySide6.QtWidgets import QApplication, QMessageBox, QWidget

log = logging.getLogger(__name__)

_log_path: Path | None = None
_open_dialogs: list[QMessageBox] = []


def set_log_path(path: Path | None) -> None:
    global _log_path
    _log_path = path


def format_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def build_error_dialog(exc: BaseException, parent: QWidget | None = None) -> QMessageBox:
    """A non-blocking message box for an unexpected error (shown with ``open()``)."""
    box = QMessageBox(parent)
    box.setObjectName("ErrorDialog")
    box.setIcon(QMessageBox.Icon.Critical)
    box.setWindowTitle("EMLoC Studio: unexpected error")
    box.setText(f"<b>Something went wrong that EMLoC Studio did not expect.</b><br>"
                f"{type(exc).__name__}: {_escape(str(exc))}")
    where = f"The full log is in:<br><code>{_log_path}</code><br>" if _log_path else ""
    box.setInformativeText(where + "Please include the details when you report this problem.")
    box.setDetailedText(format_traceback(exc))  # adds the "Show Details…" button
    box.setStandardButtons(QMessageBox.StandardButton.Close)
    box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    return box


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def show_error_dialog(exc: BaseException, parent: QWidget | None = None) -> QMessageBox:
    """Log ``exc`` and open the error dialog without blocking; returns the dialog."""
    log.error("unexpected error", exc_info=(type(exc), exc, exc.__traceback__))
    if parent is None:
        parent = QApplication.activeWindow()
    box = build_error_dialog(exc, parent)
    _open_dialogs.append(box)
    box.finished.connect(lambda _=0, b=box: _open_dialogs.remove(b) if b in _open_dialogs else None)
    box.open()
    return box


def open_error_dialogs() -> list[QMessageBox]:
    """Error dialogs currently open (for tests)."""
    return list(_open_dialogs)


class _Relay(QObject):
    """Moves exceptions raised in other threads to the GUI thread (signals are queued)."""

    raised = Signal(object)

    @Slot(object)
    def show(self, exc: BaseException) -> None:
        show_error_dialog(exc)


_relay: _Relay | None = None


def install_excepthooks(log_path: Path | None = None) -> None:
    """Route uncaught exceptions (GUI thread and Python threads) into the error dialog."""
    global _relay
    set_log_path(log_path)
    _relay = _Relay()
    _relay.raised.connect(_relay.show, Qt.ConnectionType.QueuedConnection)

    def hook(tp: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if issubclass(tp, KeyboardInterrupt):
            sys.__excepthook__(tp, exc, tb)
            return
        if exc.__traceback__ is None:
            exc = exc.with_traceback(tb)
        sys.__excepthook__(tp, exc, tb)  # still visible on a terminal
        if _relay is not None and QApplication.instance() is not None:
            _relay.raised.emit(exc)

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None:
            hook(args.exc_type, args.exc_value, args.exc_traceback)

    sys.excepthook = hook
    threading.excepthook = thread_hook
