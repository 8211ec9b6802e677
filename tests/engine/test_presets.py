"""Presets: named sets of run settings, the same from `emloc run --preset` and from the app."""

from __future__ import annotations

from pathlib import Path

import pytest

from emloc_engine.cli.commands.run import config_from_args
from emloc_engine.cli.main import build_parser
from emloc_engine.core.errors import ConfigError
from emloc_engine.data import DataConfig
from emloc_engine.run.config import RunConfig
from emloc_engine.run.options import option
from emloc_engine.run.presets import PRESETS, apply_preset, get_preset, matching_preset, preset_paths


def _cfg() -> RunConfig:
    return RunConfig(model_dir=Path("m"), data=DataConfig(path=Path("d")), run_dir=Path("r"))


def test_every_preset_names_real_settings_and_builds_a_valid_config() -> None:
    base = _cfg()
    for p in PRESETS:
        assert p.summary and p.title
        cfg = apply_preset(base, p.name)  # RunConfig validates every value
        assert matching_preset(cfg) == p.name
        for path in p.overrides:
            option(path)  # a setting the CLI knows (KeyError otherwise)
    assert matching_preset(base) == "balanced"  # the defaults are Balanced
    assert {"train.steps", "train.rank", "emulator.allocation"} <= set(preset_paths())


def test_switching_presets_leaves_nothing_of_the_previous_one_and_keeps_other_settings() -> None:
    base = apply_preset(_cfg(), "best")
    budgeted = RunConfig(**{**base.__dict__, "budget_bytes": 5 * 2**30})
    faster = apply_preset(budgeted, "faster")
    assert faster.emulator.allocation == "uniform"  # Best's per-module ranks are gone
    assert faster.train.steps < _cfg().train.steps < apply_preset(_cfg(), "best").train.steps
    assert faster.budget_bytes == 5 * 2**30  # settings no preset names are kept
    assert matching_preset(RunConfig(**{**faster.__dict__, "calib": 33})) is None  # custom


def test_emloc_run_preset_and_typed_options_win(tmp_path: Path) -> None:
    model, data = tmp_path / "m", tmp_path / "d.jsonl"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data.write_text("{}\n")
    args = build_parser().parse_args(
        ["run", str(model), str(data), "--out", str(tmp_path / "r"), "--preset", "faster", "--rank", "4"]
    )
    cfg = config_from_args(args)
    assert cfg.train.steps == get_preset("faster").overrides["train.steps"]
    assert cfg.train.rank == 4  # typed after the preset: wins
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "best"\nsteps = 7\n')
    cfg = config_from_args(
        build_parser().parse_args(
            ["run", str(model), str(data), "--out", str(tmp_path / "r"), "--config", str(toml)]
        )
    )
    assert cfg.train.rank == 32 and cfg.train.steps == 7 and cfg.emulator.allocation == "spectral"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "m", "d", "--out", "r", "--preset", "fastest"])
    with pytest.raises(ConfigError):
        get_preset("fastest")
