"""Every dataset format and container is read into the same samples; auto-detection and its override."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from emloc_engine.core.errors import ConfigError
from emloc_engine.data import FORMATS, DataConfig, inspect_dataset, prepare_dataset
from emloc_engine.data.formats import Sample, container_of, detect_format, iter_text_chunks
from emloc_engine.data.render import IGNORE_INDEX
from emloc_engine.data.validation import ProblemLog
from tests.tiny_models import make_tokenizer


@pytest.fixture(scope="module")
def tok() -> Any:
    return make_tokenizer()


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def trained_text(tok: Any, labels: tuple[int, ...]) -> str:
    return tok.decode([t for t in labels if t != IGNORE_INDEX])


CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello you"}]


def test_messages_jsonl(tmp_path: Path, tok: Any) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}] * 3)
    prep = prepare_dataset(DataConfig(f, eval_fraction=0.0), tok)
    assert prep.report.format == "messages" and prep.report.n_samples == 3 and len(prep.train) == 3
    assert trained_text(tok, prep.train[0].labels) == "Hello you<|im_end|>"


def test_sharegpt_json_array(tmp_path: Path, tok: Any) -> None:
    rows = [{"conversations": [{"from": "system", "value": "Be kind"}, {"from": "human", "value": "Q1"},
                               {"from": "gpt", "value": "A1"}]}] * 2
    f = tmp_path / "d.json"
    f.write_text(json.dumps(rows, indent=2))
    prep = prepare_dataset(DataConfig(f, eval_fraction=0.0), tok)
    assert prep.report.format == "sharegpt" and prep.report.n_samples == 2
    text = tok.decode(prep.train[0].input_ids)
    assert "<|im_start|>system\nBe kind" in text and "<|im_start|>user\nQ1" in text
    assert trained_text(tok, prep.train[0].labels) == "A1<|im_end|>"


def test_alpaca_with_input_system_and_history(tmp_path: Path, tok: Any) -> None:
    rows = [{"instruction": "Translate", "input": "chat", "output": "cat", "system": "You translate.",
             "history": [["one", "un"]]},
            {"instruction": "Say hi", "input": "", "output": "hi"}]
    f = write_jsonl(tmp_path / "a.jsonl", rows)
    prep = prepare_dataset(DataConfig(f, eval_fraction=0.0), tok)
    assert prep.report.format == "alpaca"
    first = tok.decode(prep.train[0].input_ids)
    assert "system\nYou translate." in first and "user\nTranslate\n\nchat<|im_end|>" in first
    assert trained_text(tok, prep.train[0].labels) == "un<|im_end|>cat<|im_end|>"
    assert "user\nSay hi<|im_end|>" in tok.decode(prep.train[1].input_ids)  # empty input adds nothing


def test_prompt_completion_plain_text(tmp_path: Path, tok: Any) -> None:
    f = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": "4"}, {"prompt": "3+3=", "completion": 6}])
    prep = prepare_dataset(DataConfig(f, eval_fraction=0.0), tok)
    assert prep.report.format == "prompt_completion"
    ex = prep.train[0]
    assert tok.decode(ex.input_ids) == "2+2=4<|im_end|>"  # no chat template, EOS appended
    assert trained_text(tok, ex.labels) == "4<|im_end|>"
    assert trained_text(tok, prep.train[1].labels) == "6<|im_end|>"  # numbers are read as text


def test_conversational_prompt_completion_is_chat(tmp_path: Path, tok: Any) -> None:
    f = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": [CHAT[0]], "completion": [CHAT[1]]}])
    prep = prepare_dataset(DataConfig(f, eval_fraction=0.0), tok)
    assert trained_text(tok, prep.train[0].labels) == "Hello you<|im_end|>"


def test_text_rows_train_on_every_token(tmp_path: Path, tok: Any) -> None:
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "The cat sat."}])
    prep = prepare_dataset(DataConfig(f, eval_fraction=0.0), tok)
    ex = prep.train[0]
    assert prep.report.format == "text" and ex.labels == ex.input_ids
    assert tok.decode(ex.input_ids) == "The cat sat.<|im_end|>"


def test_csv_with_column_map_and_multiline_cells(tmp_path: Path, tok: Any) -> None:
    f = tmp_path / "d.csv"
    f.write_text('question,answer\n"What is\nup?",sky\nWho,me\n', encoding="utf-8")
    cfg = DataConfig(f, column_map=(("prompt", "question"), ("completion", "answer")), eval_fraction=0.0)
    prep = prepare_dataset(cfg, tok)
    assert prep.report.format == "prompt_completion" and prep.report.n_samples == 2
    assert tok.decode(prep.train[0].input_ids) == "What is\nup?sky<|im_end|>"


def test_csv_messages_cell_holds_json(tmp_path: Path, tok: Any) -> None:
    f = tmp_path / "d.csv"
    import csv

    with f.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dialog"])
        w.writerow([json.dumps(CHAT)])
    prep = prepare_dataset(DataConfig(f, column_map=(("messages", "dialog"),), eval_fraction=0.0), tok)
    assert trained_text(tok, prep.train[0].labels) == "Hello you<|im_end|>"


def test_tsv(tmp_path: Path) -> None:
    f = tmp_path / "d.tsv"
    f.write_text("instruction\toutput\nDo it\tDone\n")
    report = inspect_dataset(DataConfig(f))
    assert report.format == "alpaca" and report.n_samples == 1 and report.ok


def test_parquet_with_column_map(tmp_path: Path, tok: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"dialog": [CHAT, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]],
                      "id": [1, 2]})
    f = tmp_path / "d.parquet"
    pq.write_table(table, f)
    prep = prepare_dataset(DataConfig(f, column_map=(("messages", "dialog"),), eval_fraction=0.0), tok)
    assert prep.report.format == "messages" and len(prep.train) == 2
    assert trained_text(tok, prep.train[1].labels) == "b<|im_end|>"


def test_txt_is_chunked_and_trained_everywhere(tmp_path: Path, tok: Any) -> None:
    lines = [f"Line {i:03d} of the play, spoken aloud." for i in range(200)]
    f = tmp_path / "play.txt"
    f.write_text("\n".join(lines) + "\n")
    no_tok = inspect_dataset(DataConfig(f, max_length=64))
    assert no_tok.format == "txt" and no_tok.n_samples > 1
    assert no_tok.char_stats is not None and no_tok.char_stats.max <= 2 * 64 * 4
    prep = prepare_dataset(DataConfig(f, max_length=64, eval_fraction=0.0), tok)
    assert all(len(ex) <= 64 for ex in prep.train) and all(ex.labels == ex.input_ids for ex in prep.train)
    assert all(len(ex) == 64 for ex in prep.train[:-1])  # the token stream is re-cut into full windows
    assert "".join(tok.decode(ex.input_ids) for ex in prep.train) == f.read_text()  # nothing lost or added
    assert prep.report.n_truncated == 0


def test_txt_chunks_carry_their_start_line(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("".join(f"{i}\n" * 1 for i in range(1, 41)) + "x" * 100 + "\n")
    chunks = list(iter_text_chunks(f, 20, ProblemLog(str(f))))
    assert chunks[0].line == 1
    for c in chunks:
        first = c.text.split("\n")[0]
        if first.isdigit():
            assert c.line == int(first)
    assert "".join(c.text for c in chunks) == f.read_text()


def test_json_object_wrapping_a_list(tmp_path: Path) -> None:
    f = tmp_path / "w.json"
    f.write_text(json.dumps({"version": 1, "data": [{"text": "a"}, {"text": "b"}]}))
    report = inspect_dataset(DataConfig(f))
    assert report.format == "text" and report.n_samples == 2


def test_jsonl_named_json(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "d.json", [{"text": "a"}, {"text": "b"}, {"text": "c"}])
    report = inspect_dataset(DataConfig(f))
    assert report.n_samples == 3 and report.ok


def test_unknown_suffix_is_sniffed(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "data.log", [{"text": "a"}])
    assert container_of(f, "auto") == "json"
    assert inspect_dataset(DataConfig(f)).n_samples == 1


@pytest.mark.parametrize(("fields", "fmt"), [
    ({"messages", "id"}, "messages"), ({"conversations"}, "sharegpt"), ({"instruction", "input", "output"}, "alpaca"),
    ({"prompt", "completion"}, "prompt_completion"), ({"text", "meta"}, "text"), ({"question", "answer"}, None),
])
def test_detect_format(fields: set[str], fmt: str | None) -> None:
    assert detect_format(fields) == fmt


def test_format_override_beats_detection(tmp_path: Path, tok: Any) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "P ", "completion": "C", "text": "whole text"}])
    assert inspect_dataset(DataConfig(f)).format == "prompt_completion"
    prep = prepare_dataset(DataConfig(f, format="text", eval_fraction=0.0), tok)
    assert prep.report.format == "text" and tok.decode(prep.train[0].input_ids) == "whole text<|im_end|>"


def test_role_aliases_content_parts_and_weight(tmp_path: Path, tok: Any) -> None:
    msgs = [{"role": "developer", "content": "Sys"},
            {"role": "user", "content": [{"type": "text", "text": "Part "}, {"type": "text", "text": "two"}]},
            {"role": "assistant", "content": "skip me", "weight": 0},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "train me"}]
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    prep = prepare_dataset(DataConfig(f, eval_fraction=0.0), tok)
    text = tok.decode(prep.train[0].input_ids)
    assert "<|im_start|>system\nSys" in text and "user\nPart two<|im_end|>" in text and "skip me" in text
    assert trained_text(tok, prep.train[0].labels) == "train me<|im_end|>"


def test_formats_listed_and_config_validated(tmp_path: Path) -> None:
    assert set(FORMATS) == {"messages", "sharegpt", "alpaca", "prompt_completion", "text", "txt"}
    with pytest.raises(ConfigError) as exc:
        DataConfig(tmp_path / "x", format="yaml", max_length=2, train_on="some", column_map=(("answer", "a"),))
    assert len(exc.value.problems) == 4 and "messages" in str(exc.value)


def test_sample_helpers() -> None:
    s = Sample("chat", 1, None, messages=({"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}))
    assert s.char_length() == 3 and s.has_target() and s.preview() == "user: ab\nassistant: c"
