"""The fast GGUF header reader (emloc_engine/weights/gguf_header.py) against the gguf package's own reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from emloc_engine.core.errors import UnsupportedModel
from emloc_engine.weights.gguf_header import GgufHeaderError, gguf_header_of, read_gguf_header
from tests.gguf_files import random_kquant_blocks


def _write(path: Path, *, big_endian: bool = False, alignment: int | None = None) -> Path:
    import gguf
    from gguf.quants import quantize

    w = gguf.GGUFWriter(str(path), "llama", endianess=gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE)
    w.add_name("header test ✓")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_block_count(2)
    w.add_uint8("t.u8", 7)
    w.add_int16("t.i16", -3)
    w.add_float32("t.f32", 0.5)
    w.add_float64("t.f64", 1.25)
    w.add_bool("t.bool", True)
    w.add_uint64("t.u64", 2**40)
    w.add_token_list([f"tök{i}" for i in range(300)] + ["", "a b"])
    w.add_token_merges(["a b", "ab c"])
    w.add_token_types([1] * 302)
    w.add_token_scores([0.25] * 302)
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((4, 64)).astype(np.float16))
    q8 = rng.standard_normal((8, 64)).astype(np.float32)
    w.add_tensor("q8", quantize(q8, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    if not big_endian:  # K-quant blocks are bytes; the big-endian writer byte-swaps every tensor it is given
        w.add_tensor("q4k", random_kquant_blocks((2, 512), "Q4_K", 1), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.add_tensor("norm", np.ones(7, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _reference(path: Path) -> tuple[dict[str, object], list[tuple[str, str, tuple[int, ...], int, int]]]:
    from gguf import GGUFReader

    r = GGUFReader(path)
    scalars = {k: f.contents() for k, f in r.fields.items() if len(f.types) == 1 and not k.startswith("GGUF.")}
    tensors = [(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.data_offset), int(t.n_bytes))
               for t in r.tensors]
    return scalars, tensors


@pytest.mark.parametrize("alignment", [None, 64])
def test_the_header_matches_the_gguf_packages_reader(tmp_path: Path, alignment: int | None) -> None:
    path = _write(tmp_path / "m.gguf", alignment=alignment)
    scalars, tensors = _reference(path)
    header = read_gguf_header(path)
    assert header.version == 3
    assert [(t.name, t.type_name, t.shape, t.offset, t.nbytes) for t in header.tensors] == tensors
    for key, value in scalars.items():
        assert header.fields[key] == pytest.approx(value) if isinstance(value, float) else header.fields[key] == value
    assert header.text("general.name") == "header test ✓"
    assert header.arrays["tokenizer.ggml.tokens"] == (8, 302)
    assert header.arrays["tokenizer.ggml.merges"] == (8, 2)
    assert header.arrays["tokenizer.ggml.scores"] == (6, 302)
    assert "tokenizer.ggml.tokens" not in header.fields  # array bodies are skipped, not read
    q4k = next(t for t in header.tensors if t.name == "q4k")
    assert q4k.type_name == "Q4_K" and q4k.shape == (512, 2) and q4k.n_elements == 1024 and q4k.nbytes == 1024 // 256 * 144


def test_a_big_endian_file_is_read_through_the_gguf_package(tmp_path: Path) -> None:
    path = _write(tmp_path / "be.gguf", big_endian=True)
    with pytest.raises(GgufHeaderError):
        read_gguf_header(path)
    _, tensors = _reference(path)
    header = gguf_header_of(path)  # the fallback, same shape of answer
    assert [(t.name, t.type_name, t.shape, t.offset, t.nbytes) for t in header.tensors] == tensors
    assert header.text("general.architecture") == "llama"


def test_a_truncated_or_foreign_file_is_named_with_the_usual_cause(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.gguf")
    cut = tmp_path / "partial.gguf"
    cut.write_bytes(path.read_bytes()[:-40])  # the last tensor's bytes are missing
    with pytest.raises(GgufHeaderError, match="past the end"):
        read_gguf_header(cut)
    with pytest.raises(UnsupportedModel, match=r"partial\.gguf") as info:
        gguf_header_of(cut)
    assert "download" in (info.value.hint or "")
    other = tmp_path / "notes.gguf"
    other.write_text("not a model")
    with pytest.raises(UnsupportedModel, match=r"notes\.gguf"):
        gguf_header_of(other)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(UnsupportedModel, match=r"empty\.gguf"):
        gguf_header_of(empty)


def test_the_demo_models_real_gguf_reads_the_same_as_with_the_gguf_package() -> None:
    """SmolLM2-135M-Instruct's Q4_1 file (49k tokens and merges, as llama.cpp wrote it)."""
    from emloc_engine.catalog.demo import find_demo_gguf

    path = find_demo_gguf()
    scalars, tensors = _reference(path)
    header = read_gguf_header(path)
    assert len(tensors) == 272
    assert [(t.name, t.type_name, t.shape, t.offset, t.nbytes) for t in header.tensors] == tensors
    assert {k: header.fields[k] for k in scalars} == scalars
    assert header.arrays["tokenizer.ggml.merges"][1] > 10_000
