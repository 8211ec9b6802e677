"""Engine errors stay on the page with Retry; anything else opens the dialog with details and the log path."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from PySide6.QtWidgets import QMessageBox

from emloc_app import error_dialog
from emloc_app.errors import ErrorBanner, route_error
from emloc_app.pages.machine_page import MachinePage
from emloc_app.state import WizardState
from emloc_engine.core.errors import DataError, InsufficientMemory
from tests.app.fakes import FakeEngine


def test_engine_error_shows_inline_with_problems_fix_and_retry(qtbot) -> None:  # type: ignore[no-untyped-def]
    banner = ErrorBanner()
    qtbot.addWidget(banner)
    exc = DataError("2 records cannot be used.", problems=["data.jsonl:3: no assistant turn", "data.jsonl:9: bad JSON"],
                    hint="Fix those lines.")
    route_error(exc, banner, dialog=lambda e: (_ for _ in ()).throw(AssertionError("no dialog expected")))
    assert banner.isVisibleTo(banner.parentWidget() or banner) or not banner.isHidden()
    assert banner.title.text() == "2 records cannot be used."
    assert "data.jsonl:3" in banner.message.text() and "Fix: Fix those lines." in banner.message.text()
    retried: list[bool] = []
    banner.retry_requested.connect(lambda: retried.append(True))
    banner.retry.click()
    assert retried == [True]


def test_other_exceptions_open_the_dialog_with_traceback_and_log_path(qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    error_dialog.set_log_path(tmp_path / "emloc-studio.log")
    banner = ErrorBanner()
    qtbot.addWidget(banner)
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError as exc:
        route_error(exc, banner)
    assert banner.isHidden()
    dialogs = error_dialog.open_error_dialogs()
    assert len(dialogs) == 1
    box = dialogs[0]
    assert "ZeroDivisionError: boom" in box.text()
    assert str(tmp_path / "emloc-studio.log") in box.informativeText()
    assert 'raise ZeroDivisionError("boom")' in box.detailedText()
    box.done(QMessageBox.StandardButton.Close)
    qtbot.waitUntil(lambda: not error_dialog.open_error_dialogs(), timeout=60_000)


def test_page_shows_engine_error_and_retry_reruns(qtbot, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    fake = FakeEngine(tmp_path, fail={"detect_machine": InsufficientMemory("No memory.", hint="Close apps.")})
    fake.install(monkeypatch.setattr)
    page = MachinePage(WizardState())
    qtbot.addWidget(page)
    page.initializePage()
    qtbot.waitUntil(lambda: not page.banner.isHidden(), timeout=60_000)
    assert page.banner.title.text() == "No memory."
    assert not page.isComplete()
    del fake.fail["detect_machine"]
    page.banner.retry.click()
    qtbot.waitUntil(page.isComplete, timeout=60_000)
    assert page.banner.isHidden()


def test_excepthooks_route_uncaught_errors_to_the_dialog(qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    old_sys, old_thread = sys.excepthook, threading.excepthook
    try:
        error_dialog.install_excepthooks(tmp_path / "x.log")

        def bad() -> None:
            raise KeyError("from a thread")

        t = threading.Thread(target=bad)
        t.start()
        t.join()
        qtbot.waitUntil(lambda: len(error_dialog.open_error_dialogs()) == 1, timeout=60_000)
        box = error_dialog.open_error_dialogs()[0]
        assert "from a thread" in box.text()
        box.done(0)
    finally:
        sys.excepthook, threading.excepthook = old_sys, old_thread
