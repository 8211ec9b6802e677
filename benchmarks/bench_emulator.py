"""Benchmark Stage 1 (emulator construction): wall time, peak GPU memory, peak CPU RSS.

Target (issue 3, H200): Llama-3-8B architecture, random bf16 weights in 4 shards, 64 samples × 1024
random tokens, ρ = 0.4: ≤ 60 s wall, peak GPU ≤ half the model's inference peak, CPU RSS ≤ 8 GiB.

    python benchmarks/make_random_model.py --arch llama3-8b --out /tmp/llama3-8b --shards 4
    python benchmarks/bench_emulator.py --model-dir /tmp/llama3-8b --out /tmp/bench-emu
    python benchmarks/bench_emulator.py --model-dir /tmp/llama3-8b --out /tmp/bench-emu --compare-solver randomized
    python benchmarks/bench_emulator.py --tiny          # CPU smoke run on a tiny Llama

Prints one JSON object: wall_s, peak_gpu_gib, peak_cpu_rss_gib, per-phase timings, mean/max relative
whitened error, and (unless --skip-inference) the full model's inference peak on one sample.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emloc_engine.machine.process_memory import RssSampler
from emloc_engine.stages.emulator.builder import EmulatorConfig, build_emulator
from emloc_engine.weights.lowrank import read_emulator_meta


def random_calibration(vocab: int, samples: int, length: int, seed: int = 0) -> tuple[tuple[int, ...], ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(tuple(torch.randint(4, vocab, (length,), generator=g).tolist()) for _ in range(samples))


def build_once(model_dir: Path, out: Path, args: argparse.Namespace, solver: str) -> dict[str, Any]:
    cfg_json = json.loads((model_dir / "config.json").read_text())
    calib = random_calibration(int(cfg_json["vocab_size"]), args.samples, args.length)
    if out.exists():
        shutil.rmtree(out)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    with RssSampler() as rss:
        t0 = time.perf_counter()
        result = build_emulator(EmulatorConfig(model_dir=model_dir, out_dir=out, calibration_ids=calib,
                                               ratio=args.ratio, device=args.device, solver=solver,
                                               chunk_tokens=args.chunk_tokens, allocation=args.allocation,
                                               factor_devices=tuple(f"cuda:{i}" for i in range(1, args.gpus))))
        wall = time.perf_counter() - t0
    meta = read_emulator_meta(out)
    errs = [float(m["rel_error"]) for m in meta["modules"].values()]
    return {"solver": solver, "wall_s": round(wall, 2), "peak_gpu_gib": round(result.peak_vram_gib, 3),
            "peak_cpu_rss_gib": round(rss.peak_bytes / 2**30, 3), "timings_s": meta["build"]["timings_s"],
            "chunk_tokens": result.chunk_tokens, "modules": len(meta["modules"]),
            "spectra_wall_s": (meta.get("spectral_allocation") or {}).get("spectra_wall_s"),
            "dense_modules": len((meta.get("spectral_allocation") or {}).get("dense", ())),
            "params_kept_fraction": round(result.params_kept / result.params_original, 4),
            "rel_error_mean": sum(errs) / len(errs), "rel_error_max": max(errs),
            "errors": {n: float(m["rel_error"]) for n, m in meta["modules"].items()}}


def inference_peak_gib(model_dir: Path, length: int, device: str) -> float | None:
    """Peak allocated GPU memory of loading the full model in bf16 and one forward of ``length`` tokens."""
    if not device.startswith("cuda"):
        return None
    from transformers import AutoModelForCausalLM

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map=device)
    with torch.inference_mode():
        model(torch.randint(4, 200, (1, length), device=device))
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model
    torch.cuda.empty_cache()
    return round(peak, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, help="Model folder (benchmarks/make_random_model.py output).")
    ap.add_argument("--out", type=Path, help="Emulator folder to write (replaced). Default: a temp folder.")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny Llama (no --model-dir needed).")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--solver", default="eigh", choices=("eigh", "randomized"))
    ap.add_argument("--compare-solver", choices=("eigh", "randomized"),
                    help="Build again with this solver and report its error relative to the first.")
    ap.add_argument("--chunk-tokens", type=int, help="Tokens per forward chunk (default: from device memory).")
    ap.add_argument("--linalg-library", choices=("default", "cusolver", "magma"), default="default",
                    help="torch.backends.cuda.preferred_linalg_library for eigh/QR/Cholesky.")
    ap.add_argument("--skip-inference", action="store_true", help="Do not measure the full model's inference peak.")
    ap.add_argument("--allocation", choices=("uniform", "spectral"), default="uniform",
                    help="Per-module ranks: uniform ρ, or spectral (a first streaming pass chooses them).")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs 1..N-1 factorise blocks while GPU 0 runs the next one.")
    args = ap.parse_args()
    if args.linalg_library != "default" and torch.cuda.is_available():
        torch.backends.cuda.preferred_linalg_library(args.linalg_library)
    tmp = Path(tempfile.mkdtemp(prefix="bench-emu-"))
    if args.tiny:
        from tests.tiny_models import build_tiny_model

        args.model_dir = build_tiny_model("llama", tmp / "hub")
        args.samples, args.length, args.device = min(args.samples, 8), min(args.length, 64), "cpu"
    if args.model_dir is None:
        ap.error("--model-dir is required unless --tiny")
    out = args.out or tmp / "emulator"
    report: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "model_dir": str(args.model_dir), "samples": args.samples,
        "length": args.length, "ratio": args.ratio, "linalg_library": args.linalg_library,
        "allocation": args.allocation}
    first = build_once(Path(args.model_dir), out, args, args.solver)
    errors = first.pop("errors")
    report.update(first)
    if args.compare_solver:
        other = build_once(Path(args.model_dir), out.with_name(out.name + "-" + args.compare_solver), args,
                           args.compare_solver)
        other_errors = other.pop("errors")
        ratios = [other_errors[n] / errors[n] for n in errors if errors[n] > 0]
        report["compare"] = {**other, "error_ratio_max": max(ratios), "error_ratio_mean": sum(ratios) / len(ratios)}
    if not args.skip_inference:
        inf = inference_peak_gib(Path(args.model_dir), args.length, args.device)
        report["inference_peak_gib"] = inf
        if inf:
            report["gpu_peak_over_inference"] = round(report["peak_gpu_gib"] / inf, 3)
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
