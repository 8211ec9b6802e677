"""The folders the user added to the model catalog, kept in ``paths.app_data_dir()/model_folders.json``.

The catalog scan (:mod:`emloc_engine.catalog.discovery`) reads this list; ``emloc models --add``,
the app's "Add folder…" and GGUF model views (:func:`emloc_engine.catalog.gguf_import.convert_for_catalog`)
write it. The file is replaced atomically; the folders themselves are never touched.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from emloc_engine.core import paths
from emloc_engine.core.atomic import write_json_atomic
from emloc_engine.core.errors import ModelNotFound

log = logging.getLogger(__name__)

FOLDERS_FILE = "model_folders.json"


def _folders_file() -> Path:
    return paths.app_data_dir() / FOLDERS_FILE


def added_model_folders() -> list[Path]:
    """Folders the user added to the catalog (a corrupt list file reads as empty, with a log warning)."""
    f = _folders_file()
    if not f.exists():
        return []
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
        return [Path(p) for p in data.get("folders", [])]
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("Ignoring unreadable %s: %s", f, exc)
        return []


def add_model_folder(path: Path) -> list[Path]:
    """Add a folder (a model, or a folder of models) to the catalog; returns the new list.

    Raises:
        ModelNotFound: the folder does not exist.
    """
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise ModelNotFound(f"Folder {p} does not exist.", hint="Pick an existing folder.")
    folders = added_model_folders()
    if p not in folders:
        folders.append(p)
        write_json_atomic(_folders_file(), {"folders": [str(x) for x in folders]})
    return folders


def remove_model_folder(path: Path) -> bool:
    """Remove a folder from the catalog (the folder itself is untouched). True if it was listed."""
    p = Path(path).expanduser().resolve()
    folders = added_model_folders()
    kept = [f for f in folders if f != p and f != Path(path)]
    if len(kept) == len(folders):
        return False
    write_json_atomic(_folders_file(), {"folders": [str(x) for x in kept]})
    return True


__all__ = ["FOLDERS_FILE", "add_model_folder", "added_model_folders", "remove_model_folder"]
