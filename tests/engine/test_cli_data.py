"""``emloc data``: the report on stdout, every problem as file:line, exit 0 when usable and 2 when not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emloc_engine.cli.commands.data import WARNINGS_SHOWN_PER_KIND, data_config_from_args
from emloc_engine.cli.main import build_parser, main
from tests.tiny_models import make_tokenizer


def chat(user: str, reply: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]})


@pytest.fixture
def good(tmp_path: Path) -> Path:
    f = tmp_path / "good.jsonl"
    f.write_text("".join(chat(f"question {i}", f"answer {i}") + "\n" for i in range(10)))
    return f


@pytest.fixture
def tok_dir(tmp_path: Path) -> Path:
    """A folder with tokenizer files only: proves no weights are needed."""
    d = tmp_path / "model"
    make_tokenizer().save_pretrained(d)
    assert not list(d.glob("*.safetensors"))
    return d


def test_structure_only_report(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", str(good)]) == 0
    out = capsys.readouterr().out
    assert "format: messages" in out and "samples: 10" in out and "train: 9" in out and "eval: 1" in out
    assert "chars: min" in out and "user: question 0" in out and "OK: the data can be used." in out


def test_report_with_tokenizer_shows_rendering_and_trained_text(good: Path, tok_dir: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", str(good), "--model", str(tok_dir)]) == 0
    out = capsys.readouterr().out
    assert "tokens: min" in out and "<|im_start|>assistant\nanswer 0<|im_end|>" in out
    assert "--- trained on ---\nanswer 0<|im_end|>" in out and "trainable tokens:" in out


def test_bad_file_lists_every_problem_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(chat("a", "b") + "\n{broken\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    assert main(["data", str(f)]) == 2
    out = capsys.readouterr().out
    assert f"{f}:2: error: bad JSON" in out and f"{f}:3: error: message 0 has the unknown role 'robot'" in out
    assert "Not usable: 2 error(s)" in out


def test_json_output(good: Path, tok_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", str(good), "--model", str(tok_dir), "--max-length", "32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["n_samples"] == 10 and report["token_stats"]["unit"] == "tokens"
    assert report["n_truncated"] == 10 and len(report["problems"]) == 10
    assert report["problems"][0]["where"] == f"{good}:1" and report["problems"][0]["code"] == "truncated"


def test_many_warnings_are_summarised_but_errors_never(tmp_path: Path, tok_dir: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "long.jsonl"
    f.write_text("".join(chat("q", "a" * 50) + "\n" for _ in range(WARNINGS_SHOWN_PER_KIND + 5)))
    assert main(["data", str(f), "--model", str(tok_dir), "--max-length", "30"]) == 0
    out = capsys.readouterr().out
    assert out.count("warning: ") == WARNINGS_SHOWN_PER_KIND and "... and 5 more 'truncated' warnings" in out


def test_all_masked_is_fatal_with_the_fix(tmp_path: Path, tok_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "no reply here"}]}) + "\n")
    assert main(["data", str(f), "--model", str(tok_dir)]) == 2
    out = capsys.readouterr().out
    assert "all 1 samples are left without a trainable label" in out and "--train-on all" in out
    assert main(["data", str(f), "--model", str(tok_dir), "--train-on", "all"]) == 0


def test_column_map_and_format_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "qa.csv"
    f.write_text("q,a\nhi,there\n")
    assert main(["data", str(f)]) == 2
    assert "unknown data format" in capsys.readouterr().out
    assert main(["data", str(f), "--map", "prompt=q", "--map", "completion=a"]) == 0
    assert "format: prompt_completion" in capsys.readouterr().out


def test_bad_options_and_missing_model_exit_2(good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", str(good), "--map", "prompt"]) == 2
    assert "field=column" in capsys.readouterr().err
    assert main(["data", str(good), "--max-length", "2"]) == 2
    assert "max_length" in capsys.readouterr().err
    assert main(["data", str(good), "--model", str(tmp_path / "nowhere")]) == 2
    assert "Cannot load the tokenizer" in capsys.readouterr().err
    assert main(["data", str(tmp_path / "missing.jsonl")]) == 2
    assert "file not found" in capsys.readouterr().out


def test_config_from_args_round_trip(tmp_path: Path) -> None:
    args = build_parser().parse_args(["data", "d.jsonl", "--format", "alpaca", "--map", "output=answer",
                                      "--max-length", "64", "--train-on", "all", "--eval-fraction", "0",
                                      "--packing", "--max-samples", "5", "--seed", "7"])
    cfg = data_config_from_args(args.data, args)
    assert (cfg.format, cfg.column_map, cfg.max_length, cfg.train_on, cfg.eval_fraction, cfg.packing,
            cfg.max_samples, cfg.seed) == ("alpaca", (("output", "answer"),), 64, "all", 0.0, True, 5, 7)


@pytest.mark.parametrize("missing", [("tokenizer.json",), ("tokenizer_config.json",),
                                     ("tokenizer.json", "tokenizer_config.json")])
def test_missing_tokenizer_files_are_named_not_blamed_on_the_chat_template(
        good: Path, tok_dir: Path, missing: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    """An interrupted download without tokenizer_config.json used to pass with a "no chat template"
    warning (and train without the model's special tokens); without tokenizer.json it asked for sentencepiece."""
    for name in missing:
        (tok_dir / name).unlink()
    assert main(["data", str(good), "--model", str(tok_dir)]) == 2
    cap = capsys.readouterr()
    err = cap.err
    assert f"The tokenizer files {' and '.join(missing)} are missing from {tok_dir}" in err
    assert "hf download" in err and "chat template" not in (cap.out + err).lower()
