"""The CLI contract: every subcommand exists with --help; --version names torch and the GPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from emloc_engine.cli.main import COMMANDS, build_parser, main, version_text
from emloc_engine.run.config import RunConfig


def test_version_mentions_torch(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("emloc ") and "torch" in out and version_text() in out


@pytest.mark.parametrize("name", COMMANDS)
def test_every_subcommand_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert "usage: emloc " + name in capsys.readouterr().out


def _run_config(argv: list[str]) -> RunConfig:
    from emloc_engine.run.options import build_config, typed_values

    values = typed_values(build_parser().parse_args(argv))
    return build_config(None, values, model_dir=Path("m"), data_path=Path("d"), run_dir=Path("r"))


def test_run_accepts_the_documented_options() -> None:
    cfg = _run_config(
        ["run", "m", "d", "--out", "r", "--ratio", "0.4", "--rank", "8", "--alpha", "16", "--steps", "5",
         "--lr", "1e-3", "--lambda", "inf", "--calib", "8", "--max-length", "64", "--device", "cpu",
         "--export", "merged,adapter", "--anchor", "none"])
    assert cfg.ratio == 0.4 and cfg.correct.lambda_ == math.inf and cfg.export.formats == ("merged", "adapter")
    assert cfg.train.anchor == "none" and _run_config(["run", "m", "d", "--out", "r"]).train.anchor == "auto"
    train = build_parser().parse_args(["train", "r", "demo", "--anchor", "blocks"])
    from emloc_engine.cli.commands.train import config_from_args

    assert config_from_args(train).anchor == "blocks"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "r", "d", "--anchor", "sometimes"])
    both = _run_config(["run", "m", "d", "--out", "r", "--ratio", "0.4", "--budget-gib", "8"])
    assert both.ratio == 0.4 and both.budget_bytes == 8 * 2**30  # a fixed ρ, checked against the budget


def test_every_setting_is_one_option_with_help_and_the_shown_command_reproduces_the_config() -> None:
    from emloc_engine.run.options import command_line, run_options

    options = run_options()
    assert len({o.name for o in options}) == len(options)
    assert all(o.help for o in options), [o.path for o in options if not o.help]
    cfg = _run_config(["run", "m", "d", "--out", "r", "--budget-gib", "12.5", "--rank", "8", "--lambda", "3",
                       "--ratio-override", "*.q_proj=0.6", "--no-grad-checkpointing", "--export", "gguf",
                       "--targets", "q_proj", "v_proj", "--map", "prompt=q", "--seed", "3", "--allocation",
                       "spectral", "--max-samples", "9"])
    argv = command_line(cfg)
    assert argv[:6] == ["emloc", "run", "m", "d", "--out", "r"]
    assert _run_config(argv[1:]) == cfg  # what "Show command…" prints builds the same settings
    assert command_line(_run_config(["run", "m", "d", "--out", "r"])) == argv[:6]  # defaults are not shown


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_a_mistyped_option_gets_one_line_and_where_the_options_are(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["run", "demo", "demo", "--preset", "fastest"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    first, second = err.splitlines()  # no 35-line usage above the error
    assert first.startswith("emloc run: error: argument --preset: invalid choice: 'fastest'") and "faster" in first
    assert second == "All options: emloc run --help"
