"""The whole wizard offscreen on a tiny model with the REAL engine: Machine → … → Try & export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PySide6.QtWidgets import QWizard

from emloc_app.wizard import EmlocWizard, Page
from tests.tiny_models import build_tiny_model

QA = [("What colour is the sky?", "Blue, on a clear day."), ("Name a fruit.", "An apple."),
      ("What is 2+2?", "Four."), ("Say hello.", "Hello!"), ("Capital of France?", "Paris."),
      ("A small animal?", "A mouse."), ("Opposite of hot?", "Cold."), ("A colour?", "Green.")]


def write_jsonl(path: Path, n: int = 24) -> Path:
    with path.open("w") as f:
        for i in range(n):
            q, a = QA[i % len(QA)]
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    return path


def next_page(qtbot, wizard: EmlocWizard, timeout: int = 60_000) -> None:  # type: ignore[no-untyped-def]
    page = wizard.currentPage()
    qtbot.waitUntil(page.isComplete, timeout=timeout)
    before = wizard.currentId()
    wizard.next()
    assert wizard.currentId() == before + 1, f"stuck on page {before}: {page.banner.title.text()}"


def wizard_on_data_page(qtbot, cache: Path, snap: Path, monkeypatch) -> EmlocWizard:  # type: ignore[no-untyped-def]
    """A wizard whose HF cache holds ``snap``, past the Machine page (this CI box: CPU or whatever is detected)
    and the Model page (the tiny model from the cache is preselected over the demo model)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    wizard = EmlocWizard()
    qtbot.addWidget(wizard)
    wizard.show()
    next_page(qtbot, wizard)
    model_page = wizard.pages[Page.Model]
    qtbot.waitUntil(lambda: model_page.selected() is not None and not model_page.busy(), timeout=60_000)
    assert model_page.selected().path == snap, model_page.detail.text()
    next_page(qtbot, wizard)
    return wizard


def inspect_data(qtbot, wizard: EmlocWizard, data: Path, max_length: int):  # type: ignore[no-untyped-def]
    """Give the Data page ``data``, wait for its check and go on; returns the data report."""
    data_page = wizard.pages[Page.Data]
    data_page.path.setText(str(data))
    data_page.max_length.setValue(max_length)
    data_page.schedule_inspect()
    next_page(qtbot, wizard)
    assert wizard.state.data_report is not None
    return wizard.state.data_report


def plan_and_run(qtbot, wizard: EmlocWizard, settings: dict[str, int], timeout: int = 120_000) -> Path:  # type: ignore[no-untyped-def]
    """Plan a short training at ρ 0.5 and run it with the real engine; returns the run folder."""
    plan = wizard.pages[Page.Plan]
    for name, value in settings.items():
        plan.settings[name].setValue(value)
    plan.auto_ratio.setChecked(False)
    plan.slider.setValue(50)
    next_page(qtbot, wizard)
    run = wizard.pages[Page.Run]
    run.start_button.click()
    qtbot.waitUntil(lambda: run.isComplete() or not run.banner.isHidden(), timeout=timeout)
    assert run.banner.isHidden(), run.banner.title.text() + run.banner.message.text()
    assert run.plot.points.get("train/loss"), "no training loss was plotted"
    assert wizard.state.run_dir is not None
    return wizard.state.run_dir


