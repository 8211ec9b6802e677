"""benchmarks/bench_gguf_stream.py in steps (the GPU benchmark runs as separate calls, each under a time limit):
``--paths write`` writes only the GGUF, and each later step adds its result to the same JSON as it ends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gguf_stream.py"


@pytest.mark.slow
def test_the_steps_accumulate_in_one_json(tmp_path: Path) -> None:
    report = tmp_path / "gguf.json"

    def step(paths: str) -> dict:  # type: ignore[type-arg]
        subprocess.run([sys.executable, str(BENCH), "--work", str(tmp_path / "w"), "--json", str(report), "--tiny",
                        "--device", "cpu", "--paths", paths], check=True, capture_output=True, text=True)
        return json.loads(report.read_text())

    written = step("write")
    assert written["gguf_bytes"] > 0 and "file" in written and "streamed" not in written
    streamed = step("streamed")
    assert streamed["file"] == written["file"]  # the earlier step is kept
    result = streamed["streamed"]
    assert "error" not in result, result.get("error")
    assert 0 < result["peak_rss_gib"] < 4


def test_the_results_section_is_rendered_from_the_recorded_json() -> None:
    sys.path.insert(0, str(BENCH.parent))
    import bench_gguf_stream

    recorded = BENCH.parent / "results" / "gguf-stream-h100-2026-12-06.json"
    report = json.loads(recorded.read_text())
    source = "benchmarks/results/gguf-stream-h100-2026-12-06.json"  # as the render command names it
    text = bench_gguf_stream.render(report, source)
    assert text.startswith(bench_gguf_stream.BEGIN) and text.endswith(bench_gguf_stream.END)
    assert f"| {report['streamed']['total_s']:.0f} s |" in text
    assert f"{report['convert']['peak_rss_gib']:.1f} GiB" in text
    report["convert"]["total_s"] = 2 * report["streamed"]["total_s"]
    assert "2.00× as fast end to end" in bench_gguf_stream.render(report, source)
    # RESULTS.md holds exactly what the recorded JSON renders to
    assert text in (BENCH.parent / "RESULTS.md").read_text()
