"""An image run's recorded settings read back: ``RUN/image_run.json`` -> :class:`~emloc_engine.images.run.ImageRunConfig`.

:func:`~emloc_engine.images.run.run_images` records the settings of a run's first call (every field,
as text). Resuming a run (the app's Runs page: Open an unfinished run, or Resume) reads them back
here and calls ``run_images`` with them again, which continues where the run stopped.

Decisions: each value is converted back to its field's type (``"None"`` is None, a tuple is read as a
Python literal; values already typed, as a later format may write them, pass through); keys this
version does not know are ignored and fields the record lacks keep their defaults. ``stop_after`` is
not carried over: resuming means finishing the run.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import typing
from pathlib import Path
from types import NoneType, UnionType
from typing import Any

from emloc_engine.core.errors import RunStateError

if typing.TYPE_CHECKING:
    from emloc_engine.images.run import ImageRunConfig

NOT_CARRIED = ("stop_after",)
"""Fields a resumed run does not take over from the record."""


def _convert(value: Any, hint: Any) -> Any:
    """``value`` (as recorded: text, or already typed) as a value of type ``hint``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, UnionType) and NoneType in args:
        if value is None or value in ("None", ""):
            return None
        rest = [a for a in args if a is not NoneType]
        return _convert(value, rest[0])
    if hint is Path:
        return Path(value)
    if hint is bool:
        return value if isinstance(value, bool) else str(value) == "True"
    if hint in (int, float):
        return hint(value)
    if typing.get_origin(hint) is tuple:
        items = ast.literal_eval(value) if isinstance(value, str) else value
        return tuple(items)
    return str(value)  # str and Literal names


def read_image_run_config(run_dir: Path) -> ImageRunConfig:
    """The settings ``run_dir`` was started with, ready to resume it (module docstring).

    Raises:
        RunStateError: no ``image_run.json``, or it cannot be read as the settings of an image run
            (the message names the file; the fix is a new run).
    """
    from emloc_engine.images.run import RUN_SETTINGS, ImageRunConfig

    path = Path(run_dir) / RUN_SETTINGS
    hint = "Start a new image run (the photos and the pipeline are untouched)."
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunStateError(f"{path} cannot be read: {exc}", hint=hint) from exc
    if not isinstance(recorded, dict):
        raise RunStateError(f"{path} is not a JSON object.", hint=hint)
    hints = typing.get_type_hints(ImageRunConfig)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ImageRunConfig):
        if f.name in recorded and f.name not in NOT_CARRIED:
            try:
                values[f.name] = _convert(recorded[f.name], hints[f.name])
            except (ValueError, TypeError, SyntaxError) as exc:
                raise RunStateError(
                    f"{path}: {f.name} = {recorded[f.name]!r} is not readable ({exc}).", hint=hint
                ) from exc
    values["run_dir"] = Path(run_dir)  # the folder as it is now (it may have been moved)
    try:
        return ImageRunConfig(**values)
    except TypeError as exc:  # a required field missing from the record
        raise RunStateError(f"{path} lacks settings of an image run ({exc}).", hint=hint) from exc


__all__ = ["NOT_CARRIED", "read_image_run_config"]
