"""Image datasets: the three formats, every bad image / placeholder mismatch at its line, labels on replies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emloc_engine.core.errors import DataError
from emloc_engine.data.config import DataConfig
from emloc_engine.data.images import is_image_dataset
from emloc_engine.data.render import IGNORE_INDEX
from emloc_engine.data.vision_pipeline import inspect_vision_dataset, prepare_vision_dataset
from emloc_engine.vision.processor import load_processor
from tests.tiny_vlms import build_tiny_vlm, token_id, write_png


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def qwen_processor(tmp_path_factory: pytest.TempPathFactory):
    return load_processor(build_tiny_vlm("qwen2_vl", tmp_path_factory.mktemp("vlm") / "hub"))


def _data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    write_png(d / "img" / "red.png", (220, 20, 20))
    write_png(d / "img" / "blue.png", (20, 20, 220))
    return d


def test_three_formats_read_with_paths_relative_to_the_file(tmp_path: Path, qwen_processor) -> None:
    d = _data(tmp_path)
    parts = _jsonl(
        d / "parts.jsonl",
        [
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": "img/red.png"},
                            {"type": "text", "text": "Colour?"},
                        ],
                    },
                    {"role": "assistant", "content": "red"},
                ]
            }
        ]
        * 3,
    )
    llava = _jsonl(
        d / "llava.jsonl",
        [
            {
                "image": "img/blue.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nColour?"},
                    {"from": "gpt", "value": "blue"},
                ],
            }
        ]
        * 3,
    )
    (d / "table.csv").write_text(
        "image,question,answer\nimg/red.png,Colour?,red\nimg/blue.png,Colour?,blue\n"
        "img/red.png,Colour?,red\n",
        encoding="utf-8",
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"image_path": ["img/red.png"] * 3, "prompt": ["Colour?"] * 3, "response": ["red"] * 3}),
        d / "table.parquet",
    )
    pad = token_id("qwen2_vl", "<|image_pad|>")
    for f in (parts, llava, d / "table.csv", d / "table.parquet"):
        cfg = DataConfig(f, eval_fraction=0.34)
        assert is_image_dataset(cfg), f
        prepared = prepare_vision_dataset(cfg, qwen_processor)
        assert (len(prepared.train), len(prepared.eval)) == (2, 1), f
        ex = prepared.train[0]
        assert ex.input_ids.count(pad) == 1, f  # 28×28 image: one merged Qwen token
        labelled = [t for t in ex.labels if t != IGNORE_INDEX]
        text = qwen_processor.tokenizer.decode(labelled)
        assert text.startswith(("red", "blue")) and "Colour" not in text, (f, text)
        # image tokens never carry loss, and labels are the ids where they are set
        assert all(lab in (IGNORE_INDEX, t) for lab, t in zip(ex.labels, ex.input_ids))
        assert ex.labels[ex.input_ids.index(pad)] == IGNORE_INDEX


def test_text_dataset_is_not_an_image_dataset(tmp_path: Path) -> None:
    f = _jsonl(
        tmp_path / "t.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    assert not is_image_dataset(DataConfig(f))


def test_every_bad_image_and_mismatch_is_named_with_its_line(tmp_path: Path) -> None:
    d = _data(tmp_path)
    (d / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (d / "img" / "notes.png").write_text("hello", encoding="utf-8")
    from PIL import Image

    Image.new("L", (9000, 8000)).save(d / "img" / "huge.png")  # 72 Mpx, a few hundred KiB
    good = {
        "image": "img/red.png",
        "conversations": [{"from": "human", "value": "<image> c?"}, {"from": "gpt", "value": "red"}],
    }

    def rec(image: object, text: str = "<image> c?") -> dict:
        return {
            "image": image,
            "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "x"}],
        }

    f = _jsonl(
        d / "bad.jsonl",
        [
            good,  # 1
            rec("img/missing.png"),  # 2 missing
            rec("img/broken.png"),  # 3 truncated PNG
            rec("img/notes.png"),  # 4 not an image
            rec("img/huge.png"),  # 5 oversized
            rec(["img/red.png", "img/blue.png"]),  # 6 one placeholder, two images
            rec("img/red.png", "<image><image> two?"),  # 7 two placeholders, one image
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "image": "img/gone.png"}]},
                    {"role": "assistant", "content": "x"},
                ]
            },  # 8 missing, content-part style
            good,  # 9
        ],
    )
    report = inspect_vision_dataset(DataConfig(f))
    where = {p.line: p.message for p in report.problems if p.fatal}
    assert sorted(where) == [2, 3, 4, 5, 6, 7, 8]
    assert "not found" in where[2] and "missing.png" in where[2]
    assert "unreadable" in where[3] and "unreadable" in where[4]
    assert "too large" in where[5] and "9000×8000" in where[5]
    assert "1 <image> placeholder(s) but 2 image(s)" in where[6]
    assert "2 <image> placeholder(s) but 1 image(s)" in where[7]
    assert "gone.png" in where[8]
    assert all(str(p).startswith(f"{f}:") for p in report.fatal_problems)
    with pytest.raises(DataError) as err:
        report.raise_if_fatal()
    assert len(err.value.problems) == 7


def test_images_that_do_not_fit_max_length_are_skipped_with_a_warning(tmp_path: Path, qwen_processor) -> None:
    d = _data(tmp_path)
    long_q = "why? " * 40
    f = _jsonl(
        d / "long.jsonl",
        [
            {
                "image": "img/red.png",
                "conversations": [
                    {"from": "human", "value": long_q + "<image>"},
                    {"from": "gpt", "value": "red"},
                ],
            },
            {
                "image": "img/red.png",
                "conversations": [{"from": "human", "value": "<image> c?"}, {"from": "gpt", "value": "red"}],
            },
        ],
    )
    report = inspect_vision_dataset(DataConfig(f, max_length=64), qwen_processor)
    assert report.n_samples == 1 and report.n_no_labels == 1
    (w,) = report.warnings
    assert w.line == 1 and "max_length" in w.message


@pytest.mark.parametrize(
    "family",
    ["llava", "llava_next", "llava_onevision", "internvl", "idefics3", "smolvlm", "gemma3", "qwen2_5_vl"],
)
def test_labels_are_the_reply_for_every_family(family: str, tmp_path: Path) -> None:
    processor = load_processor(build_tiny_vlm(family, tmp_path / "hub"))
    d = _data(tmp_path)
    f = _jsonl(
        d / "p.jsonl",
        [
            {
                "image": "img/red.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is it?"},
                    {"from": "gpt", "value": "It is red."},
                    {"from": "human", "value": "Sure?"},
                    {"from": "gpt", "value": "Yes."},
                ],
            }
        ]
        * 2,
    )
    prepared = prepare_vision_dataset(DataConfig(f, eval_fraction=0.5), processor)
    ex = prepared.train[0]
    image_id = processor.image_token_id if hasattr(processor, "image_token_id") else None
    assert image_id is not None and ex.input_ids.count(image_id) >= 1
    spans = []
    cur: list[int] = []
    for lab in ex.labels:
        if lab == IGNORE_INDEX:
            if cur:
                spans.append(processor.tokenizer.decode(cur))
            cur = []
        else:
            cur.append(lab)
    spans.append(processor.tokenizer.decode(cur)) if cur else None
    assert [s.strip() for s in spans] == ["It is red.<|im_end|>", "Yes.<|im_end|>"], spans


def test_cli_data_checks_an_image_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from emloc_engine.cli.main import main

    snap = build_tiny_vlm("llava", tmp_path / "hub")
    d = _data(tmp_path)
    rec = {
        "image": "img/red.png",
        "conversations": [{"from": "human", "value": "<image> c?"}, {"from": "gpt", "value": "red"}],
    }
    good = _jsonl(d / "good.jsonl", [rec, rec])
    assert main(["data", str(good), "--model", str(snap)]) == 0
    out = capsys.readouterr().out
    assert "vision-chat" in out and "OK: the data can be used." in out
    bad = _jsonl(d / "bad.jsonl", [rec, {**rec, "image": "img/nope.png"}])
    assert main(["data", str(bad)]) == 2
    assert f"{bad}:2: error: image not found" in capsys.readouterr().out