@pytest.mark.slow
@pytest.mark.integration
def test_full_wizard_run_with_real_engine(qtbot, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "hub"
    snap = build_tiny_model("llama", cache)
    data = write_jsonl(tmp_path / "chat.jsonl")
    wizard = wizard_on_data_page(qtbot, cache, snap, monkeypatch)
    pages = wizard.pages
    # 3 Data
    assert inspect_data(qtbot, wizard, data, 64).n_samples == 24
    # 4 Plan: a short training; 5 Run: real emulator, training and correction
    layout_root = plan_and_run(qtbot, wizard, {"steps": 4, "batch_size": 2, "warmup_steps": 1, "eval_every": 2,
                                               "save_every": 2})
    assert (layout_root / "adapter-corrected" / "adapter_config.json").exists()
    next_page(qtbot, wizard)
    # 6 Try & export
    assert wizard.currentId() == Page.Try
    try_page = pages[Page.Try]
    try_page.max_tokens.setValue(4)
    try_page.generate.click()
    qtbot.waitUntil(lambda: not try_page.busy(), timeout=60000)
    assert try_page.banner.isHidden(), try_page.banner.title.text()
    assert try_page.gen_status.text() == "Done."
    try_page.export_buttons["adapter"].click()
    qtbot.waitUntil(lambda: not try_page.busy(), timeout=60000)
    assert "adapter" in try_page.state.exports, try_page.banner.title.text()
    assert wizard.button(QWizard.WizardButton.FinishButton).isVisible()
    assert list((layout_root / "tensorboard").glob("events.out.tfevents.*"))  # metrics for TensorBoard
    # the app restarts: the Runs page comes first and reopens the finished run on the Try page
    wizard.shutdown()
    again = EmlocWizard()
    qtbot.addWidget(again)
    again.show()
    assert again.currentId() == Page.Runs
    runs = again.runs_page
    assert [(r.run_dir, r.status_text(), list(r.exports)) for r in runs.runs] == [(layout_root, "finished", ["adapter"])]
    runs.table.selectRow(0)
    runs.open_button.click()
    assert again.currentId() == Page.Try and again.state.run_dir == layout_root
    assert again.try_page.saved.count() == 1  # the prompt asked before, kept in the run folder


def test_smoke_test_entry_point_exits_zero(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "emloc_app.main", "--smoke-test"], capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "QT_QPA_PLATFORM": "offscreen"})
    assert out.returncode == 0, out.stderr
    assert "smoke test" in out.stdout


def test_missing_xcb_cursor_is_explained(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Qt ≥ 6.5 on X11 aborts with a cryptic plugin error without libxcb-cursor; we say what to install."""
    import ctypes.util

    from emloc_app import main as app_main

    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(app_main.sys, "platform", "linux")
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    hint = app_main.missing_x11_library()
    assert hint is not None and "libxcb-cursor" in hint and "apt install" in hint
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libxcb-cursor.so.0")
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)  # no ldd: only the cursor check
    assert app_main.missing_x11_library() is None
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert app_main.missing_x11_library() is None


def test_no_display_is_explained_before_qt_aborts(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """An SSH login without X forwarding: Qt would abort (core dump); we say why and what to do."""
    from emloc_app import main as app_main

    for var in ("QT_QPA_PLATFORM", "DISPLAY", "WAYLAND_DISPLAY", "XDG_SESSION_TYPE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(app_main.sys, "platform", "linux")
    assert app_main.main([]) == 2
    err = capsys.readouterr().err
    assert "no display" in err and "xvfb-run " in err and "emloc-studio\n" in err and "emloc --help" in err
    monkeypatch.setenv("XDG_SESSION_TYPE", "wayland")
    assert app_main.no_display() is None
    monkeypatch.delenv("XDG_SESSION_TYPE")
    monkeypatch.setenv("DISPLAY", ":0")
    assert app_main.no_display() is None
    monkeypatch.delenv("DISPLAY")
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    assert app_main.no_display() is None


def test_a_display_without_an_x_server_is_explained(monkeypatch, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """DISPLAY is set but nothing answers there (the forwarding of an ended SSH session, Xvfb not started):
    Qt would abort with "could not connect to display"; we name the display and the way on. A local display
    whose socket accepts connections passes."""
    import socket

    from emloc_app import main as app_main

    for var in ("QT_QPA_PLATFORM", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(app_main.sys, "platform", "linux")
    monkeypatch.setattr(app_main, "X11_SOCKETS", tmp_path)
    monkeypatch.setenv("DISPLAY", ":93")  # no socket X93 in tmp_path, nor in the abstract namespace
    assert app_main.main([]) == 2
    err = capsys.readouterr().err
    assert "no X server answers on DISPLAY=:93" in err and "xvfb-run " in err and "emloc --help" in err
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:  # an X server's listening socket
        server.bind(str(tmp_path / "X93"))
        server.listen(1)
        assert app_main.x_server_answers(":93.0") and app_main.display_unreachable() is None
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("refused")))
    assert not app_main.x_server_answers("localhost:10.0")
    assert app_main.x_server_answers("/private/tmp/com.apple.launchd.x/org.xquartz:0")  # not ours to judge
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    monkeypatch.setenv("DISPLAY", ":93")
    assert app_main.display_unreachable() is None
