"""Every class of bad input is reported with its file and line; labels, truncation, packing, split, calibration."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from emloc_engine.core.errors import DataError, ModelNotFound
from emloc_engine.data import (
    DataConfig,
    DataReport,
    calibration_token_ids,
    inspect_dataset,
    load_tokenizer,
    prepare_dataset,
)
from emloc_engine.data.calibration import windows_from_examples
from emloc_engine.data.formats import Sample
from emloc_engine.data.render import IGNORE_INDEX, Example, pack, render_chat, split_indices
from emloc_engine.data.validation import LengthStats, split_sizes
from tests.tiny_models import make_tokenizer


@pytest.fixture
def tok() -> Any:
    return make_tokenizer()


def jsonl(path: Path, lines: list[Any]) -> Path:
    """One line per item; strings are written verbatim (to plant bad JSON)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def chat(user: str, reply: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def by_code(report: DataReport, code: str) -> list[tuple[int | None, int | None]]:
    return [(p.line, p.item) for p in report.problems if p.code == code]


def trained(tok: Any, labels: tuple[int, ...] | list[int]) -> str:
    return tok.decode([t for t in labels if t != IGNORE_INDEX])


# ------------------------------------------------------------------------------- bad input and lines
def test_each_bad_record_is_reported_with_its_line(tmp_path: Path) -> None:
    f = jsonl(tmp_path / "d.jsonl", [
        chat("a", "b"),                                                        # 1 ok
        '{"messages": [',                                                      # 2 bad JSON
        {"messages": [{"role": "user", "content": "x"}, {"role": "wizard", "content": "y"}]},  # 3 role
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},  # 4 empty
        {"messages": "hello"},                                                 # 5 wrong type
        {"id": 7},                                                             # 6 missing field
        [1, 2],                                                                # 7 not an object
        {"messages": [{"content": "who am i"}]},                               # 8 no role
        {"messages": [{"role": "user", "content": {"a": 1}}]},                 # 9 content type
        "",                                                                    # 10 blank: skipped
        chat("c", "d"),                                                        # 11 ok
    ])
    report = inspect_dataset(DataConfig(f))
    assert report.n_samples == 2 and not report.ok
    assert by_code(report, "bad_json") == [(2, None)]
    assert by_code(report, "unknown_role") == [(3, None)]
    assert by_code(report, "empty_field") == [(4, None)]
    assert by_code(report, "wrong_type") == [(5, None), (7, None), (9, None)]
    assert by_code(report, "missing_field") == [(6, None), (8, None)]
    assert all(p.fatal for p in report.problems) and len(report.problems) == 8
    assert str(report.problems[0]).startswith(f"{f}:2: error: bad JSON")
    assert "'wizard'" in report.problems[1].message and "assistant" in report.problems[1].message


def test_prepare_raises_one_error_listing_all(tmp_path: Path, tok: Any) -> None:
    f = jsonl(tmp_path / "d.jsonl", [chat("a", "b"), "{oops", {"text": "wrong format"}, "also bad"])
    with pytest.raises(DataError) as exc:
        prepare_dataset(DataConfig(f), tok)
    err = exc.value
    assert len(err.problems) == 3
    assert [p.split(": ")[0] for p in err.problems] == [f"{f}:2", f"{f}:3", f"{f}:4"]
    assert "missing field 'messages'" in err.problems[1]
    assert err.report.n_samples == 1  # type: ignore[attr-defined]


def test_alpaca_field_problems(tmp_path: Path) -> None:
    f = jsonl(tmp_path / "a.jsonl", [
        {"instruction": "i", "output": "o"},
        {"instruction": "i"},
        {"instruction": "   ", "output": "o"},
        {"instruction": ["i"], "output": "o"},
        {"instruction": "i", "output": "o", "history": [["only one"]]},
    ])
    report = inspect_dataset(DataConfig(f))
    assert by_code(report, "missing_field") == [(2, None)]
    assert by_code(report, "empty_field") == [(3, None)]
    assert by_code(report, "wrong_type") == [(4, None), (5, None)]


