"""The VLM GPU benchmark's code path, end to end on a tiny model on the CPU (the lead runs the real shapes)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import bench_vlm


def test_bench_vlm_tiny_runs_every_stage(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "r.json"
    assert bench_vlm.main(["--model", "tiny", "--work", str(tmp_path / "w"), "--device", "cpu", "--samples", "8",
                           "--calib", "4", "--steps", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["stage_peak_gib"]) == {"emulator", "train", "correct", "merge"}
    assert result["planner_ratio"] > 0 and len(result["train_losses"]) == 2
    assert (tmp_path / "w" / "run" / "merged" / "config.json").exists()
