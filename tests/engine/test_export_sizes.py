"""Predicted export sizes match the files written (exact types), K-quants are estimated from bits per weight."""

from __future__ import annotations

from pathlib import Path

import pytest

from emloc_engine.stages.export.adapter_gguf import AdapterGgufConfig, export_adapter_gguf
from emloc_engine.stages.export.gguf_export import GgufConfig, export_gguf
from emloc_engine.stages.export.sizes import (
    adapter_gguf_bytes,
    gguf_bytes,
    human_bytes,
    predicted_export_bytes,
)
from tests.engine.export_helpers import make_adapter


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "q4_0", "q5_1", "f32"])
def test_gguf_size_is_predicted_within_three_percent(tiny_cache: Path, tmp_path: Path, gguf_type: str) -> None:
    snap = next((tiny_cache / "models--emloc-test--tiny-llama" / "snapshots").iterdir())
    res = export_gguf(GgufConfig(snap, tmp_path / "m.gguf", gguf_type))
    assert abs(gguf_bytes(snap, gguf_type) - res.file_bytes) <= 0.03 * res.file_bytes


def test_adapter_and_ordering(tiny_llama: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tiny_llama, tmp_path / "a")
    res = export_adapter_gguf(AdapterGgufConfig(adapter, tiny_llama, tmp_path / "a.gguf"))
    assert abs(adapter_gguf_bytes(adapter) - res.file_bytes) <= 0.05 * res.file_bytes
    sizes = [gguf_bytes(tiny_llama, t) for t in ("f32", "f16", "q8_0", "q6_k", "q4_k_m", "q4_0")]
    assert sizes == sorted(sizes, reverse=True)
    assert predicted_export_bytes("adapter-gguf", tiny_llama, adapter) == adapter_gguf_bytes(adapter)
    assert predicted_export_bytes("ollama", tiny_llama, adapter, "q4_0") == gguf_bytes(tiny_llama, "q4_0")
    assert human_bytes(4_920_000_000) == "4.92 GB" and human_bytes(12) == "12 B"
