"""Presets: "Faster", "Balanced" and "Best quality", each a set of run settings, defined once.

A preset is a few overrides of :class:`~emloc_engine.run.config.RunConfig` settings, by the dotted
paths of :mod:`emloc_engine.run.options` (``"train.steps"``). Applying one first resets every setting
any preset touches to its default, so switching presets never leaves the previous one's values
behind; settings no preset names (the data, the budget, the exports, …) are kept. ``emloc run
--preset NAME`` and the app's Plan page apply the same values; options typed after it win.

ρ is in no preset: the planner always picks the largest ρ that fits the budget, which is what
quality needs, and each preset's memory follows from its other settings.

Why these values:

- **Faster** trains 60 steps at a higher learning rate (what the demo needs to show a visible change in
  minutes), at rank 8, with λ fixed at the paper's 3 (no search over held-out data) and 32 calibration
  samples. Anchoring stays on: without it far less of the gain reaches the original (measured), a poor
  trade for one forward pass per example.
- **Balanced** is the engine's defaults: 100 steps at rank 16, anchored, λ chosen on held-out data.
- **Best quality** trains 300 steps at rank 32 (alpha 64, so alpha/r stays 2), with per-module ranks
  (measured better at ρ ≥ 0.4, benchmarks/RESULTS.md) and 128 calibration samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from emloc_engine.core.errors import ConfigError
from emloc_engine.run.config import RunConfig


@dataclass(frozen=True)
class Preset:
    """One named set of settings.

    Attributes:
        name: what ``--preset`` takes (``"balanced"``).
        title: what the app shows (``"Balanced"``).
        summary: one plain sentence for people who do not know the method.
        overrides: ``{dotted setting path: value}`` (values as the fields hold them).
    """

    name: str
    title: str
    summary: str
    overrides: Mapping[str, Any]


PRESETS: tuple[Preset, ...] = (
    Preset(
        "faster",
        "Faster",
        "A first result soon: fewer, larger training steps and a smaller adapter; "
        "it learns less from your data.",
        {
            "train.steps": 60,
            "train.lr": 5e-4,
            "train.rank": 8,
            "train.alpha": 16.0,
            "train.eval_every": 20,
            "train.save_every": 20,
            "correct.lambda_": 3.0,
            "calib": 32,
        },
    ),
    Preset("balanced", "Balanced", "The recommended settings: a good adapter in a reasonable time.", {}),
    Preset(
        "best",
        "Best quality",
        "Longer training with a larger adapter and a closer copy of each layer; "
        "about three times the training time.",
        {
            "train.steps": 300,
            "train.rank": 32,
            "train.alpha": 64.0,
            "emulator.allocation": "spectral",
            "calib": 128,
        },
    ),
)
DEFAULT_PRESET = "balanced"


def preset_names() -> tuple[str, ...]:
    return tuple(p.name for p in PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        ConfigError: no preset has that name (the names are listed).
    """
    for p in PRESETS:
        if p.name == name:
            return p
    raise ConfigError(f"Unknown preset {name!r}.", hint=f"Choose one of: {', '.join(preset_names())}.")


def preset_paths() -> tuple[str, ...]:
    """Every setting some preset sets, in a stable order."""
    return tuple(dict.fromkeys(path for p in PRESETS for path in p.overrides))


def _get(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _default(path: str) -> Any:
    from emloc_engine.run.options import option

    return option(path).default


def preset_values(name: str) -> dict[str, Any]:
    """``{dotted path: value}`` of the preset, with every other preset-controlled setting at its default."""
    overrides = get_preset(name).overrides
    return {path: overrides.get(path, _default(path)) for path in preset_paths()}


def apply_preset(cfg: RunConfig, name: str) -> RunConfig:
    """``cfg`` with the preset's settings (the settings no preset names are kept).

    Raises:
        ConfigError: an unknown preset name.
    """
    values = preset_values(name)
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if rest:
            sections.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    changes = {head: dataclasses.replace(getattr(cfg, head), **fields) for head, fields in sections.items()}
    return dataclasses.replace(cfg, **changes, **top)


def matching_preset(cfg: RunConfig) -> str | None:
    """The name of the preset whose settings ``cfg`` has, None when they match none (custom settings)."""
    for p in PRESETS:
        if all(_get(cfg, path) == value for path, value in preset_values(p.name).items()):
            return p.name
    return None
