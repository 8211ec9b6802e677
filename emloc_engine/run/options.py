"""Command-line options, TOML keys, tooltips and "Show command…", all generated from :class:`RunConfig`'s fields.

Every setting is one dataclass field with a default, a type and ``metadata["help"]``; this module walks
RunConfig (and its nested stage options) and turns each field into one :class:`Option`: its dotted
path (``train.rank``), its long option name (``--rank``: the field name with ``-``, or
``metadata["cli"]``), its help and default. Fields with ``metadata["cli"] = None`` are not settable
from the command line (they stay settable from Python). We do not use ``transformers.HfArgumentParser``:
it does not nest dataclasses, and a default written in argparse is exactly what drifted before.

Values a user gives are merged in one order: field defaults < a run's recorded settings (when a
command continues a run folder) < ``--config RUN.toml`` < options typed on the command line. An
option counts as typed only when it is on the command line (argparse defaults are suppressed), so a
TOML value is never overridden by a command-line default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from emloc_engine.core.errors import ConfigError
from emloc_engine.core.jsonable import to_json
from emloc_engine.machine.budget import gib_to_bytes
from emloc_engine.run.config import RunConfig

GIB = 2**30
# Positional / structural fields: given as MODEL DATA --out, or nested tables.
_POSITIONAL = {"model_dir", "data.path", "run_dir"}
_HIDDEN = {"data.seed"}  # RunConfig.seed sets it
_CLI_NAMES: dict[str, str | None] = {
    # Names kept from the earlier hand-written options (people have scripts with them).
    "emulator.ratio_overrides": "ratio-override", "emulator.rank_overrides": "rank-override",
    "emulator.dense_patterns": "dense", "emulator.compute_dtype": "emulator-dtype",
    "train.target_modules": "targets", "train.use_rslora": "rslora", "train.max_eval_batches": "train-eval-batches",
    "correct.lambda_": "lambda", "correct.dtype": "eval-dtype", "export.formats": "export",
    "export.prompts": None, "data.column_map": "map",
}


@dataclass(frozen=True)
class Option:
    """One setting as the command line, a TOML file and the app's tooltips see it."""

    path: str  # dotted: "train.rank"
    name: str  # long option without dashes: "rank"
    help: str
    default: Any
    type: Any  # the field's annotation
    choices: tuple[str, ...] | None = None
    unit: str = ""  # "GiB": typed in GiB, stored in bytes
    bounds: tuple[float, float] | None = None  # the open interval a number must lie in (metadata "bounds")

    @property
    def flag(self) -> str:
        return "--" + self.name

    @property
    def kind(self) -> str:
        """bool, int, float, str, path, list (comma-separated), pairs (PATTERN=VALUE, repeatable)."""
        tp = _strip_optional(self.type)
        if tp is bool:
            return "bool"
        if typing.get_origin(tp) is tuple:
            inner = typing.get_args(tp)[0]
            return "pairs" if typing.get_origin(inner) is tuple else "list"
        return {int: "int", float: "float", Path: "path"}.get(tp, "str")


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0]
    return tp


def _walk(cls: type, prefix: str) -> Iterable[Option]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            yield from _walk(tp, path + ".")
            continue
        if path in _POSITIONAL or path in _HIDDEN:
            continue
        name = _CLI_NAMES.get(path, f.metadata.get("cli", f.name.replace("_", "-")))
        if name is None:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        choices, bounds = f.metadata.get("choices"), f.metadata.get("bounds")
        yield Option(path, name, str(f.metadata.get("help", "")), default, tp,
                     tuple(choices) if choices is not None else None, str(f.metadata.get("unit", "")),
                     tuple(bounds) if bounds is not None else None)


def run_options() -> tuple[Option, ...]:
    """Every settable option of a run, in RunConfig's field order.

    Raises:
        AssertionError: two fields would share one option name (a programming error caught by the tests).
    """
    options = tuple(_walk(RunConfig, ""))
    names = [o.name for o in options]
    dupes = {n for n in names if names.count(n) > 1}
    assert not dupes, f"option names used twice: {dupes}"
    return options


