"""The rough edges a first run showed (issue 22), each pinned by a test that failed before its fix."""

from __future__ import annotations

import itertools
import shlex
from pathlib import Path

import pytest

from emloc_app.state import WizardState
from tests.app.fakes import FakeEngine
from tests.app.fakes import open_plan_page as plan_page


def test_show_command_names_the_run_folder_the_run_then_uses(qtbot, fake: FakeEngine, state: WizardState,  # type: ignore[no-untyped-def]
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    state.run_dir = None  # a new run: the page names its folder
    ticks = itertools.count()  # each call a second later, as when the user goes Back and Next again

    def new_run_dir(self: WizardState, parent: Path) -> Path:
        return parent / f"Llama-3.1-8B-Instruct-20261205-0815{next(ticks):02d}"

    monkeypatch.setattr(WizardState, "new_run_dir", new_run_dir)
    page = plan_page(qtbot, state)
    args = shlex.split(page.command())
    shown = args[args.index("--out") + 1]
    page.initializePage()  # Back to the Data page, then Next again
    assert page.validatePage()
    assert str(state.run_dir) == shown
