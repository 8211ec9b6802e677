"""Stage 2 benchmark: peak GPU memory and tokens/s of LoRA training on emulators vs the full model.

For each keep-ratio ρ (default 0.25, 0.4, 0.6) an emulator of ``--model-dir`` is written with
RANDOM low-rank factors of the exact shapes the builder would produce (``k = floor(ρ·out·in/(out+in))``
for every linear layer of the blocks; embeddings, norms and lm_head copied from the model). Speed
and memory do not depend on the values, and this takes seconds instead of an activation-aware SVD
of 8B parameters. ``--emulator-dir`` uses real emulators instead (``NAME=DIR``, repeatable).

Every configuration runs the engine's own training loop (``emloc_engine.stages.training.trainer.train_on_examples``)
with the same settings: sequence length ``--seq`` (1024), every token a label, gradient
checkpointing, bf16 weights and autocast on CUDA (fp32 on CPU), LoRA r=16 on every linear layer of
the blocks, AdamW. "full" is peft LoRA on the ORIGINAL model through the same loop (an emulator
folder with no compressed module, linking the model's shards). Each is measured at batch 1 and at
``--big-batch``. Tokens/s is the median of the per-step rate after ``--warmup`` steps. The full
model's inference peak (load + prefill of ``--seq`` tokens, logits of the last token only, as
``generate`` does) is measured too, so the acceptance target "training peak ≤ inference peak" can
be read off directly. Results are printed as one JSON object.

    python benchmarks/bench_training.py --model-dir /tmp/llama3-8b            # GPU
    python benchmarks/bench_training.py --tiny                                # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emloc_engine.core.architectures import arch_spec, num_blocks
from emloc_engine.core.errors import InsufficientMemory
from emloc_engine.core.progress import RecordingProgress
from emloc_engine.core.ranks import rank_for_ratio
from emloc_engine.weights.checkpoint import Checkpoint
from emloc_engine.weights.headers import load_config
from emloc_engine.weights.lowrank import (
    EMULATOR_FORMAT,
    EMULATOR_FORMAT_VERSION,
    EMULATOR_META,
)

GIB = 2**30


def _meta(model_dir: Path, modules: dict[str, Any], method: str) -> dict[str, Any]:
    return {"format": EMULATOR_FORMAT, "format_version": EMULATOR_FORMAT_VERSION, "engine_version": "bench",
            "source_model": {"path": str(model_dir), "revision": model_dir.name, "fingerprint": "bench"},
            "method": method, "calibration": {"samples": 0, "tokens": 0, "fingerprint": None}, "modules": modules}


def _copy_side_files(model_dir: Path, out: Path) -> None:
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            shutil.copy(f, out / f.name)


def write_random_emulator(model_dir: Path, out: Path, ratio: float, device: str, blocks_per_shard: int = 4) -> Path:
    """An emulator folder with random ``u``/``v`` of the builder's shapes (values are irrelevant to speed)."""
    out.mkdir(parents=True, exist_ok=True)
    config = load_config(model_dir)
    spec, ckpt = arch_spec(config), Checkpoint(model_dir)
    n_blocks = num_blocks(config)
    compressed = {spec.module_name(b, m) for b in range(n_blocks) for m in spec.linear_modules}
    gen = torch.Generator(device=device).manual_seed(0)
    modules: dict[str, Any] = {}
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(math.ceil(n_blocks / blocks_per_shard) + 1)]
    for name in ckpt.names():
        module, _, leaf = name.rpartition(".")
        info = ckpt.info(name)
        if module in compressed and leaf == "weight":
            out_f, in_f = info.shape
            k = min(rank_for_ratio(ratio, out_f, in_f), out_f, in_f)
            dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(info.dtype, torch.float32)
            block = int(module.split(".")[len(spec.block_prefix.split("."))])
            shard = shards[block // blocks_per_shard]
            # Entries of u·v get std ≈ 1/√in, like a trained W (only finiteness matters for the timing).
            shard[f"{module}.u.weight"] = (torch.randn(out_f, k, generator=gen, device=device) / k**0.5).to(dtype).cpu()
            shard[f"{module}.v.weight"] = (torch.randn(k, in_f, generator=gen, device=device) / in_f**0.5).to(dtype).cpu()
            has_bias = f"{module}.bias" in ckpt
            if has_bias:
                shard[f"{module}.u.bias"] = ckpt.get(f"{module}.bias")
            modules[module] = {"ratio": ratio, "rank": k, "in_features": in_f, "out_features": out_f, "bias": has_bias}
        elif not (module in compressed and leaf == "bias"):
            shards[-1][name] = ckpt.get(name)
    for i, tensors in enumerate(shards):
        if tensors:
            save_file(tensors, str(out / f"emulator-{i:05d}.safetensors"), metadata={"format": "pt"})
    _copy_side_files(model_dir, out)
    (out / EMULATOR_META).write_text(json.dumps(_meta(model_dir, modules, "random factors (benchmark)"), indent=1))
    return out


def write_full_as_emulator(model_dir: Path, out: Path) -> Path:
    """The original model as an 'emulator' with no compressed module (shards linked, not copied)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.suffix == ".safetensors":
            (out / f.name).symlink_to(f.resolve())
    _copy_side_files(model_dir, out)
    (out / EMULATOR_META).write_text(json.dumps(_meta(model_dir, {}, "none: the full model"), indent=1))
    return out


def _examples(vocab: int, seq: int, n: int) -> list[Any]:
    from emloc_engine.data import Example

    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = tuple(int(t) for t in torch.randint(4, vocab, (seq,), generator=gen))
        out.append(Example(ids, ids))
    return out


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_train(emulator_dir: Path, run_dir: Path, batch: int, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    from emloc_engine.data import DataConfig
    from emloc_engine.stages.training.trainer import TrainConfig, train_on_examples

    _free()
    baseline = torch.cuda.memory_allocated() / GIB if torch.cuda.is_available() else 0.0
    steps = args.warmup + args.steps
    cfg = TrainConfig(run_dir=run_dir, data=DataConfig(path=run_dir / "none.jsonl"), emulator_dir=emulator_dir,
                      rank=args.rank, alpha=2.0 * args.rank, dropout=0.0, steps=steps, lr=1e-4, batch_size=batch,
                      warmup_steps=0, eval_every=0, save_every=0, grad_checkpointing=True, device=args.device,
                      resume=False)
    rates = RecordingProgress()
    t0 = time.perf_counter()
    try:
        result = train_on_examples(cfg, _examples(vocab, args.seq, batch * steps), [], rates)
    except InsufficientMemory as exc:
        return {"batch": batch, "oom": True, "message": exc.summary}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        _free()
    measured = rates.values("train/tokens_per_s")[args.warmup:] or rates.values("train/tokens_per_s")
    return {"batch": batch, "seq": args.seq, "peak_gib": round(result.peak_vram_gib, 3),
            "tokens_per_s": round(statistics.median(measured), 1), "step_s": round(batch * args.seq / statistics.median(measured), 3),
            "trainable_params": result.trainable_params, "final_loss": round(result.loss_history[-1][1], 4),
            "baseline_gib_before": round(baseline, 3), "wall_s": round(time.perf_counter() - t0, 1)}


def bench_inference(model_dir: Path, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """Peak of loading the full model and a prefill of ``seq`` tokens (last-token logits), like ``generate``."""
    from transformers import AutoModelForCausalLM

    _free()
    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=str(dev)).eval()
    weights = torch.cuda.memory_allocated(dev) / GIB if dev.type == "cuda" else 0.0
    ids = torch.randint(4, vocab, (1, args.seq), device=dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    prefill_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) / GIB if dev.type == "cuda" else 0.0
    params = sum(p.numel() for p in model.parameters())
    del model
    _free()
    return {"seq": args.seq, "peak_gib": round(peak, 3), "weights_gib": round(weights, 3),
            "prefill_s": round(prefill_s, 3), "params": params}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, help="Original model folder (e.g. a random Llama-3-8B).")
    ap.add_argument("--emulator-dir", action="append", default=[], metavar="NAME=DIR",
                    help="Use this emulator instead of random factors (repeatable).")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.4, 0.6])
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="Batch sizes (default 1 16; tiny 1 2).")
    ap.add_argument("--seq", type=int, default=None, help="Sequence length (default 1024; tiny 32).")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4, help="Measured steps per configuration.")
    ap.add_argument("--warmup", type=int, default=2, help="Unmeasured first steps.")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-full", action="store_true", help="Skip full-model LoRA and inference.")
    ap.add_argument("--work-dir", type=Path, help="Where emulators are written (default: a temp folder).")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny Llama built on the fly.")
    args = ap.parse_args(argv)
    args.seq = args.seq or (32 if args.tiny else 1024)
    args.batches = args.batches or ([1, 2] if args.tiny else [1, 16])
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="emloc-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from tests.tiny_models import build_tiny_model

        args.model_dir = build_tiny_model("llama", work / "hub")
        args.device = "cpu" if args.device == "auto" else args.device
    if args.model_dir is None:
        ap.error("--model-dir is required (or --tiny)")
    vocab = int(load_config(args.model_dir)["vocab_size"])
    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    report: dict[str, Any] = {
        "model_dir": str(args.model_dir), "device": torch.cuda.get_device_name(0) if dev.startswith("cuda") else dev,
        "torch": torch.__version__, "settings": {"seq": args.seq, "rank": args.rank, "batches": args.batches,
                                                 "grad_checkpointing": True, "dtype": "bf16" if dev.startswith("cuda") else "fp32",
                                                 "measured_steps": args.steps, "warmup_steps": args.warmup},
        "emulator_factors": "random values of the builder's exact shapes (speed/memory do not depend on values)"
        if not args.emulator_dir else "given emulators", "runs": {}}
    t_all = time.perf_counter()
    if not args.no_full:
        report["inference"] = bench_inference(args.model_dir, args, vocab)
    targets: list[tuple[str, Path, bool]] = []
    for spec in args.emulator_dir:
        name, _, path = spec.partition("=")
        targets.append((name, Path(path), False))
    if not args.emulator_dir:
        targets += [(f"rho={r:g}", work / f"emulator-{r:g}", True) for r in args.ratios]
    if not args.no_full:
        targets.append(("full", work / "full", True))
    for name, path, made_here in targets:
        t0 = time.perf_counter()
        if made_here:
            if name == "full":
                write_full_as_emulator(args.model_dir, path)
            else:
                write_random_emulator(args.model_dir, path, float(name.split("=")[1]), "cuda" if dev.startswith("cuda") else "cpu")
        runs = [bench_train(path, work / f"run-{name}-{b}", b, args, vocab) for b in args.batches]
        report["runs"][name] = {"write_s": round(time.perf_counter() - t0 - sum(r.get("wall_s", 0) for r in runs), 1),
                                "by_batch": runs}
        if made_here:
            shutil.rmtree(path, ignore_errors=True)
        print(json.dumps({name: runs}), file=sys.stderr, flush=True)
    report["summary"] = _summary(report)
    report["wall_s"] = round(time.perf_counter() - t_all, 1)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """Peak vs the inference peak, and speed-up vs full-model LoRA, per ratio and batch."""
    out: dict[str, Any] = {}
    inf_peak = report.get("inference", {}).get("peak_gib")
    full = {r["batch"]: r for r in report["runs"].get("full", {}).get("by_batch", []) if not r.get("oom")}
    for name, rec in report["runs"].items():
        for r in rec["by_batch"]:
            if r.get("oom"):
                continue
            key = f"{name} b{r['batch']}"
            item: dict[str, Any] = {"peak_gib": r["peak_gib"], "tokens_per_s": r["tokens_per_s"]}
            if inf_peak:
                item["peak_le_inference_peak"] = r["peak_gib"] <= inf_peak
            if r["batch"] in full and name != "full":
                item["speedup_vs_full_lora"] = round(r["tokens_per_s"] / full[r["batch"]]["tokens_per_s"], 3)
            out[key] = item
    return out


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(json.dumps(main(), indent=2))