def option(path: str) -> Option:
    """The option of a dotted setting path (``"train.rank"``)."""
    for o in run_options():
        if o.path == path:
            return o
    raise KeyError(path)


def option_help(path: str) -> str:
    """The help text of a setting (the app's tooltip), ``""`` for an unknown one."""
    try:
        return option(path).help
    except KeyError:
        return ""


# -- parsing ---------------------------------------------------------------------------------------
def _parse_float(text: str) -> float:
    value = text.strip().lower()
    if value in ("inf", "infinity", "∞"):
        return math.inf
    return float(value)


def _scalar(kind: str, inner: Any, text: str) -> Any:
    if kind == "int" or inner is int:
        return int(text)
    if kind == "float" or inner is float:
        return _parse_float(text)
    if kind == "path" or inner is Path:
        return Path(text).expanduser()
    return text


def parse_value(opt: Option, raw: Any) -> Any:
    """The field value of ``raw`` (text from the command line, or a TOML value) for ``opt``.

    Raises:
        ConfigError: a value that does not parse, named with the option and what it takes.
    """
    kind = opt.kind
    try:
        if opt.path == "correct.lambda_" and isinstance(raw, str) and raw.strip().lower() == "auto":
            return None
        if opt.unit == "GiB" and raw is not None and not (isinstance(raw, str) and raw.strip().lower() in ("none", "")):
            try:
                return gib_to_bytes(raw, opt.flag)
            except ValueError as exc:
                raise ConfigError(f"{exc}.", hint=f"Type a number of GiB ({opt.flag} 24), or leave it out for the "
                                              "default.") from None
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("none", "") and kind != "list"
                           and _strip_optional(opt.type) is not opt.type):
            return None
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            return str(raw).strip().lower() in ("1", "true", "yes", "on")
        if kind == "list":
            inner = typing.get_args(_strip_optional(opt.type))[0]
            parts = raw if isinstance(raw, (list, tuple)) else [raw]
            # typed as "a,b" or "a b" (nargs), or a TOML list; empty text means none
            items = [s for part in parts for s in str(part).split(",") if s.strip()]
            return tuple(_scalar("", inner, s.strip()) for s in items)
        if kind == "pairs":
            _, v_type = typing.get_args(typing.get_args(_strip_optional(opt.type))[0])
            entries: list[Sequence[Any]] = (list(raw.items()) if isinstance(raw, Mapping)
                                            else [str(s).split("=", 1) for s in raw])
            pairs = []
            for item in entries:
                if len(item) != 2 or not str(item[0]).strip():
                    raise ValueError(f"{item!r} is not NAME=VALUE")
                pairs.append((str(item[0]).strip(), _scalar("", v_type, str(item[1]).strip())))
            return tuple(pairs)
        if isinstance(raw, (int, float)) and kind in ("int", "float"):
            return raw if kind == "float" else int(raw)
        return _scalar(kind, None, str(raw))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{opt.flag}: cannot read {raw!r} ({exc}).", hint=f"{opt.flag}: {opt.help}") from None


