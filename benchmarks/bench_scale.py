"""Scale benchmark: every stage of ``emloc run`` on a large random-weight model, on one GPU.

Creates nothing itself: give it a model folder from ``make_random_model.py``. It measures the
original model's inference peak (the budget EMLoC promises to stay under), then runs the SAME
pipeline as ``emloc run`` (emulator → training → correction with λ auto → merge export), and
reports per stage: wall time, peak GPU memory (measured by the stage, torch allocator), the
planner's prediction, and peak CPU RSS (sampled every 50 ms): ``peak_rss_gib`` the whole RSS (page cache of
the memory-mapped shards included), ``peak_anon_rss_gib`` without file-backed pages (what the RAM plan
counts, ``emloc_engine.machine.process_memory``). Prints one JSON object.

    python benchmarks/make_random_model.py --arch llama3-8b --out /tmp/l8b
    python benchmarks/bench_scale.py --model-dir /tmp/l8b --work /tmp/scale --steps 20
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emloc_engine.data.config import DataConfig
from emloc_engine.machine.process_memory import resident_memory
from emloc_engine.run.config import RunConfig
from emloc_engine.run.manifest import read_manifest
from emloc_engine.run.orchestrator import SLICES, run_stages
from emloc_engine.run.plan import plan_run
from emloc_engine.stages.export.options import ExportOptions
from emloc_engine.stages.training.options import TrainOptions

WORDS = ["thou", "art", "the", "king", "of", "france", "and", "I", "am", "but", "a", "poor", "player", "upon", "this", "stage", "who", "struts", "and", "frets", "his", "hour", "then", "is", "heard", "no", "more", "it", "is", "a", "tale", "told", "by", "an", "idiot", "full", "of", "sound", "and", "fury"]


class StageMeter:
    """A Progress that knows which stage is running (from the pipeline's bar slices) and samples RSS: per stage
    the peak whole RSS (``rss``, GiB) and the peak without file-backed pages (``anon``, GiB)."""

    def __init__(self) -> None:
        self.stage = "setup"
        self.t_start: dict[str, float] = {"setup": time.monotonic()}
        self.rss: dict[str, float] = {}
        self.anon: dict[str, float] = {}
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            now, stage = resident_memory(), self.stage
            self.rss[stage] = max(self.rss.get(stage, 0.0), now.total / 2**30)
            self.anon[stage] = max(self.anon.get(stage, 0.0), now.anon / 2**30)

    def update(self, fraction: float, message: str = "") -> None:
        for name, (a, b) in SLICES.items():
            if a <= fraction < b or (name == "export" and fraction >= a):
                if name != self.stage and fraction > a - 1e-9 and fraction < b:
                    self.stage = name
                    self.t_start.setdefault(name, time.monotonic())
                break
        if message and (not self.messages or self.messages[-1] != message):
            self.messages.append(message)

    def log(self, name: str, value: float, step: int) -> None:
        pass

    def check_cancelled(self) -> None:
        pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def inference_peak(model_dir: Path, ctx: int) -> float:
    from transformers import AutoModelForCausalLM

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda")
    ids = torch.randint(5, 250, (1, ctx), device="cuda")
    with torch.no_grad():
        m.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del m
    torch.cuda.empty_cache()
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--ratio", type=float, default=None, help="Default: the planner's choice.")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--exports", default="merged,adapter")
    ap.add_argument("--samples", type=int, default=400, help="Synthetic training texts.")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    data = args.work / "data.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for _ in range(args.samples):
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 260)))}) + "\n")
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                           "model_dir": str(args.model_dir), "steps": args.steps, "max_length": args.max_length}
    out["inference_peak_gib"] = inference_peak(args.model_dir, args.max_length)
    meter = StageMeter()
    run_dir = args.work / "run"
    t0 = time.monotonic()
    try:
        cfg = RunConfig(model_dir=args.model_dir, data=DataConfig(path=data, max_length=args.max_length),
                        run_dir=run_dir, ratio=args.ratio, device="cuda",
                        train=TrainOptions(steps=args.steps, batch_size=args.batch_size),
                        export=ExportOptions(formats=tuple(e for e in args.exports.split(",") if e)))
        result = run_stages(plan_run(cfg), meter)
    finally:
        meter.close()
    out["total_s"] = time.monotonic() - t0
    out["ratio"] = result.ratio
    out["lambda"] = result.lambda_
    manifest = read_manifest(run_dir)
    assert manifest is not None
    plan = manifest.plan or {}
    out["plan"] = {k: plan.get(k) for k in ("budget_note", "budget_gib", "inference_peak_gib", "full_lora_peak_gib",
                                             "predicted_peaks_gib", "est_seconds")}
    stages: dict[str, Any] = {}
    names = [n for n in ("emulator", "train", "correct", "export") if n in manifest.stages]
    for name in names:
        rec = manifest.stages[name]
        res = rec.result
        stages[name] = {
            "wall_s": res.get("wall_s"),
            "measured_peak_gib": rec.measured_peak_gib,
            "predicted_peak_gib": rec.predicted_peak_gib,
            "peak_rss_gib": meter.rss.get(name),
            "peak_anon_rss_gib": meter.anon.get(name),
            "under_inference_peak": (rec.measured_peak_gib or 0.0) <= out["inference_peak_gib"],
        }
        for key in ("tokens_per_s", "final_eval_loss", "correction_s", "eval_s", "merge_s", "peak_rss_gib",
                    "peak_anon_rss_gib", "lambda_table", "lambda_"):
            if key in res:
                stages[name][key] = res[key]
    out["stages"] = stages
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
