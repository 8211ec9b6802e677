"""Frozen settings dataclasses to JSON and back, by their type annotations (one way for every record).

``to_json`` turns a dataclass (nested ones too) into plain JSON values: ``Path`` -> str, tuples -> lists,
``inf`` -> ``"inf"`` (JSON has no infinity). ``from_json`` rebuilds the dataclass from such a dict using
the field annotations, so a reader never guesses at shapes; keys the class does not know are an error,
missing keys take the field's default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

from emloc_engine.core.errors import ConfigError

T = TypeVar("T")


def to_json(value: Any) -> Any:
    """A JSON-ready copy of ``value`` (dataclasses by field, paths as text, ∞ as ``"inf"``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (tuple, list)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    return value


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table of settings, got {value!r}.")
        return from_json(tp, value, where=where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, where) for v in value)
        return tuple(_convert(a, v, where) for a, v in zip(args, value, strict=True))
    if tp is Path:
        return Path(value)
    if tp is float:
        if isinstance(value, str) and value in ("inf", "-inf"):
            return math.inf if value == "inf" else -math.inf
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}.")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}.")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected text, got {value!r}.")
        return value
    return value


def from_json(cls: type[T], data: dict[str, Any], *, where: str = "") -> T:
    """Rebuild dataclass ``cls`` from :func:`to_json` output (validation runs as on construction).

    Raises:
        ConfigError: an unknown key, or a value of the wrong type (named by its dotted path).
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown setting(s) {', '.join(unknown)}.")
    kwargs = {name: _convert(hints[name], value, f"{where}.{name}" if where else name)
              for name, value in data.items() if fields[name].init}
    return cls(**kwargs)
