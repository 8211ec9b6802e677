"""The CLI contract: every subcommand exists with --help; --version names torch and the GPU."""

from __future__ import annotations

import pytest

from emloc_engine.cli.main import COMMANDS, build_parser, main, version_text


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


def test_run_accepts_the_documented_options() -> None:
    args = build_parser().parse_args(
        ["run", "m", "d", "--out", "r", "--ratio", "0.4", "--rank", "8", "--alpha", "16", "--steps", "5",
         "--lr", "1e-3", "--lambda", "inf", "--calib", "8", "--max-length", "64", "--device", "cpu",
         "--export", "merged,adapter", "--anchor", "none"])
    assert args.ratio == 0.4 and args.lambda_ == "inf" and args.export == "merged,adapter"
    assert args.anchor == "none" and build_parser().parse_args(["run", "m", "d", "--out", "r"]).anchor == "auto"
    train = build_parser().parse_args(["train", "r", "demo", "--anchor", "blocks"])
    from emloc_engine.cli.commands.train import config_from_args

    assert config_from_args(train).anchor == "blocks"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "r", "d", "--anchor", "sometimes"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "m", "d", "--out", "r", "--ratio", "0.4", "--budget-gib", "8"])


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
