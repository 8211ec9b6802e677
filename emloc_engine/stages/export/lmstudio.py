"""Put an exported GGUF where LM Studio finds it: ``MODELS/<publisher>/<name>/<file>.gguf``.

Only on request (``--export lmstudio``): this is the one place the engine writes into a runtime's
model folder. ``MODELS`` is the first existing folder of
:func:`~emloc_engine.catalog.discovery.lmstudio_dirs` (``LMSTUDIO_MODELS_DIR``, ``~/.lmstudio/models``,
``~/.cache/lm-studio/models``), else the first one. The file is hard-linked when the run folder is on the
same disk (no second copy, and deleting the run keeps LM Studio's file), else copied under a temporary
name and renamed. An existing file is replaced only with ``overwrite``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from emloc_engine.core.atomic import atomic_path
from emloc_engine.core.errors import MergeError

PUBLISHER = "emloc"


def lmstudio_models_dir() -> Path:
    from emloc_engine.catalog.discovery import lmstudio_dirs

    dirs = lmstudio_dirs()
    return next((d for d in dirs if d.is_dir()), dirs[0])


def lmstudio_target(name: str, gguf_type: str) -> Path:
    """Where :func:`install_in_lmstudio` puts the GGUF of a model called ``name`` (``NAME-Q4_0.gguf``)."""
    return lmstudio_models_dir() / PUBLISHER / name / f"{name}-{gguf_type.upper()}.gguf"


def install_in_lmstudio(gguf_path: Path, name: str, gguf_type: str, *, overwrite: bool = False) -> Path:
    """Link or copy ``gguf_path`` into LM Studio's models folder; returns the new file.

    Raises:
        MergeError: the target exists (without ``overwrite``).
        DiskFull: the copy ran out of room (nothing is left under the final name).
    """
    target = lmstudio_target(name, gguf_type)
    if target.exists() and not overwrite:
        raise MergeError(f"{target} already exists in LM Studio's models folder.",
                         hint="Pass overwrite (CLI: --overwrite) to replace it, or choose another --ollama-name.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    tmp.unlink(missing_ok=True)
    try:
        os.link(gguf_path, tmp)
        os.replace(tmp, target)
        return target
    except OSError:
        tmp.unlink(missing_ok=True)
    with atomic_path(target, needed_bytes=Path(gguf_path).stat().st_size) as part:
        shutil.copyfile(gguf_path, part)
    return target
