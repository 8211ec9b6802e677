"""benchmarks/lambda_oracle.py: λ auto against the best λ on the test metric, from recorded per-λ scores."""

from __future__ import annotations

from typing import Any

from benchmarks import lambda_oracle


def _seed(auto: float, auto_lam: str, table: dict[str, float]) -> dict[str, Any]:
    unit = {"ratio": 0.5, "auto": {"lambda": auto_lam, "exact_match": auto},
            "lambda": {k: {"exact_match": v} for k, v in table.items()}}
    task = {"metric": "exact_match", "higher_is_better": True, "zero_shot": {"exact_match": 0.2},
            "full_lora": {"exact_match": 0.6}, "units": [unit]}
    return {"emloc": {"tasks": {"formats": task}}}


def test_the_oracle_is_the_best_test_score_and_auto_is_what_was_chosen() -> None:
    data = {"seeds": {"0": _seed(0.4, "0", {"0": 0.4, "1": 0.5, "inf": 0.3}),
                      "1": _seed(0.5, "1", {"0": 0.45, "1": 0.5, "inf": 0.2})}}
    (row,) = lambda_oracle.oracle_rows(data)
    assert [round(s["auto"]) for s in row["seeds"]] == [50, 75]
    assert [round(s["oracle"]) for s in row["seeds"]] == [75, 75]
    assert [s["oracle_lambda"] for s in row["seeds"]] == ["1", "1"]
    assert "| formats (exact_match) | 0.5 | 62% ± 18 | 75% ± 0 | 1, 1 | — |" in lambda_oracle.render([row])


def test_the_measured_training_peak_is_shown_beside_the_fractions() -> None:
    seeds = {}
    for seed, peak in (("0", 0.64), ("1", 0.66)):
        seeds[seed] = _seed(0.4, "0", {"0": 0.4, "1": 0.3})
        seeds[seed]["emloc"]["tasks"]["formats"]["units"][0]["train"] = {"peak_vram_gib": peak}
    (row,) = lambda_oracle.oracle_rows({"seeds": seeds})
    assert lambda_oracle.render([row]).endswith("| 0, 0 | 0.650 GiB ± 0.014 |")


def test_bench_quality_runs_of_one_seed_each_are_pooled(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    paths = []
    for seed, auto in (("0", 0.4), ("1", 0.5)):
        run = _seed(auto, "0", {"0": auto, "1": 0.3})["emloc"] | {"settings": {"seed": int(seed)}}
        paths.append(tmp_path / f"q{seed}.json")
        paths[-1].write_text(json.dumps(run))
    assert lambda_oracle.main([str(p) for p in paths]) == 0
    assert "| formats (exact_match) | 0.5 | 62% ± 18 | 62% ± 18 | 0, 0 |" in capsys.readouterr().out