def test_column_map_named_in_messages(tmp_path: Path) -> None:
    f = tmp_path / "d.csv"
    f.write_text("q,a\nhello,world\nagain,\n")
    report = inspect_dataset(DataConfig(f, column_map=(("prompt", "q"), ("completion", "a"))))
    assert by_code(report, "empty_field") == [(3, None)]
    assert "'completion' (column 'a')" in report.problems[0].message


def test_csv_lines_count_multiline_cells(tmp_path: Path) -> None:
    f = tmp_path / "d.csv"
    f.write_text('prompt,completion\n"two\nlines",ok\n"x",\n')
    report = inspect_dataset(DataConfig(f))
    assert by_code(report, "empty_field") == [(4, None)]  # the header is line 1, the multi-line row 2-3


def test_json_array_items_have_index_and_line(tmp_path: Path) -> None:
    f = tmp_path / "d.json"
    f.write_text('[\n  {"text": "a"},\n  {"text": ""},\n  {\n    "text": 5.5\n  },\n  {"tex": "b"}\n]\n')
    report = inspect_dataset(DataConfig(f))
    assert by_code(report, "empty_field") == [(3, 1)]
    assert by_code(report, "missing_field") == [(7, 3)]
    assert report.n_samples == 2  # 5.5 is read as text
    assert report.problems[0].where() == f"{f}:3: item 1"


def test_json_array_syntax_error_line(tmp_path: Path) -> None:
    f = tmp_path / "d.json"
    f.write_text('[\n  {"text": "a"},\n  {"text": "b",},\n  {"text": "c"}\n]\n')
    report = inspect_dataset(DataConfig(f))
    assert by_code(report, "bad_json") == [(3, 1)] and report.n_samples == 1


def test_parquet_rows_are_located(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c", ""]}), f)
    report = inspect_dataset(DataConfig(f))
    assert by_code(report, "missing_field") == [(None, 1)] and by_code(report, "empty_field") == [(None, 3)]
    assert report.problems[0].where() == f"{f}: row 1"


def test_empty_missing_and_unknown_files(tmp_path: Path) -> None:
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n  \n")
    assert by_code(inspect_dataset(DataConfig(empty)), "empty_file") == [(None, None)]
    assert by_code(inspect_dataset(DataConfig(tmp_path / "nope.jsonl")), "not_found") == [(None, None)]
    header_only = tmp_path / "h.csv"
    header_only.write_text("prompt,completion\n")
    assert by_code(inspect_dataset(DataConfig(header_only)), "empty_file") == [(None, None)]
    weird = tmp_path / "d.xyz"
    weird.write_text("just words\n")
    problem = inspect_dataset(DataConfig(weird)).problems[0]
    assert problem.code == "unknown_format" and "--format txt" in problem.message
    assert inspect_dataset(DataConfig(weird, format="txt")).ok


def test_unknown_format_lists_formats_and_override(tmp_path: Path) -> None:
    f = jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    report = inspect_dataset(DataConfig(f))
    (problem,) = report.problems
    assert problem.code == "unknown_format" and problem.line == 1 and report.format == "unknown"
    for word in ("question", "answer", "messages", "sharegpt", "alpaca", "prompt_completion", "--format", "--map"):
        assert word in problem.message
    fixed = inspect_dataset(DataConfig(f, column_map=(("prompt", "question"), ("completion", "answer"))))
    assert fixed.ok and fixed.format == "prompt_completion"


def test_txt_file_with_record_format_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("hello\n")
    assert by_code(inspect_dataset(DataConfig(f, format="messages")), "unknown_format") == [(None, None)]


# ----------------------------------------------------------------------------------------- labels
SYSTEM_TEMPLATE = (  # Llama-3-like: a default system prompt when none is given, header tokens per turn
    "{{ '<|endoftext|>' }}"
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nDefault helper.<|im_end|>' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n\n' + m['content'] | trim + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n\n' }}{% endif %}"
)
FOLDING_TEMPLATE = (  # Gemma-like: no system role, the system text is folded into the first user turn
    "{% set ns = namespace(sys='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.sys = m['content'] + '\n\n' %}"
    "{% else %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<|im_start|>' + role + '\n' + (ns.sys if loop.index0 == 1 else '') + m['content'] + '<|endoftext|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>model\n' }}{% endif %}"
)
CONVERSATION = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Ciao!"}]


@pytest.mark.parametrize("template", [None, SYSTEM_TEMPLATE, FOLDING_TEMPLATE], ids=["chatml", "sysdefault", "folding"])
@pytest.mark.parametrize("with_system", [True, False])
def test_labels_are_exactly_the_assistant_replies(tok: Any, template: str | None, with_system: bool) -> None:
    msgs = tuple(CONVERSATION if with_system else CONVERSATION[1:])
    if template:
        tok.chat_template = template
    r = render_chat(Sample("chat", 1, None, messages=msgs), tok, None, "assistant")
    assert r.input_ids == tok(tok.apply_chat_template(list(msgs), tokenize=False), add_special_tokens=False)["input_ids"]
    spans, cur = [], []
    for t in r.labels:
        if t != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    end = "<|endoftext|>" if template == FOLDING_TEMPLATE else "<|im_end|>"
    assert spans == [f"Hello.{end}", f"Ciao!{end}"]
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(r.labels, r.input_ids, strict=True))


