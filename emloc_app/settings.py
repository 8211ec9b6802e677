"""Remembered choices: recent runs, last model (with a single file's pipeline folder) and dataset, window
geometry (``QSettings``).

The settings file lives in ``paths.app_data_dir()/settings.ini`` (INI format), so tests that set
``EMLOC_HOME`` never see the user's settings.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QByteArray, QSettings

from emloc_engine.core import paths

MAX_RECENT = 10


class _PathSetting:
    """A path kept under ``key`` of the settings file: a ``Path`` or None (stored as "" when unset)."""

    def __init__(self, key: str, doc: str) -> None:
        self.key, self.__doc__ = key, doc

    def __get__(self, settings: Settings, owner: type | None = None) -> Path | None:
        value = settings._qs.value(self.key, "")
        return Path(str(value)) if value else None

    def __set__(self, settings: Settings, value: Path | None) -> None:
        settings._qs.setValue(self.key, str(value) if value else "")


class Settings:
    """Typed access to the app's ``QSettings``."""

    def __init__(self, path: Path | None = None) -> None:
        path = path or paths.app_data_dir() / "settings.ini"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._qs = QSettings(str(path), QSettings.Format.IniFormat)

    last_model = _PathSetting("last/model", "The model chosen last (a folder, a GGUF or a single file).")
    last_config_dir = _PathSetting("last/config_dir", "The pipeline folder chosen for the last model when that is a "
                                   "single-file image checkpoint.")
    last_data = _PathSetting("last/data", "The data chosen last.")

    def recent_runs(self) -> list[Path]:
        """Run folders, most recent first (only those that still exist)."""
        raw: object = self._qs.value("runs/recent", [])  # INI files give a str for one entry, a list for more
        items = [raw] if isinstance(raw, str) else [str(x) for x in raw] if isinstance(raw, (list, tuple)) else []
        return [Path(p) for p in items if p and Path(p).exists()]

    def add_recent_run(self, run_dir: Path) -> None:
        runs = [str(run_dir)] + [str(p) for p in self.recent_runs() if p != run_dir]
        self._qs.setValue("runs/recent", runs[:MAX_RECENT])

    def geometry(self) -> QByteArray | None:
        value = self._qs.value("window/geometry")
        return value if isinstance(value, QByteArray) else None

    def set_geometry(self, value: QByteArray) -> None:
        self._qs.setValue("window/geometry", value)

    def sync(self) -> None:
        self._qs.sync()
