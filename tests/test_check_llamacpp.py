"""The llama.cpp check's RESULTS.md section is made from the recorded JSON (llama.cpp itself is optional)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import check_llamacpp

RECORDED = (
    Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "llamacpp-check-cpu-2026-12-05.json"
)


def test_section_has_one_row_per_recorded_measurement() -> None:
    result = json.loads(RECORDED.read_text())
    text = check_llamacpp.render(result, "r.json", "2026-12-05")
    assert text.startswith(check_llamacpp.BEGIN) and text.endswith(check_llamacpp.END)
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert len(rows) == len(result["rows"])
    first = result["rows"][0]
    assert f"| {first['model']} | {first['file']} | {100 * first['rel_err']:.2g} %" in rows[0]


def test_recorded_files_agree_with_what_the_issue_claims() -> None:
    """The recorded run: every merged f32 file within 0.5 % and every adapter effect cosine above 0.9999."""
    rows = json.loads(RECORDED.read_text())["rows"]
    f32 = [r for r in rows if r["file"] == "model.gguf (f32)"]
    adapters = [r for r in rows if "effect_cosine" in r and "Q4_1" not in r["file"]]
    assert len(f32) == 5 and all(r["rel_err"] < 5e-3 for r in f32)
    assert adapters and all(r["effect_cosine"] > 0.9999 for r in adapters)
