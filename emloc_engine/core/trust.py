"""No model folder's code ever runs: find the folders that would need it, and refuse them up front.

A Hugging Face folder can name its own Python classes in ``auto_map`` (``config.json``,
``tokenizer_config.json``, ``processor_config.json``/``preprocessor_config.json``); transformers then
imports ``configuration_*.py``/``modeling_*.py``/``tokenization_*.py`` from the folder, after asking
on stdin when ``trust_remote_code`` is not given. The engine passes ``trust_remote_code=False`` to
every load, so that never happens; this module turns the case into a typed error that names the
folder before anything is loaded.

The rule: a folder is refused when it carries an ``auto_map`` and its ``model_type`` is not one of
the families the engine supports (all of them implemented by transformers itself). A supported
family that also ships its code (Phi-3's official checkpoints carry ``auto_map``) loads with
transformers' own implementation; its ``*.py`` files are never imported (and never copied into
exports, see :mod:`emloc_engine.stages.export.exporter`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emloc_engine.core.architectures import SUPPORTED_MODEL_TYPES
from emloc_engine.core.errors import UntrustedCode
from emloc_engine.core.json_files import read_json_object

AUTO_MAP_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
"""The files of a model folder in which an ``auto_map`` points transformers at the folder's own code."""


def _classes(auto_map: Any) -> list[str]:
    """``module.Class`` references of an ``auto_map`` (values may be strings or [slow, fast] lists)."""
    values = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
    out: list[str] = []
    for v in values:
        for item in v if isinstance(v, list | tuple) else [v]:
            if isinstance(item, str) and item:
                out.append(item)
    return out


def remote_code_refs(folder: Path) -> dict[str, list[str]]:
    """Every ``auto_map`` of a model folder: ``{file name: ["configuration_x.XConfig", ...]}``.

    Args:
        folder: a model folder (nothing is imported; only small JSON files are read).

    Returns:
        The files that carry an ``auto_map`` with the classes they name (empty when none does).
    """
    out: dict[str, list[str]] = {}
    for name in AUTO_MAP_FILES:
        auto_map = read_json_object(Path(folder) / name).get("auto_map")
        if auto_map:
            out[name] = _classes(auto_map) or [str(auto_map)]
    return out


def remote_code_problem(folder: Path) -> str | None:
    """Why loading ``folder`` would need the folder's own Python code, or ``None`` when it would not.

    Args:
        folder: a model folder.

    Returns:
        One line naming the ``auto_map`` entries (and ``model_type``), or ``None``.
    """
    refs = remote_code_refs(folder)
    if not refs:
        return None
    model_type = read_json_object(Path(folder) / "config.json").get("model_type")
    if model_type in SUPPORTED_MODEL_TYPES:
        return None  # transformers' own implementation is used; the folder's code is never imported
    named = "; ".join(f"{f} auto_map → {', '.join(c[:3])}" for f, c in refs.items())
    kind = f"model type {model_type!r}" if model_type else "no model_type"
    return f"it needs its own Python code to load ({kind}; {named}), and EMLoC never runs code from a model folder"


def refuse_remote_code(folder: Path) -> None:
    """Raise before anything loads when ``folder`` would need its own code (see :func:`remote_code_problem`).

    Raises:
        UntrustedCode: naming the folder, the ``auto_map`` entries and what to use instead.
    """
    problem = remote_code_problem(folder)
    if problem:
        raise UntrustedCode(
            f"Model folder {folder} cannot be used: {problem}.",
            hint="Use a checkpoint of a family transformers implements itself "
                 f"({', '.join(SUPPORTED_MODEL_TYPES)}), e.g. the model's official release; "
                 "the folder's *.py files were not run.")
