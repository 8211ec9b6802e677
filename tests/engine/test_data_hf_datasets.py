"""Hugging Face ``datasets`` folders (save_to_disk), Parquet/Arrow folders and the local caches are read like files:
same formats, column map, ``file: row N`` problems and fingerprints."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets  # a dev dependency: only the tests build datasets with it
import pytest

from emloc_engine.data import DataConfig, inspect_dataset, prepare_dataset
from emloc_engine.data.hf_datasets import choose_split, find_source, split_of
from emloc_engine.data.pipeline import fingerprint
from tests.tiny_models import make_tokenizer


@pytest.fixture(scope="module")
def tok() -> Any:
    return make_tokenizer()


@pytest.fixture(autouse=True)
def _offline_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Caches in tmp_path, offline: nothing here may reach or read the user's caches."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


def chats(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Double {i}?"},
                {"role": "assistant", "content": f"{2 * i}"},
            ]
        }
        for i in range(start, start + n)
    ]


def test_save_to_disk_dataset_is_read_like_a_jsonl_file(tmp_path: Path, tok: Any) -> None:
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(chats(6)).save_to_disk(str(folder))
    prep = prepare_dataset(DataConfig(folder, eval_fraction=0.0), tok)
    assert prep.report.format == "messages" and prep.report.n_samples == 6 and prep.report.ok
    jsonl = tmp_path / "same.jsonl"
    datasets.Dataset.from_list(chats(6)).to_json(str(jsonl))
    same = prepare_dataset(DataConfig(jsonl, eval_fraction=0.0), tok)
    assert [e.input_ids for e in prep.train] == [e.input_ids for e in same.train]
    assert [e.labels for e in prep.train] == [e.labels for e in same.train]


def test_dataset_dict_reads_train_and_a_split_folder_reads_that_split(tmp_path: Path, tok: Any) -> None:
    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {"test": datasets.Dataset.from_list(chats(2, 100)), "train": datasets.Dataset.from_list(chats(5))}
    ).save_to_disk(str(folder))
    source = find_source(folder)
    assert source.split == "train" and set(source.splits) == {"train", "test"}
    assert inspect_dataset(DataConfig(folder, eval_fraction=0.0), tok).n_samples == 5
    assert inspect_dataset(DataConfig(folder / "test", eval_fraction=0.0), tok).n_samples == 2


def test_bad_rows_are_named_by_row_and_the_column_map_applies(tmp_path: Path, tok: Any) -> None:
    rows = [{"question": f"Q{i}", "answer": f"A{i}"} for i in range(5)]
    rows[3]["answer"] = ""
    folder = tmp_path / "qa"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    report = inspect_dataset(
        DataConfig(
            folder, format="prompt_completion", column_map=(("prompt", "question"), ("completion", "answer"))
        ),
        tok,
    )
    assert [p.where() for p in report.fatal_problems] == [f"{folder}: row 3"]
    assert "'completion' (column 'answer') is empty" in report.fatal_problems[0].message
    unmapped = inspect_dataset(DataConfig(folder), tok)
    assert unmapped.format == "unknown" and "answer, question" in unmapped.fatal_problems[0].message


def test_parquet_folder_in_hub_layout_picks_the_train_split_over_shards(tmp_path: Path, tok: Any) -> None:
    folder = tmp_path / "repo"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_list(chats(3)).to_parquet(str(folder / "data" / "train-00000-of-00002.parquet"))
    datasets.Dataset.from_list(chats(4, 3)).to_parquet(str(folder / "data" / "train-00001-of-00002.parquet"))
    datasets.Dataset.from_list(chats(2, 50)).to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    report = inspect_dataset(DataConfig(folder, eval_fraction=0.0), tok)
    assert report.ok and report.n_samples == 7  # both train shards, not the test split
    # a bad row in the second shard is counted over the split: row 3 + 1
    datasets.Dataset.from_list(
        [*chats(1, 3), {"messages": [{"role": "robot", "content": "x"}]}, *chats(2, 5)]
    ).to_parquet(str(folder / "data" / "train-00001-of-00002.parquet"))
    bad = inspect_dataset(DataConfig(folder, eval_fraction=0.0), tok)
    assert [p.item for p in bad.fatal_problems] == [4] and "unknown role 'robot'" in bad.fatal_problems[
        0
    ].message


def test_arrow_folder_in_both_ipc_formats(tmp_path: Path, tok: Any) -> None:
    import pyarrow as pa

    table = datasets.Dataset.from_list([{"text": f"document {i}"} for i in range(4)]).data.table
    folder = tmp_path / "arrow"
    folder.mkdir()
    with pa.OSFile(str(folder / "a.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    with pa.OSFile(str(folder / "b.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    (folder / "cache-0123.arrow").write_bytes(b"not data: what map() leaves behind")
    report = inspect_dataset(DataConfig(folder, eval_fraction=0.0), tok)
    assert report.ok and report.format == "text" and report.n_samples == 8


def test_the_local_datasets_cache_offline_by_name(tmp_path: Path, tok: Any) -> None:
    # what load_dataset("org/chat") prepares: ds-cache/org___chat/default/0.0.0/HASH/chat-train.arrow
    built = datasets.load_dataset(
        "json",
        data_files={
            "train": _jsonl(tmp_path / "t.jsonl", chats(5)),
            "validation": _jsonl(tmp_path / "v.jsonl", chats(2)),
        },
        cache_dir=str(tmp_path / "build"),
    )
    prepared = Path(built["train"].cache_files[0]["filename"]).parent
    target = tmp_path / "ds-cache" / "org___chat" / "default" / "0.0.0" / "abc123"
    target.mkdir(parents=True)
    for f in prepared.iterdir():
        shutil.copy(f, target / f.name.replace("json-", "chat-"))
    assert {split_of(f.name) for f in target.glob("*.arrow")} == {"train", "validation"}
    name = Path("org/chat")
    assert not name.exists()
    report = inspect_dataset(DataConfig(name, eval_fraction=0.0), tok)
    assert report.ok and report.n_samples == 5 and find_source(name).kind == "datasets-cache"
    assert fingerprint(DataConfig(name)) != fingerprint(DataConfig(Path("org/other")))


def test_the_hub_cache_snapshot_by_name_and_unknown_names(tmp_path: Path, tok: Any) -> None:
    repo = tmp_path / "hub" / "datasets--org--qa"
    rev = "0" * 40
    (repo / "snapshots" / rev / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    datasets.Dataset.from_list(chats(3)).to_parquet(
        str(repo / "snapshots" / rev / "data" / "train-0.parquet")
    )
    assert inspect_dataset(DataConfig(Path("org/qa"), eval_fraction=0.0), tok).n_samples == 3
    missing = inspect_dataset(DataConfig(Path("org/none")), tok)
    assert missing.fatal_problems[0].code == "not_found"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no .parquet or .arrow files" in inspect_dataset(DataConfig(empty), tok).fatal_problems[0].message


def test_fingerprint_follows_the_data_files(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(chats(3)).save_to_disk(str(folder))
    before = fingerprint(DataConfig(folder))
    shutil.rmtree(folder)
    datasets.Dataset.from_list(chats(3, 1)).save_to_disk(str(folder))
    assert fingerprint(DataConfig(folder)) != before


def test_split_names() -> None:
    assert (
        split_of("data/train-00000-of-00002") == "train" and split_of("chat-validation.arrow") == "validation"
    )
    assert split_of("dev/part-0.parquet") == "validation" and split_of("data-00000-of-00001.arrow") == ""
    assert choose_split(["test", "validation"]) == "validation" and choose_split(["b", "a"]) == "a"
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_emloc_data_and_run_take_a_datasets_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from emloc_engine.catalog.resolve import resolve_data
    from emloc_engine.cli.main import main

    folder = tmp_path / "saved"
    rows = chats(4)
    rows[1] = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}]}
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    assert main(["data", str(folder)]) != 0
    out = capsys.readouterr().out
    assert f"{folder}: row 1" in out and "has empty content" in out
    assert resolve_data(str(folder)) == folder  # emloc run DATA accepts it too
