"""Multi-GPU Stage 2 benchmark: data-parallel LoRA training on N GPUs against one GPU.

Trains the same emulator on the same global batches (``batch × grad_accum`` sequences per
optimizer step) with 1 process and with N processes (``emloc_engine.stages.training.distributed``: one per GPU,
NCCL, summed LoRA gradients), and reports per configuration: median tokens/s of the steps after
``--warmup`` (global throughput, rank 0's step time), wall time including process start and
emulator loading, the largest GPU peak, the final loss, and the largest difference of the adapter
from the 1-process adapter (bf16 autocast: not bit-equal, should be ~1e-3 of the weights or less).
The speed-up is tokens/s over the 1-process tokens/s.

The emulator has RANDOM factors of the builder's exact shapes (speed does not depend on the
values), written from ``--model-dir`` or from a random model of ``--arch`` (default Llama-3-8B's
shapes, ~16 GB written to ``--work-dir`` first). Results are printed as one JSON object; paste
the summary into ``benchmarks/RESULTS.md``.

    python benchmarks/bench_distributed.py --gpus 1 2                      # 2-GPU host, Llama-3-8B shapes
    python benchmarks/bench_distributed.py --model-dir /tmp/llama3-8b --gpus 1 2 4
    python benchmarks/bench_distributed.py --tiny                          # CPU smoke test (gloo, 1 vs 2)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_training import _examples, write_random_emulator
from emloc_engine.core.errors import InsufficientMemory
from emloc_engine.core.progress import RecordingProgress
from emloc_engine.weights.headers import load_config


def bench(emulator_dir: Path, run_dir: Path, gpus: int, args: argparse.Namespace, data: list[Any]) -> dict[str, Any]:
    from emloc_engine.data import DataConfig
    from emloc_engine.stages.training.distributed import ParallelConfig, train_examples_distributed
    from emloc_engine.stages.training.trainer import TrainConfig

    cfg = TrainConfig(run_dir=run_dir, data=DataConfig(path=run_dir / "none.jsonl"), emulator_dir=emulator_dir,
                      rank=args.rank, alpha=2.0 * args.rank, dropout=0.0, steps=args.warmup + args.steps, lr=1e-4,
                      batch_size=args.batch, grad_accum=args.grad_accum, warmup_steps=0, eval_every=0,
                      save_every=0, grad_checkpointing=True, device=args.device, resume=False)
    parallel = ParallelConfig(processes=gpus, threads_per_process=1 if args.tiny else 0)
    rates = RecordingProgress()
    t0 = time.perf_counter()
    try:
        result = train_examples_distributed(cfg, parallel, data, [], rates)
    except InsufficientMemory as exc:
        return {"gpus": gpus, "oom": True, "message": exc.summary}
    measured = rates.values("train/tokens_per_s")[args.warmup:] or rates.values("train/tokens_per_s")
    return {"gpus": gpus, "tokens_per_s": round(statistics.median(measured), 1),
            "step_s": round(args.batch * args.grad_accum * args.seq / statistics.median(measured), 3),
            "wall_s": round(time.perf_counter() - t0, 1), "peak_gib": round(result.peak_vram_gib, 3),
            "final_loss": round(result.loss_history[-1][1], 5), "adapter": str(result.adapter_dir)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, help="Original model folder (default: a random --arch model).")
    ap.add_argument("--arch", default="llama3-8b", help="Preset of make_random_model.py when --model-dir is absent.")
    ap.add_argument("--gpus", type=int, nargs="+", default=None, help="Process counts (default 1 2).")
    ap.add_argument("--ratio", type=float, default=0.4, help="Keep-ratio of the random emulator.")
    ap.add_argument("--batch", type=int, default=None, help="Sequences per micro-batch (default 8; tiny 2).")
    ap.add_argument("--grad-accum", type=int, default=2, help="Micro-batches per optimizer step.")
    ap.add_argument("--seq", type=int, default=None, help="Sequence length (default 1024; tiny 32).")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6, help="Measured steps.")
    ap.add_argument("--warmup", type=int, default=2, help="Unmeasured first steps.")
    ap.add_argument("--device", default="auto", help="auto/cuda (GPUs) or cpu (gloo processes).")
    ap.add_argument("--work-dir", type=Path, help="Where the model/emulator/runs go (default: a temp folder).")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny Llama built on the fly.")
    args = ap.parse_args(argv)
    args.seq = args.seq or (32 if args.tiny else 1024)
    args.batch = args.batch or (2 if args.tiny else 8)
    args.gpus = args.gpus or [1, 2]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="emloc-bench-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    if args.tiny:
        from tests.tiny_models import build_tiny_model

        args.model_dir = build_tiny_model("llama", work / "hub")
        args.device = "cpu"
    elif args.model_dir is None:
        from benchmarks.make_random_model import make

        args.model_dir = work / args.arch
        if not (args.model_dir / "config.json").exists():
            print(json.dumps({"random_model": make(args.arch, args.model_dir, shards=4)}), file=sys.stderr, flush=True)
    on_gpu = args.device != "cpu" and torch.cuda.is_available()
    emulator = write_random_emulator(args.model_dir, work / f"emulator-{args.ratio:g}", args.ratio,
                                     "cuda" if on_gpu else "cpu")
    vocab = int(load_config(args.model_dir)["vocab_size"])
    steps = args.warmup + args.steps
    data = _examples(vocab, args.seq, args.batch * args.grad_accum * steps)
    runs = []
    for n in args.gpus:
        runs.append(bench(emulator, work / f"run-{n}", n, args, data))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    base = next((r for r in runs if r["gpus"] == 1 and not r.get("oom")), None)
    if base is not None:
        ref = load_file(str(Path(base["adapter"]) / "adapter_model.safetensors"))
        scale = max(float(t.abs().max()) for t in ref.values())
        for r in runs:
            if r is base or r.get("oom"):
                continue
            other = load_file(str(Path(r["adapter"]) / "adapter_model.safetensors"))
            r["speedup"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
            r["adapter_max_abs_diff"] = float(max((other[k] - ref[k]).abs().max() for k in ref))
            r["adapter_max_abs"] = scale
    report = {
        "model_dir": str(args.model_dir), "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu", "visible_gpus": torch.cuda.device_count(),
        "settings": {"ratio": args.ratio, "batch": args.batch, "grad_accum": args.grad_accum, "seq": args.seq,
                     "rank": args.rank, "measured_steps": args.steps, "warmup_steps": args.warmup,
                     "dtype": "bf16" if on_gpu else "fp32", "grad_checkpointing": True},
        "runs": runs, "wall_s": round(time.perf_counter() - t_all, 1),
    }
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return report


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
