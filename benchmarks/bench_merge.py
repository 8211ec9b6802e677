"""Benchmark: streaming LoRA merge + write of a Llama-3-8B-architecture model (issue 5).

Target (H200 host): merge a random rank-16 adapter on all 224 linear modules into the 16 GB bf16
model (4 shards) and write ``RUN_DIR/merged/`` in ≤ 2 minutes, with peak CPU RSS ≤ largest shard + 2 GiB.
The merge runs on the CPU (fp32 maths), exactly as ``emloc export --formats merged --no-verify`` does.

    python benchmarks/make_random_model.py --arch llama3-8b --out /tmp/llama3-8b --shards 4
    python benchmarks/bench_merge.py --model-dir /tmp/llama3-8b --work /tmp/bench-merge [--gguf-type f16]
    python benchmarks/bench_merge.py --tiny          # CPU smoke test in seconds

Prints one JSON object: merge_s, write GB/s, peak/baseline RSS, the largest shard, pass/fail per target,
and a spot check that one merged weight equals W + s·B·A.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TINY = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=256, intermediate_size=512,
            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, vocab_size=1024,
            rope_theta=500000.0, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
            torch_dtype="bfloat16", hidden_act="silu", eos_token_id=3, pad_token_id=0, bos_token_id=None)


def make_tiny_model(out: Path, shards: int = 4) -> Path:
    """A small Llama-shaped bf16 checkpoint in ``shards`` shards with an index (no tokenizer needed)."""
    from make_random_model import tensor_shapes

    out.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(TINY)
    per = -(-len(shapes) // shards)
    index = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        buf = {n: (torch.randn(shape) * 0.05).to(torch.bfloat16) for n, shape in shapes[s * per:(s + 1) * per]}
        save_file(buf, str(out / name), metadata={"format": "pt"})
        index.update({n: name for n in buf})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    (out / "config.json").write_text(json.dumps(TINY))
    from tests.tiny_models import make_tokenizer

    make_tokenizer().save_pretrained(out)
    return out


def make_adapter(model_dir: Path, out: Path, rank: int, alpha: float) -> int:
    """A random fp32 peft LoRA adapter (nonzero B) on every linear module of every block."""
    from peft import LoraConfig

    from emloc_engine.core.architectures import arch_spec, num_blocks
    from emloc_engine.weights.checkpoint import Checkpoint
    from emloc_engine.weights.headers import load_config

    cfg = load_config(model_dir)
    spec, ck = arch_spec(cfg), Checkpoint(model_dir)
    LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(spec.short_names), lora_dropout=0.0
               ).save_pretrained(str(out))
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for b in range(num_blocks(cfg)):
        for m in spec.linear_modules:
            name = spec.module_name(b, m)
            o, i = ck.info(f"{name}.weight").shape
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, i, generator=gen) / i ** 0.5
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(o, rank, generator=gen) * 0.01
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return len(tensors) // 2


def spot_check(model_dir: Path, merged_dir: Path, adapter_dir: Path, module: str) -> float:
    """max |merged − bf16(W + s·B·A)| for one module, in units of the bf16 spacing (≤ 1 expected)."""
    from emloc_engine.stages.export.merge import read_lora_deltas
    from emloc_engine.weights.checkpoint import Checkpoint

    _, deltas = read_lora_deltas(adapter_dir)
    d = deltas[module]
    w = Checkpoint(model_dir).get(f"{module}.weight")
    exact = w.double() + d.scale * d.B.double() @ d.A.double()
    got = Checkpoint(merged_dir).get(f"{module}.weight")
    ulp = exact.abs().clamp_min(1e-30) * 2.0 ** -8
    return float(((got.double() - exact).abs() / ulp).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, help="Random bf16 model (benchmarks/make_random_model.py).")
    ap.add_argument("--work", type=Path, help="Scratch folder for the run (default: a temporary folder).")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test on a small Llama-shaped model.")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default).")
    ap.add_argument("--gguf-type", default="", help="Also time the GGUF export (f16, bf16, q8_0).")
    ap.add_argument("--keep", action="store_true", help="Keep the work folder.")
    args = ap.parse_args()
    if not args.tiny and args.model_dir is None:
        ap.error("--model-dir is required unless --tiny")
    if args.threads:
        torch.set_num_threads(args.threads)

    from emloc_engine.core.layout import RunLayout
    from emloc_engine.stages.export.exporter import ExportConfig, RssSampler, merge_and_export

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = make_tiny_model(work / "model") if args.tiny else Path(args.model_dir)
    run = work / "run"
    if run.exists():
        shutil.rmtree(run)
    t0 = time.monotonic()
    n_modules = make_adapter(model_dir, RunLayout(run).adapter_corrected, args.rank, args.alpha)
    adapter_s = time.monotonic() - t0
    shards = sorted(model_dir.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    total = sum(p.stat().st_size for p in shards)
    formats = ("merged", "gguf") if args.gguf_type else ("merged",)
    with RssSampler() as baseline:
        pass
    t0 = time.monotonic()
    res = merge_and_export(ExportConfig(run_dir=run, model_dir=model_dir, formats=formats, gguf_type=args.gguf_type or "f16",
                                        verify=False, overwrite=True))
    wall = time.monotonic() - t0
    assert res.merged_dir is not None
    with safe_open(str(next(res.merged_dir.glob("*.safetensors"))), "pt") as fh:
        merged_dtype = str(fh.get_tensor(next(iter(fh.keys()))).dtype)
    out: dict[str, Any] = {
        "model_dir": str(model_dir), "shards": len(shards), "model_gb": round(total / 1e9, 3),
        "largest_shard_gib": round(largest / 2**30, 3), "modules": n_modules, "rank": args.rank,
        "merged_modules": res.merged_modules, "merged_dtype": merged_dtype,
        "adapter_make_s": round(adapter_s, 2), "merge_s": round(res.merge_s, 2),
        "merge_write_gb_per_s": round(total / 1e9 / max(res.merge_s, 1e-9), 3),
        "gguf_s": round(res.gguf_s, 2) if args.gguf_type else None, "export_wall_s": round(wall, 2),
        "baseline_rss_gib": round(baseline.peak_bytes / 2**30, 3), "peak_rss_gib": round(res.peak_rss_gib, 3),
        "rss_target_gib": round(largest / 2**30 + 2, 3), "threads": torch.get_num_threads(),
        "spot_check_ulps": round(spot_check(model_dir, res.merged_dir, RunLayout(run).adapter_corrected,
                                            "model.layers.1.mlp.down_proj"), 3),
    }
    out["time_ok"] = res.merge_s <= 120.0
    out["rss_ok"] = res.peak_rss_gib <= out["rss_target_gib"]
    print(json.dumps(out, indent=1))
    if not args.keep:
        shutil.rmtree(run, ignore_errors=True)
        if args.tiny or args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
