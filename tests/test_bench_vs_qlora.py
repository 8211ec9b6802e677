"""EMLoC vs QLoRA benchmark on a tiny model (CPU; bitsandbytes' CPU 4-bit kernels): structure and arithmetic."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks import bench_quality as bq
from benchmarks import bench_vs_qlora as bvq
from benchmarks.tasks import shakespeare_task
from tests.test_bench_quality import _text_files
from tests.tiny_models import build_tiny_model


def _fake(seed_recoveries: list[tuple[float, float, float]]) -> dict[str, Any]:
    """A JSON as :func:`bvq.run` writes it, with chosen losses: zero-shot 4, full LoRA 3."""
    seeds = {}
    for i, (emloc, q4, qm) in enumerate(seed_recoveries):
        rec = {"metric": "loss", "higher_is_better": False, "zero_shot": {"loss": 4.0},
               "full_lora": {"loss": 3.0, "train": {"peak_vram_gib": 2.0}},
               "units": [{"variant": bvq.EMLOC_VARIANT, "ratio": 0.5, "auto": {"loss": 4.0 - emloc},
                          "train": {"peak_vram_gib": 1.0}}]}
        seeds[str(i)] = {"matched_ratio": None, "emloc_ratio": 0.5, "emloc_ratio_from": "planner",
                         "emloc": {"planner": {"ratio": 0.5}, "tasks": {"t": rec}},
                         "qlora": {"t": {"on_4bit": {"loss": 4.0 - q4}, "merged": {"loss": 4.0 - qm},
                                         "train": {"peak_vram_gib": None}}}}
    return {"date": "2026-12-04", "device": "CPU", "model_name": "m", "command": "python x",
            "qlora_recipe": bvq.qlora_recipe(bq.torch.device("cpu")), "seeds": seeds}


def test_summary_mean_and_spread_over_seeds(tmp_path: Path) -> None:
    data = _fake([(0.8, 0.6, 0.5), (0.9, 0.7, 0.6), (0.7, 0.5, 0.4)])
    summ = bvq.summary(data)["t"]
    mean, sd, n = summ["EMLoC, planner's ρ"]["recovered"]
    assert n == 3 and mean == pytest.approx(0.8) and sd == pytest.approx(0.1)
    assert summ["QLoRA, adapter on 4-bit base"]["recovered"][0] == pytest.approx(0.6)
    assert summ["QLoRA, adapter on bf16 original"]["recovered"][0] == pytest.approx(0.5)
    text = bvq.render(data)
    assert "EMLoC keeps 80% ± 10 of what full LoRA gains; QLoRA keeps 60% ± 10" in text and "EMLoC ahead" in text
    assert "n/a (no GPU)" in text  # QLoRA's peak is not measured on a CPU: never invented
    worse = bvq.render(_fake([(0.2, 0.6, 0.5)]))
    assert "QLoRA ahead" in worse  # a loss is said plainly
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\n## Scale\n\nold table\n")
    bvq.write_section(md, text)
    bvq.write_section(md, text)
    body = md.read_text()
    assert body.count(bvq.SECTION) == 1 and body.index(bvq.SECTION) < body.index("## Scale") and "old table" in body


@pytest.mark.slow
def test_qlora_and_emloc_rows_from_real_runs(tmp_path: Path) -> None:
    # width 64, not the tiny default 32: bitsandbytes 0.50.2 repacks 4-bit weights for CPUs with AVX512-BF16
    # at inference and fails on a layer narrower than its 64-element block ("shape '[32, 0]' is invalid"),
    # so the default width passed on some machines and failed on others
    model_dir = build_tiny_model("llama", tmp_path / "hub", hidden_size=64, intermediate_size=128)
    train, test = _text_files(tmp_path)
    settings = bq.BenchSettings(calib_samples=4, max_length=32, steps=3, batch_size=2, warmup_steps=0,
                                device="cpu", eval_batch_size=4, lr=5e-3)
    out = tmp_path / "vs.json"
    data = bvq.run(settings, [0, 1], model_dir, [], tmp_path / "work", out, "python bench", log=lambda _: None,
                   make_tasks=lambda seed: [shakespeare_task(train, test, max_length=32)], ratio=0.5)
    saved = json.loads(out.read_text())
    assert set(saved["seeds"]) == {"0", "1"} and saved["qlora_recipe"]["quant_type"] == "nf4"
    for seed_data in saved["seeds"].values():
        q = seed_data["qlora"]["shakespeare"]
        assert math.isfinite(q["on_4bit"]["loss"]) and math.isfinite(q["merged"]["loss"])
        # the 4-bit base is not the original: the same adapter scores differently on the two
        assert q["on_4bit"]["loss"] != pytest.approx(q["merged"]["loss"], abs=1e-6)
        assert (Path(q["train"]["adapter_dir"]) / "adapter_config.json").is_file()
        rec = seed_data["emloc"]["tasks"]["shakespeare"]
        assert [u["variant"] for u in rec["units"]] == [bvq.EMLOC_VARIANT]
    # the two seeds are different runs of the same recipe
    a, b = (saved["seeds"][s]["qlora"]["shakespeare"]["on_4bit"]["loss"] for s in ("0", "1"))
    assert a != b
    summ = bvq.summary(data)["shakespeare"]
    assert summ["EMLoC, given ρ"]["recovered"][2] == 2 and summ["EMLoC, given ρ"]["ratio"][0] == 0.5
    assert summ["QLoRA, adapter on 4-bit base"]["recovered"][2] == 2
    rec0 = saved["seeds"]["0"]["emloc"]["tasks"]["shakespeare"]
    expected = bq.recovered(rec0, saved["seeds"]["0"]["qlora"]["shakespeare"]["merged"])
    rec1 = saved["seeds"]["1"]["emloc"]["tasks"]["shakespeare"]
    expected1 = bq.recovered(rec1, saved["seeds"]["1"]["qlora"]["shakespeare"]["merged"])
    assert summ["QLoRA, adapter on bf16 original"]["recovered"][0] == pytest.approx((expected + expected1) / 2)


def test_merge_unites_runs_split_by_seed_and_task() -> None:
    a, b = _fake([(0.8, 0.6, 0.5), (0.9, 0.7, 0.6)]), _fake([(0.7, 0.5, 0.4)])
    # b ran task "u" for seed 0 with its own matched ρ; a ran task "t" for seeds 0 and 1
    sd = b["seeds"]["0"]
    sd["emloc"]["tasks"] = {"u": sd["emloc"]["tasks"]["t"]}
    sd["qlora"] = {"u": sd["qlora"]["t"]}
    sd["matched_ratio"] = 0.5
    b["command"] = "python y"
    merged = bvq.merge([a, b])
    assert set(merged["seeds"]) == {"0", "1"} and merged["command"] == "python x ; python y"
    assert set(merged["seeds"]["0"]["emloc"]["tasks"]) == {"t", "u"}
    assert merged["seeds"]["0"]["matched_by_task"] == {"t": None, "u": 0.5}
    summ = bvq.summary(merged)
    assert summ["t"]["EMLoC, planner's ρ"]["recovered"][2] == 2
    assert summ["u"]["EMLoC, planner's ρ for QLoRA's peak"]["recovered"][0] == pytest.approx(0.7)  # u's own matched ρ
    with pytest.raises(ValueError, match="seed 0, task t appears in two runs"):
        bvq.merge([a, a])
    other = _fake([(0.1, 0.1, 0.1)])
    other["model_name"] = "other"
    with pytest.raises(ValueError, match="different model_name"):
        bvq.merge([a, other])


def test_headline_compares_at_no_more_than_qlora_measured_memory() -> None:
    data = _fake([(0.7, 0.8, 0.8)])
    sd = data["seeds"]["0"]
    rec = sd["emloc"]["tasks"]["t"]
    # planner's ρ 0.5 used 0.57 GiB; the planner's "QLoRA's memory" ρ 0.05 only 0.48 GiB; QLoRA measured 0.68 GiB
    rec["units"][0]["train"]["peak_vram_gib"] = 0.57
    rec["units"].append({"variant": bvq.EMLOC_VARIANT, "ratio": 0.05, "auto": {"loss": 3.9},
                         "train": {"peak_vram_gib": 0.48}})
    sd["matched_ratio"] = 0.05
    sd["qlora"]["t"]["train"]["peak_vram_gib"] = 0.68
    text = bvq.headline(bvq.summary(data))
    # the closer-memory row (planner's ρ, 70%) is the one compared, and the memory gap is said
    assert "at less GPU memory (EMLoC 0.57 GiB at ρ 0.50, QLoRA 0.68 GiB)" in text
    assert "EMLoC keeps 70%" in text and "QLoRA ahead" in text


def _quality_run(seed: int, full: float, emloc: float, peak: float) -> dict[str, Any]:
    """A bench_quality.py JSON of one seed on the formats task: zero-shot exact match 0.5."""
    rec = {"metric": "exact_match", "higher_is_better": True, "zero_shot": {"exact_match": 0.5},
           "full_lora": {"exact_match": full, "train": {"peak_vram_gib": 0.7}},
           "units": [{"variant": bvq.EMLOC_VARIANT, "ratio": 0.9, "auto": {"exact_match": emloc},
                      "train": {"peak_vram_gib": peak}}]}
    return {"date": "2026-12-07", "device": "NVIDIA H100", "command": f"python bq --seed {seed}",
            "settings": {"seed": seed}, "tasks": {"t": rec}}


def test_a_measured_run_at_qlora_memory_is_the_row_compared() -> None:
    """The planner's ρ for QLoRA's peak used far less memory than QLoRA (0.48 vs 0.68 GiB); runs at a ρ whose
    measured peak is QLoRA's are compared instead, each seed against its own full LoRA, and where they ran on
    another GPU than QLoRA the headline says so."""
    data = _fake([(0.7, 0.8, 0.8), (0.7, 0.8, 0.8)])
    for sd in data["seeds"].values():
        sd["emloc"]["tasks"]["t"]["units"][0]["train"]["peak_vram_gib"] = 0.57
        sd["qlora"]["t"]["train"]["peak_vram_gib"] = 0.68
    # seed 0: full LoRA +0.3, EMLoC +0.3 (100%); seed 1: full LoRA +0.2, EMLoC +0.16 (80%)
    measured = [_quality_run(0, 0.8, 0.8, 0.65), _quality_run(1, 0.7, 0.66, 0.65)]
    summ = bvq.summary(data, measured)["t"]
    mean, sd, n = summ[bvq.MEASURED_ROW]["recovered"]
    assert n == 2 and mean == pytest.approx(0.9) and sd == pytest.approx(math.sqrt(0.02))
    text = bvq.render(data, measured, ["benchmarks/results/a.json"])
    assert ("at the same GPU memory (EMLoC 0.65 GiB at ρ 0.90, QLoRA 0.68 GiB), EMLoC's row measured on "
            "NVIDIA H100, QLoRA's on CPU: EMLoC keeps 90% ± 14") in text and "EMLoC ahead" in text
    assert "`python bq --seed 0` ; `python bq --seed 1`" in text and "`benchmarks/results/a.json`" in text
    # too much memory (over QLoRA's peak + 5%) is never the row compared
    heavy = [_quality_run(0, 0.8, 0.8, 0.9)]
    assert "at less GPU memory (EMLoC 0.57 GiB" in bvq.render(data, heavy)


def test_a_measured_file_that_is_not_a_quality_run_is_named(tmp_path: Path) -> None:
    data = tmp_path / "vs.json"
    data.write_text(json.dumps(_fake([(0.7, 0.8, 0.8)])))
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n")
    for bad, says in ((tmp_path / "absent.json", "cannot be read as JSON"),
                      (data, "not a bench_quality.py result")):  # a vs-qlora JSON where a quality run belongs
        with pytest.raises(SystemExit, match=f"--measured {bad}: {says}.*bench_quality.py --json"):
            bvq.main(["--render", str(data), "--measured", str(bad), "--results-md", str(md)])
        assert md.read_text() == "# Benchmark results\n"  # nothing written
    good = tmp_path / "q.json"
    good.write_text(json.dumps(_quality_run(0, 0.8, 0.8, 0.65)))
    assert bvq.main(["--render", str(data), "--measured", str(good), "--results-md", str(md)]) == 0
    assert bvq.MEASURED_ROW in md.read_text()
