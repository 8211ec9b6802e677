"""Bounded work on hostile data: a huge record is refused at its line without being read whole, a long one is
tokenised only as far as max_length can use, a conversation of thousands of turns costs what its first
max_length tokens do, and a binary or non-UTF-8 file is one problem, not one per line."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from emloc_engine.data import DataConfig, inspect_dataset, prepare_dataset
from emloc_engine.data import render as render_mod
from emloc_engine.data.formats import MAX_RECORD_BYTES
from emloc_engine.data.render import MAX_CHARS_PER_TOKEN
from tests.tiny_models import make_tokenizer

TEMPLATE_SLACK = 200  # characters the ChatML markers add around the contents


@pytest.fixture
def tok() -> Any:
    return make_tokenizer()


@pytest.fixture
def encoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every text handed to the tokenizer (render's one entry point to it)."""
    lengths: list[int] = []
    real = render_mod._encode

    def recording(tokenizer: Any, text: str, special: bool) -> list[int]:
        lengths.append(len(text))
        return real(tokenizer, text, special)

    monkeypatch.setattr(render_mod, "_encode", recording)
    return lengths


def _chat(user: str, reply: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]},
                      ensure_ascii=False)


def test_a_20_mb_record_is_refused_at_its_line_and_never_held_or_tokenised(
        tmp_path: Path, tok: Any, encoded: list[int]) -> None:
    f = tmp_path / "d.jsonl"
    with f.open("w", encoding="utf-8") as fh:
        fh.write(_chat("Hi", "Hello") + "\n")
        fh.write(_chat("Summarise: " + "x" * (20 * 2**20), "ok") + "\n")
        fh.write(_chat("Bye", "Goodbye") + "\n")
    tracemalloc.start()
    try:
        report = inspect_dataset(DataConfig(f, max_length=64), tok)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    problems = [(p.line, p.code) for p in report.problems]
    assert problems == [(2, "too_large")] and report.n_samples == 2
    assert "20.0 MiB" in report.problems[0].message and "8 MiB limit" in report.problems[0].message
    assert max(encoded) < 100  # only the two small records reached the tokenizer
    assert peak < 3 * MAX_RECORD_BYTES  # at most 8 MiB of the 20 MB line held at once, and never parsed


def test_a_long_record_is_tokenised_only_as_far_as_max_length_uses(
        tmp_path: Path, tok: Any, encoded: list[int]) -> None:
    f = tmp_path / "d.jsonl"
    with f.open("w", encoding="utf-8") as fh:  # 6 MB: under the record limit
        fh.write(_chat("Tell me everything.", "word " * (6 * 2**20 // 5)) + "\n")
        fh.write(_chat("Hi", "Hello") + "\n")
    prep = prepare_dataset(DataConfig(f, max_length=64, eval_fraction=0.0), tok)
    assert max(encoded) <= 64 * MAX_CHARS_PER_TOKEN + TEMPLATE_SLACK
    long = max(prep.train, key=len)
    assert len(long) == 64 and long.n_label_tokens > 20  # cut to max_length, labels on the reply
    assert [(p.line, p.code) for p in prep.report.problems] == [(1, "truncated")]
    assert "truncated to the first 64 tokens" in prep.report.problems[0].message


def test_the_text_record_is_cut_too(tmp_path: Path, tok: Any, encoded: list[int]) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "doc " * 2**20}) + "\n" + json.dumps({"text": "short one"}) + "\n")
    prep = prepare_dataset(DataConfig(f, max_length=32, eval_fraction=0.0), tok)
    assert max(encoded) <= 32 * MAX_CHARS_PER_TOKEN
    assert sorted(len(ex) for ex in prep.train)[-1] == 32 and prep.report.n_truncated == 1


def test_thousands_of_turns_cost_what_max_length_tokens_do(tmp_path: Path, tok: Any, encoded: list[int]) -> None:
    turns = [{"role": r, "content": f"{r} turn {i}"} for i in range(1000) for r in ("user", "assistant")]
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": turns}) + "\n")
    prep = prepare_dataset(DataConfig(f, max_length=64, eval_fraction=0.0), tok)
    assert len(prep.train) == 1 and len(prep.train[0]) == 64 and prep.train[0].n_label_tokens > 0
    assert sum(encoded) < 64 * MAX_CHARS_PER_TOKEN * 40  # not 1000 renders of a growing conversation


@pytest.mark.parametrize("kind", ["binary", "latin-1", "utf-16"])
def test_a_file_that_is_not_utf8_text_is_one_problem(tmp_path: Path, kind: str) -> None:
    f = tmp_path / "data.jsonl"
    if kind == "binary":
        rng = random.Random(0)
        f.write_bytes(bytes(rng.randrange(256) for _ in range(200_000)))
    else:
        rows = "".join(_chat(f"Café n°{i}", "Très bien") + "\n" for i in range(200))
        f.write_bytes(rows.encode(kind))
    report = inspect_dataset(DataConfig(f))
    assert len(report.problems) == 1 and report.problems[0].code == "not_text" and not report.ok
    expected = {"binary": "looks binary", "latin-1": "is not UTF-8 text", "utf-16": "is UTF-16 text"}[kind]
    assert "data.jsonl" in report.problems[0].message and expected in report.problems[0].message


def test_one_bad_line_in_a_utf8_file_is_still_named_by_its_line(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    good = (_chat("a", "b") + "\n").encode()
    f.write_bytes(good * 5 + _chat("Café", "x").encode("latin-1") + b"\n" + good * 5)
    report = inspect_dataset(DataConfig(f))
    assert [(p.line, p.code) for p in report.problems] == [(6, "bad_json")]