def test_train_on_all_labels_every_token(tmp_path: Path, tok: Any) -> None:
    f = jsonl(tmp_path / "d.jsonl", [chat("q", "a")])
    ex = prepare_dataset(DataConfig(f, train_on="all", eval_fraction=0.0), tok).train[0]
    assert ex.labels == ex.input_ids


def test_no_chat_template_falls_back_with_a_warning(tmp_path: Path, tok: Any) -> None:
    tok.chat_template = None
    f = jsonl(tmp_path / "d.jsonl", [chat("q1", "a1"), chat("q2", "a2")])
    prep = prepare_dataset(DataConfig(f, eval_fraction=0.0), tok)
    warnings = [p for p in prep.report.problems if p.code == "no_chat_template"]
    assert len(warnings) == 1 and not warnings[0].fatal
    assert tok.decode(prep.train[0].input_ids) == "### User:\nq1\n\n### Assistant:\na1<|im_end|>\n\n"
    assert trained(tok, prep.train[0].labels) == "a1<|im_end|>"


def test_template_without_assistant_turn_masks_everything_and_is_fatal(tmp_path: Path, tok: Any) -> None:
    tok.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    f = jsonl(tmp_path / "d.jsonl", [chat("q1", "a1"), chat("q2", "a2")])
    report = inspect_dataset(DataConfig(f), tok)
    assert by_code(report, "no_labels") == [(1, None), (2, None)]
    (fatal,) = report.fatal_problems
    assert fatal.code == "all_masked" and "--train-on all" in fatal.message and "assistant turn marker" in fatal.message
    with pytest.raises(DataError) as exc:
        prepare_dataset(DataConfig(f), tok)
    assert "--train-on all" in str(exc.value)
    assert prepare_dataset(DataConfig(f, train_on="all"), tok).report.ok  # the documented fix works


def test_samples_without_label_are_warned_and_skipped(tmp_path: Path, tok: Any) -> None:
    f = jsonl(tmp_path / "d.jsonl", [chat("q", "a"), {"messages": [{"role": "user", "content": "only a question"}]},
                                     chat("q", "b")])
    prep = prepare_dataset(DataConfig(f, eval_fraction=0.0), tok)
    assert by_code(prep.report, "no_labels") == [(2, None)] and prep.report.ok
    assert len(prep.train) == 2 and prep.report.n_no_labels == 1
    structure = inspect_dataset(DataConfig(f))  # also found without a tokenizer
    assert by_code(structure, "no_labels") == [(2, None)]


