"""``emloc-studio``: start the wizard (or ``--smoke-test`` it, or open ``--run-dir`` a previous run)."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

from emloc_engine.core import paths
from emloc_engine.core.version import __version__

if TYPE_CHECKING:
    from emloc_app.state import WizardState

log = logging.getLogger("emloc_app")


def log_file() -> Path:
    """``paths.app_data_dir()/logs/emloc-studio.log``."""
    return paths.app_data_dir() / "logs" / "emloc-studio.log"


def setup_logging(level: int = logging.INFO) -> Path:
    """Log the app and the engine to a rotating file (and warnings to stderr); returns the file."""
    path = log_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=5_000_000, backupCount=3, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"))
    for name in ("emloc_app", "emloc_engine"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(level)
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="emloc-studio", description="EMLoC Studio: fine-tune the model you run.")
    p.add_argument("--version", action="version", version=f"emloc-studio {__version__}")
    p.add_argument("--run-dir", type=Path, help="Open a previous run folder (resume it or try and export it).")
    p.add_argument("--smoke-test", action="store_true",
                   help="Open the first page offscreen, process events, quit with exit status 0.")
    return p.parse_args(argv)


def state_from_run_dir(run_dir: Path) -> tuple[WizardState, bool]:
    """A ``WizardState`` prefilled from a run folder's manifest (its ``RunConfig``); and whether every stage is done.

    Raises:
        RunStateError: the folder has no manifest, or an unreadable one.
    """
    from emloc_app.state import STAGE_ORDER, WizardState
    from emloc_engine.core.errors import RunStateError
    from emloc_engine.run.manifest import read_manifest

    manifest = read_manifest(run_dir)
    if manifest is None:
        raise RunStateError(f"{run_dir} is not a run folder (no manifest.json).",
                            hint="Choose the folder that contains manifest.json.")
    state = WizardState(run_dir=run_dir, config=manifest.config)
    state.done = {name for name in STAGE_ORDER if manifest.stage(name).done}
    cfg = manifest.config
    if cfg is None:  # a folder of per-stage commands, or of an older version: only the inputs are known
        model, data = manifest.inputs.get("model"), manifest.inputs.get("data")
        state.model_dir = Path(model.path) if model is not None else None
        state.data_path = Path(data.path) if data is not None else None
        return state, state.all_stages_done()
    state.model_dir, state.data_path = cfg.model_dir, cfg.data.path
    state.data_format, state.max_length, state.eval_fraction = cfg.data.format, cfg.data.max_length, cfg.data.eval_fraction
    state.train_on, state.max_samples = cfg.data.train_on, cfg.data.max_samples
    state.budget_bytes = cfg.budget_bytes
    state.gpu_memory_bytes = cfg.gpu_memory_bytes
    return state, state.all_stages_done()


def _command(name: str) -> str:
    """How to type one of our commands: its path in this Python's bin folder when it is there
    (``make run`` does not put ``.venv/bin`` on PATH), else its bare name."""
    script = Path(sys.executable).parent / name
    return str(script) if script.is_file() else name


def no_display() -> str | None:
    """On Linux, explain a session without a display (an SSH login, a container) instead of Qt's
    abort ("could not load the Qt platform plugin"). None when there is a display, or when
    ``QT_QPA_PLATFORM`` chooses the platform."""
    if not sys.platform.startswith("linux") or os.environ.get("QT_QPA_PLATFORM"):
        return None
    if any(os.environ.get(v) for v in ("DISPLAY", "WAYLAND_DISPLAY")):
        return None
    if os.environ.get("XDG_SESSION_TYPE") in ("x11", "wayland"):
        return None  # a desktop session: let Qt find its display
    return ("EMLoC Studio opens a window, but this session has no display (DISPLAY and WAYLAND_DISPLAY "
            "are not set: an SSH login or a container?).\n"
            "  Start it in a desktop session, over `ssh -X`, or on a virtual display: "
            f"xvfb-run {_command('emloc-studio')}\n"
            f"Everything also runs without a window: {_command('emloc')} --help")


X11_SOCKETS = Path("/tmp/.X11-unix")
"""Where a local X server listens (``X<N>`` for display ``:N``; also in the abstract namespace on Linux)."""


def display_unreachable() -> str | None:
    """On Linux/X11, explain a ``DISPLAY`` whose X server does not answer (an SSH session's forwarding that
    ended, a virtual display not started) instead of Qt's abort ("could not connect to display").
    None when it answers, when the form of ``DISPLAY`` is not one we know, on Wayland, or when
    ``QT_QPA_PLATFORM`` chooses the platform."""
    if not sys.platform.startswith("linux") or os.environ.get("QT_QPA_PLATFORM"):
        return None
    display = os.environ.get("DISPLAY")
    if not display or os.environ.get("WAYLAND_DISPLAY") or x_server_answers(display):
        return None
    return (f"EMLoC Studio opens a window, but no X server answers on DISPLAY={display} (an SSH session "
            "whose forwarding ended, or a virtual display that is not running?).\n"
            "  Start it in a desktop session, over `ssh -X`, or on a virtual display: "
            f"xvfb-run {_command('emloc-studio')}\n"
            f"Everything also runs without a window: {_command('emloc')} --help")


def x_server_answers(display: str) -> bool:
    """Whether an X server accepts a connection for ``display`` (``:N``, ``unix:N`` or ``HOST:N``, with an
    optional ``.screen``): the local socket (its path, then the abstract name) or TCP port 6000 + N."""
    import re
    import socket

    m = re.fullmatch(r"(?P<host>[^:]*):(?P<num>\d+)(\.\d+)?", display)
    if m is None or "/" in m["host"]:
        return True  # another form (XQuartz's launchd socket path on macOS...): Qt decides
    host, num = m["host"], int(m["num"])
    if host in ("", "unix"):
        path = str(X11_SOCKETS / f"X{num}")
        for address in (path, "\0" + path):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                try:
                    sock.connect(address)
                    return True
                except OSError:
                    continue
        return False
    try:
        socket.create_connection((host, 6000 + num), timeout=5).close()
        return True
    except OSError:
        return False


_X11_PACKAGES = ("libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-render-util0 "
                 "libxcb-shape0 libxcb-xinerama0 libxcb-xkb1 libxkbcommon-x11-0")


def missing_x11_library() -> str | None:
    """On Linux/X11, name the system libraries Qt's X11 plugin cannot load (Qt ≥ 6.5 needs
    libxcb-cursor; minimal systems lack more), instead of Qt's cryptic abort. None when fine."""
    import ctypes.util
    import importlib.util
    import shutil
    import subprocess

    if not sys.platform.startswith("linux") or os.environ.get("QT_QPA_PLATFORM"):
        return None
    if not os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    missing: list[str] = []
    if not ctypes.util.find_library("xcb-cursor"):
        missing.append("libxcb-cursor.so.0")
    spec = importlib.util.find_spec("PySide6")
    plugin = None
    if spec and spec.submodule_search_locations:
        plugin = Path(next(iter(spec.submodule_search_locations))) / "Qt" / "plugins" / "platforms" / "libqxcb.so"
    if plugin is not None and plugin.exists() and shutil.which("ldd"):
        try:
            out = subprocess.run(["ldd", str(plugin)], capture_output=True, text=True, timeout=10).stdout
            missing += [ln.split()[0] for ln in out.splitlines() if "not found" in ln and ln.split()]
        except (OSError, subprocess.SubprocessError):
            pass
    if not missing:
        return None
    names = ", ".join(dict.fromkeys(missing))
    return ("EMLoC Studio's window needs system libraries that Qt's X11 plugin cannot find: " + names + ".\n"
            "  Debian/Ubuntu: sudo apt install " + _X11_PACKAGES + "\n"
            "  Fedora:        sudo dnf install xcb-util-cursor xcb-util-wm xcb-util-image xcb-util-keysyms "
            "xcb-util-renderutil libxkbcommon-x11\n"
            f"Everything also runs without a window: {_command('emloc')} --help")


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline first, like the CLI
    args = parse_args(argv)
    if args.smoke_test:
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    hint = no_display() or display_unreachable() or missing_x11_library()
    if hint:
        print(hint, file=sys.stderr)
        return 2
    path = setup_logging()
    log.info("emloc-studio %s starting (%s)", __version__, sys.version.split()[0])

    from PySide6.QtCore import Qt, QTimer
    from PySide6.QtGui import QGuiApplication
    from PySide6.QtWidgets import QApplication

    QGuiApplication.setHighDpiScaleFactorRoundingPolicy(Qt.HighDpiScaleFactorRoundingPolicy.PassThrough)
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("EMLoC Studio")
    app.setOrganizationName("emloc")
    app.setApplicationVersion(__version__)

    from emloc_app import theme
    from emloc_app.error_dialog import install_excepthooks
    from emloc_app.wizard import EmlocWizard, Page

    theme.apply_theme(cast(QApplication, app))  # instance() is typed QCoreApplication; it is this QApplication
    install_excepthooks(path)

    state: WizardState | None = None
    start: Page | None = None  # None: the wizard's choice (the Runs page when runs exist)
    if args.run_dir is not None:
        from emloc_app.image_runs import image_state_from_run_dir, is_image_run
        from emloc_engine.core.errors import EngineError

        run_dir = args.run_dir.expanduser().resolve()
        try:
            if is_image_run(run_dir):  # an `emloc image` run: its gallery and export
                state, done, start = image_state_from_run_dir(run_dir), True, Page.Gallery
            else:
                state, done = state_from_run_dir(run_dir)
                start = Page.Try if done else Page.Machine
        except EngineError as exc:
            print(f"emloc-studio: {exc}", file=sys.stderr)
            return 2
    wizard = EmlocWizard(state)
    if start is not None:
        wizard.setStartId(int(start))
    if state is not None and state.run_dir is not None:
        wizard.settings.add_recent_run(state.run_dir)  # listed on the Runs page from now on
    wizard.show()
    if args.smoke_test:
        title = wizard.currentPage().title()
        QTimer.singleShot(500, wizard.close)
        QTimer.singleShot(600, app.quit)
        app.exec()
        wizard.shutdown()
        print(f"emloc-studio smoke test: page {title!r} shown, exit 0")
        return 0
    rc = int(app.exec())
    wizard.shutdown()
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