def add_options(parser: argparse.ArgumentParser, sections: Sequence[str] | None = None, *,
                include: Sequence[str] = (), aliases: Mapping[str, str] | None = None) -> None:
    """Add the options of ``sections`` (``""`` = the run's own, ``"train"``, …; None = all) to ``parser``.

    Args:
        parser: the command's parser.
        sections: which sections' options to add.
        include: more options by dotted path (e.g. ``"device"`` for a per-stage command).
        aliases: extra option strings, ``{dotted path: "--formats"}`` (names kept from older commands).

    Defaults are suppressed: the namespace holds only what was typed (see :func:`typed_values`).
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in run_options():
        section = opt.path.split(".")[0] if "." in opt.path else ""
        if sections is not None and section not in sections and opt.path not in include:
            continue
        flags = [opt.flag, *([aliases[opt.path]] if aliases and opt.path in aliases else [])]
        title = {"": "run", "data": "data"}.get(section, section)
        group = groups.setdefault(title, parser.add_argument_group(f"{title} settings"))
        shown = opt.default if opt.unit != "GiB" else None
        help_text = f"{opt.help} (default: {_show(shown)})" if shown not in (None, (), "") else opt.help
        help_text = help_text.replace("%", "%%")
        dest = "opt:" + opt.path
        if opt.kind == "bool":
            group.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        elif opt.kind == "pairs":
            group.add_argument(*flags, dest=dest, action="append", default=argparse.SUPPRESS,
                               metavar="NAME=VALUE", help=help_text + " Repeat for more.")
        else:
            if opt.kind == "list":
                group.add_argument(*flags, dest=dest, default=argparse.SUPPRESS, nargs="*", metavar="A,B",
                                   help=help_text)
            else:
                group.add_argument(*flags, dest=dest, default=argparse.SUPPRESS, choices=opt.choices,
                                   metavar=opt.name.upper().replace("-", "_") if opt.choices is None else None,
                                   help=help_text)


def add_preset_option(parser: argparse.ArgumentParser) -> None:
    """``--preset NAME``: the settings of one of :data:`~emloc_engine.run.presets.PRESETS` (options typed win)."""
    from emloc_engine.run.presets import PRESETS

    names = ", ".join(f"{p.name} ({p.summary})" for p in PRESETS)
    parser.add_argument("--preset", choices=[p.name for p in PRESETS], default=None,
                        help=f"Start from a preset; options given on the command line win: {names}".replace("%", "%%"))


def with_preset(values: Mapping[str, Any], preset: str | None) -> dict[str, Any]:
    """``values`` (``{dotted path: raw value}``) on top of the preset's settings (``preset`` None: unchanged).

    Raises:
        ConfigError: an unknown preset name.
    """
    if not preset:
        return dict(values)
    from emloc_engine.run.presets import preset_values

    return {**preset_values(str(preset)), **values}


def typed_values(args: argparse.Namespace) -> dict[str, Any]:
    """``{dotted path: raw value}`` of the options typed on the command line."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("opt:")}


