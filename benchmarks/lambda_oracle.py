"""How much λ chosen on the task's own metric could give (issue 20): from a ``bench_vs_qlora.py`` result JSON,
every EMLoC unit's fraction of the full-LoRA gain with λ auto (chosen on validation loss, what the engine
does) against the best λ of the grid picked on the TEST metric itself, an upper bound for any rule that
chooses λ (on validation exact match, or otherwise). No run: it reads the recorded per-λ test scores.

    python benchmarks/lambda_oracle.py benchmarks/results/vs-qlora-h200-2026-12-05.json
    python benchmarks/lambda_oracle.py quality-seed0.json quality-seed1.json   # bench_quality runs, pooled
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def as_seeds(data: dict[str, Any]) -> dict[str, Any]:
    """``bench_vs_qlora.py``'s ``{"seeds": {seed: {"emloc": run}}}``; a ``bench_quality.py`` run (one seed) is
    put in that shape."""
    if "seeds" in data:
        return data
    return {"seeds": {str(data["settings"]["seed"]): {"emloc": data}}}


def oracle_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, ρ): per seed the auto fraction, the oracle fraction and the oracle's λ (percent)."""
    rows: dict[tuple[str, float], dict[str, Any]] = {}
    for seed, sd in sorted(as_seeds(data)["seeds"].items()):
        for task, t in sd["emloc"]["tasks"].items():
            metric, higher = t["metric"], t["higher_is_better"]
            zero, full = t["zero_shot"][metric], t["full_lora"][metric]

            def frac(v: float, zero: float = zero, full: float = full) -> float:
                return 100 * (v - zero) / (full - zero)

            for u in t["units"]:
                table = {lam: s[metric] for lam, s in u["lambda"].items()}
                best = (max if higher else min)(table, key=lambda lam: table[lam])
                row = rows.setdefault((task, u["ratio"]), {"task": task, "metric": metric, "ratio": u["ratio"],
                                                           "seeds": []})
                row["seeds"].append({"seed": seed, "auto": frac(u["auto"][metric]), "auto_lambda": u["auto"]["lambda"],
                                     "oracle": frac(table[best]), "oracle_lambda": best,
                                     "peak_gib": u.get("train", {}).get("peak_vram_gib")})
    return list(rows.values())


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _peak(seeds: list[dict[str, Any]]) -> str:
    """The measured training peak (``max_memory_allocated``, GiB) over seeds; "—" where none was measured (CPU)."""
    peaks = [s["peak_gib"] for s in seeds if s.get("peak_gib") is not None]
    if not peaks:
        return "—"
    return f"{statistics.mean(peaks):.3f} GiB" + (f" ± {_sd(peaks):.3f}" if len(peaks) > 1 else "")


def render(rows: list[dict[str, Any]]) -> str:
    out = ["| task | ρ | λ auto (validation loss) | best λ on the test metric (upper bound) | oracle's λ per seed "
           "| training peak |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        a = [s["auto"] for s in r["seeds"]]
        o = [s["oracle"] for s in r["seeds"]]
        out.append(f"| {r['task']} ({r['metric']}) | {r['ratio']:g} | {statistics.mean(a):.0f}% ± {_sd(a):.0f} | "
                   f"{statistics.mean(o):.0f}% ± {_sd(o):.0f} | {', '.join(s['oracle_lambda'] for s in r['seeds'])} | "
                   f"{_peak(r['seeds'])} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, nargs="+",
                    help="bench_vs_qlora.py JSONs, or bench_quality.py JSONs of one seed each (pooled)")
    args = ap.parse_args(argv)
    pooled: dict[str, Any] = {"seeds": {}}
    for path in args.results:
        for seed, sd in as_seeds(json.loads(path.read_text()))["seeds"].items():
            pooled["seeds"].setdefault(seed, {"emloc": {"tasks": {}}})["emloc"]["tasks"].update(sd["emloc"]["tasks"])
    print(render(oracle_rows(pooled)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