def test_truncation_warns_and_cuts(tmp_path: Path, tok: Any) -> None:
    f = jsonl(tmp_path / "d.jsonl", [chat("q", "a" * 100), chat("q", "short")])
    prep = prepare_dataset(DataConfig(f, max_length=40, eval_fraction=0.0), tok)
    assert by_code(prep.report, "truncated") == [(1, None)] and prep.report.n_truncated == 1
    assert [len(ex) for ex in prep.train] == [40, len(prep.train[1])] and len(prep.train[1]) < 40
    assert prep.report.token_stats is not None and prep.report.token_stats.max > 40  # stats before truncation
    assert "dropped" in prep.report.problems[0].message


def test_truncation_that_removes_every_reply_is_fatal(tmp_path: Path, tok: Any) -> None:
    f = jsonl(tmp_path / "d.jsonl", [chat("q" * 60, "a"), chat("w" * 60, "b")])
    report = inspect_dataset(DataConfig(f, max_length=32), tok)
    assert report.n_no_labels == 2 and report.fatal_problems[0].code == "all_masked"
    assert "max_length" in report.fatal_problems[0].message


def test_template_error_is_located(tmp_path: Path, tok: Any) -> None:
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    f = jsonl(tmp_path / "d.jsonl", [chat("q", "a"), {"messages": [{"role": "system", "content": "s"}, *chat("q", "a")["messages"]]}])
    report = inspect_dataset(DataConfig(f), tok)
    assert by_code(report, "template_error") == [(2, None)]
    assert "System role not supported" in report.fatal_problems[0].message


# ------------------------------------------------------------------------------ packing and split
def test_packing_keeps_every_token_and_label(tmp_path: Path, tok: Any) -> None:
    f = jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", f"answer {i}" * (i % 3 + 1)) for i in range(20)])
    plain = prepare_dataset(DataConfig(f, max_length=128, eval_fraction=0.0), tok)
    packed = prepare_dataset(DataConfig(f, max_length=128, eval_fraction=0.0, packing=True), tok)
    assert len(packed.train) < len(plain.train) and all(len(ex) <= 128 for ex in packed.train)
    flat = [t for ex in plain.train for t in ex.input_ids]
    assert [t for ex in packed.train for t in ex.input_ids] == flat
    assert [t for ex in packed.train for t in ex.labels] == [t for ex in plain.train for t in ex.labels]
    exs = [Example((1,) * 5, (1,) * 5), Example((2,) * 4, (2,) * 4), Example((3,) * 3, (3,) * 3)]
    assert [len(e) for e in pack(exs, 9)] == [9, 3]


@pytest.mark.parametrize(("n", "fraction", "expected"), [
    (0, 0.1, (0, 0)), (1, 0.5, (1, 0)), (2, 0.01, (1, 1)), (10, 0.1, (9, 1)), (100, 0.15, (85, 15)),
    (5, 0.0, (5, 0)), (3, 0.99, (1, 2)),
])
def test_split_sizes(n: int, fraction: float, expected: tuple[int, int]) -> None:
    assert split_sizes(n, fraction) == expected


def test_split_is_seeded_and_deterministic(tmp_path: Path, tok: Any) -> None:
    f = jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(30)])
    cfg = DataConfig(f, eval_fraction=0.2, seed=3)
    a, b = prepare_dataset(cfg, tok), prepare_dataset(cfg, tok)
    assert a.train == b.train and a.eval == b.eval and len(a.eval) == 6 and len(a.train) == 24
    c = prepare_dataset(replace(cfg, seed=4), tok)
    assert c.eval != a.eval
    assert set(a.train).isdisjoint(a.eval)
    assert split_indices(10, 2, 0) == split_indices(10, 2, 0)
    none = prepare_dataset(replace(cfg, eval_fraction=0.0), tok)
    assert len(none.eval) == 0 and len(none.train) == 30