def toml_values(path: Path) -> dict[str, Any]:
    """``{key: value}`` of a ``--config RUN.toml`` file (keys: long option names, ``model``, ``data``, ``out``, ``preset``).

    Raises:
        ConfigError: unreadable TOML, or keys no option has (all listed).
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"Cannot read {path}: {exc}") from exc
    by_name = {o.name: o.path for o in run_options()}
    out: dict[str, Any] = {}
    unknown = []
    for key, value in values.items():
        name = key.replace("_", "-")
        name = {"exports": "export", "formats": "export"}.get(name, name)
        if name in ("model", "data", "out", "preset"):
            out[name] = value
        elif name in by_name:
            out[by_name[name]] = value
        else:
            unknown.append(f"{path}: unknown key {key!r}")
    if unknown:
        raise ConfigError("The run file has keys emloc does not know.", problems=unknown,
                          hint="Use the long option names of `emloc run --help` (with - or _).")
    return out


def build_config(base: RunConfig | None, values: Mapping[str, Any], *, model_dir: Path | None = None,
                 data_path: Path | None = None, run_dir: Path | None = None) -> RunConfig:
    """A RunConfig: ``base`` (or the defaults) with ``values`` (``{dotted path: raw value}``) applied.

    Raises:
        ConfigError: a value that does not parse, a setting out of range, or model/data/out missing.
    """
    opts = {o.path: o for o in run_options()}
    tree: dict[str, Any] = base.to_json() if base is not None else {}
    parsed: dict[str, Any] = {}
    for path, raw in values.items():
        if path not in opts:
            raise ConfigError(f"Unknown setting {path!r}.")
        parsed[path] = parse_value(opts[path], raw)
    for path, value in parsed.items():
        node = tree
        *heads, last = path.split(".")
        for h in heads:
            node = node.setdefault(h, {})
        node[last] = to_json(value)
    if model_dir is not None:
        tree["model_dir"] = str(model_dir)
    if run_dir is not None:
        tree["run_dir"] = str(run_dir)
    if data_path is not None:
        tree.setdefault("data", {})["path"] = str(data_path)
    missing = [n for n, present in (("MODEL", "model_dir" in tree), ("DATA", "path" in tree.get("data", {})),
                                    ("--out RUN_DIR", "run_dir" in tree)) if not present]
    if missing:
        raise ConfigError(f"The run needs {', '.join(missing)}.",
                          hint="Give them on the command line (MODEL DATA --out RUN_DIR) or in --config RUN.toml.")
    return RunConfig.from_json(tree)


# -- "Show command…" -------------------------------------------------------------------------------
def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, tuple):
        if value and isinstance(value[0], tuple):
            return " ".join(f"{k}={_show(v)}" for k, v in value)
        return ",".join(_show(v) for v in value)
    return str(value)


def _get(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def changed_settings(old: RunConfig, new: RunConfig) -> list[tuple[str, Any, Any]]:
    """``[(dotted path, old value, new value)]`` of every setting that differs (paths included)."""
    out: list[tuple[str, Any, Any]] = []
    for path in ("model_dir", "data.path", "run_dir"):
        if _get(old, path) != _get(new, path):
            out.append((path, _get(old, path), _get(new, path)))
    for opt in run_options():
        a, b = _get(old, opt.path), _get(new, opt.path)
        if a != b:
            out.append((opt.path, a, b))
    return out


def command_line(cfg: RunConfig, *, model: str | None = None, data: str | None = None) -> list[str]:
    """The ``emloc run …`` argument list that reproduces ``cfg`` (only settings that differ from the defaults).

    Args:
        cfg: the run's settings.
        model, data: what to write for MODEL and DATA (e.g. ``demo``) instead of the resolved paths.
    """
    args = ["emloc", "run", model or str(cfg.model_dir), data or str(cfg.data.path), "--out", str(cfg.run_dir)]
    for opt in run_options():
        value = _get(cfg, opt.path)
        if value == opt.default:
            continue
        if opt.kind == "bool":
            args.append(opt.flag if value else "--no-" + opt.name)
        elif opt.kind == "pairs":
            for k, v in value:
                args += [opt.flag, f"{k}={_show(v)}"]
        elif opt.unit == "GiB" and value is not None:
            args += [opt.flag, f"{value / GIB:g}"]
        elif value is None:
            args += [opt.flag, "auto" if opt.path == "correct.lambda_" else "none"]
        else:
            args += [opt.flag, _show(value)]
    return args


def apply_values(obj: Any, section: str, values: Mapping[str, Any]) -> Any:
    """``obj`` (a section's settings: ``TrainOptions``, ``DataConfig``, …) with the typed ``values`` of that section.

    Args:
        obj: the current settings of the section (defaults, or what the run recorded).
        section: ``"train"``, ``"data"``, … (``""``: the run's own top-level settings are not applied here).
        values: ``{dotted path: raw value}`` as :func:`typed_values` returns.

    Raises:
        ConfigError: a value that does not parse or is out of range.
    """
    opts = {o.path: o for o in run_options()}
    changes = {path.split(".", 1)[1]: parse_value(opts[path], raw) for path, raw in values.items()
               if path.startswith(section + ".")}
    return dataclasses.replace(obj, **changes)


def top_value(values: Mapping[str, Any], path: str, default: Any) -> Any:
    """A top-level setting (``ratio``, ``device``, …) from the typed ``values``, else ``default``."""
    if path not in values:
        return default
    return parse_value(option(path), values[path])