# ------------------------------------------------------------------------------------ calibration
def test_calibration_ids_come_from_train_deterministic_and_bounded(tmp_path: Path, tok: Any) -> None:
    f = jsonl(tmp_path / "d.jsonl", [chat(f"question {i}", f"reply {i:02d}") for i in range(20)])
    cfg = DataConfig(f, max_length=48, eval_fraction=0.25, seed=1)
    ids = calibration_token_ids(cfg, tok, n=8, seed=5)
    assert len(ids) == 8 and all(len(x) == 48 for x in ids)
    assert ids == calibration_token_ids(cfg, tok, n=8, seed=5)
    assert ids != calibration_token_ids(cfg, tok, n=8, seed=6)
    prep = prepare_dataset(cfg, tok)
    text = "".join(tok.decode(x) for x in ids)
    for ex in prep.eval:  # held-out replies never reach the emulator
        reply = trained(tok, ex.labels).replace("<|im_end|>", "")
        assert reply not in text
    assert any(trained(tok, ex.labels).replace("<|im_end|>", "") in text for ex in prep.train)


def test_calibration_repeats_a_small_set_and_caps_length() -> None:
    exs = [Example(tuple(range(10 * i, 10 * i + 10)), (0,) * 10) for i in range(3)]
    windows = windows_from_examples(exs, n=5, length=100, seed=0)
    assert len(windows) == 5 and all(len(w) == 30 for w in windows)  # the whole split is shorter than L
    assert all(sorted(w) == list(range(30)) for w in windows)
    windows = windows_from_examples(exs, n=7, length=8, seed=0)
    assert len(windows) == 7 and all(len(w) == 8 for w in windows)
    with pytest.raises(DataError):
        windows_from_examples([], n=2, length=8, seed=0)


# ---------------------------------------------------------------------- report, fingerprint, speed
def test_fingerprint_follows_content_and_settings_not_path(tmp_path: Path) -> None:
    a = jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    b = jsonl(tmp_path / "b.jsonl", [{"text": "x"}])
    c = jsonl(tmp_path / "c.jsonl", [{"text": "y"}])
    fa = inspect_dataset(DataConfig(a)).fingerprint
    assert len(fa) == 16 and fa == inspect_dataset(DataConfig(b)).fingerprint
    assert fa != inspect_dataset(DataConfig(c)).fingerprint
    assert fa != inspect_dataset(DataConfig(a, max_length=256)).fingerprint


def test_report_stats_and_previews(tmp_path: Path, tok: Any) -> None:
    f = jsonl(tmp_path / "d.jsonl", [chat("q", "a" * n) for n in range(1, 21)])
    report = inspect_dataset(DataConfig(f), tok)
    stats = report.token_stats
    assert stats is not None and stats.unit == "tokens" and stats.max - stats.min == 19
    assert stats.p95 == stats.max - 1  # nearest rank: 19th of 20
    assert len(report.rendered_examples) == 3 and report.rendered_labels[0] == "a<|im_end|>"
    assert report.n_label_tokens == sum(range(1, 21)) + 20
    assert (report.n_train, report.n_eval) == (18, 2)
    assert LengthStats.of([], "chars") is None


def test_max_samples(tmp_path: Path) -> None:
    f = jsonl(tmp_path / "d.jsonl", [{"text": str(i)} for i in range(50)])
    assert inspect_dataset(DataConfig(f, max_samples=7)).n_samples == 7


def test_load_tokenizer_reads_a_folder_without_weights(tmp_path: Path) -> None:
    make_tokenizer().save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.eos_token_id == 3 and tok.chat_template
    with pytest.raises(ModelNotFound):
        load_tokenizer(tmp_path / "missing")


def test_100k_lines_validate_quickly(tmp_path: Path) -> None:
    f = tmp_path / "big.jsonl"
    row = json.dumps(chat("What is the capital of France?", "Paris."))
    f.write_text((row + "\n") * 100_000)
    t0 = time.process_time()  # CPU time: what the check costs, not how busy the machine is
    report = inspect_dataset(DataConfig(f))
    cpu_s = time.process_time() - t0
    assert report.n_samples == 100_000 and report.ok
    assert cpu_s < 15.0, f"structure check of 100k lines took {cpu_s:.1f} s of CPU"
