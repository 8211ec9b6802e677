"""Benchmark Stage 3 (LoRA correction): time to correct every LoRA module of an 8B model.

Target (issue 5, H200): Llama-3-8B architecture (random bf16 weights), rank-16 LoRA on all 224
linear modules, emulator of random low-rank factors at ρ = 0.4: correction of all 224 modules
≤ 10 s (reading W from the original shards and u, v from the emulator included).

    python benchmarks/make_random_model.py --arch llama3-8b --out /tmp/llama3-8b --shards 4
    python benchmarks/bench_correction.py --model-dir /tmp/llama3-8b --work /tmp/bench-corr
    python benchmarks/bench_correction.py --tiny          # CPU smoke run on a tiny Llama

The emulator here is random factors of the right shapes (speed does not depend on their values),
written quickly on the GPU; the adapter is random with nonzero B. λ is fixed (3) so the time is the
correction itself; ``lambda_grid_s`` shows what every extra λ of the auto grid costs (no weights are
read again). ``identity_rel_err`` checks one corrected module against the exact identity
``x (W + Λᶜ)ᵀ = x (Wᴱ + Λ)ᵀ`` for ``x`` in span(Aᵀ) (fp32 adapter on disk).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emloc_engine.core.architectures import arch_spec, num_blocks
from emloc_engine.core.ranks import rank_for_ratio
from emloc_engine.machine.process_memory import RssSampler
from emloc_engine.stages.correction.corrector import (
    CorrectionConfig,
    correct_lora,
    corrected_weights,
    prepare_adapter,
)
from emloc_engine.weights.adapters import read_adapter
from emloc_engine.weights.checkpoint import Checkpoint
from emloc_engine.weights.headers import load_config
from emloc_engine.weights.lowrank import (
    EMULATOR_FORMAT,
    EMULATOR_FORMAT_VERSION,
    EMULATOR_META,
)

TINY_CONFIG: dict[str, Any] = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=256,
                                   intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=320, torch_dtype="bfloat16")


def _modules(model_dir: Path) -> list[tuple[str, int, int]]:
    config = load_config(model_dir)
    spec = arch_spec(config)
    ckpt = Checkpoint(model_dir)
    out = []
    for b in range(num_blocks(config)):
        for m in spec.linear_modules:
            name = spec.module_name(b, m)
            o, i = ckpt.info(f"{name}.weight").shape
            out.append((name, o, i))
    return out


def make_tiny_model(out: Path) -> Path:
    """Linear weights of a tiny Llama (bf16) and its config: all the correction reads."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(TINY_CONFIG))
    h, i = TINY_CONFIG["hidden_size"], TINY_CONFIG["intermediate_size"]
    kv = TINY_CONFIG["num_key_value_heads"] * h // TINY_CONFIG["num_attention_heads"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    tensors = {f"model.layers.{b}.{m}.weight": (torch.randn(s) / s[1] ** 0.5).to(torch.bfloat16)
               for b in range(TINY_CONFIG["num_hidden_layers"]) for m, s in shapes.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def make_emulator(model_dir: Path, out: Path, ratio: float, device: str, shards: int = 4) -> dict[str, Any]:
    """Random bf16 factors u (out × k), v (k × in) with k from ρ, in the emulator folder format."""
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    mods = _modules(model_dir)
    gen = torch.Generator(device=device).manual_seed(1)
    meta_modules: dict[str, Any] = {}
    per_shard = math.ceil(len(mods) / shards)
    nbytes = 0
    for s in range(shards):
        buf: dict[str, torch.Tensor] = {}
        for name, o, i in mods[s * per_shard:(s + 1) * per_shard]:
            k = rank_for_ratio(ratio, o, i)
            buf[f"{name}.u.weight"] = (torch.randn(o, k, generator=gen, device=device) / k ** 0.5).to(
                torch.bfloat16).cpu()
            buf[f"{name}.v.weight"] = (torch.randn(k, i, generator=gen, device=device) / i ** 0.5).to(
                torch.bfloat16).cpu()
            nbytes += 2 * k * (o + i)
            meta_modules[name] = {"ratio": ratio, "rank": k, "in_features": i, "out_features": o, "bias": False}
        if buf:
            save_file(buf, str(out / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"), metadata={"format": "pt"})
    shutil.copy(model_dir / "config.json", out / "config.json")
    meta = {"format": EMULATOR_FORMAT, "format_version": EMULATOR_FORMAT_VERSION, "engine_version": "bench",
            "source_model": {"path": str(model_dir), "revision": None, "fingerprint": "bench"},
            "method": "random factors (benchmark)", "calibration": {"samples": 0, "tokens": 0, "fingerprint": None},
            "modules": meta_modules}
    (out / EMULATOR_META).write_text(json.dumps(meta, indent=2))
    return {"emulator_bytes": nbytes, "emulator_write_s": round(time.time() - t0, 2)}


def make_adapter(model_dir: Path, out: Path, rank: int, alpha: float) -> int:
    """Random fp32 LoRA (nonzero B) on every linear module, in peft's format; returns the module count."""
    from peft import LoraConfig

    mods = _modules(model_dir)
    spec = arch_spec(load_config(model_dir))
    LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(spec.short_names), lora_dropout=0.0
               ).save_pretrained(str(out))
    gen = torch.Generator().manual_seed(2)
    tensors = {}
    for name, o, i in mods:
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, i, generator=gen) / i ** 0.5
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(o, rank, generator=gen) * 0.01
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return len(mods)


def read_only_pass(model_dir: Path, emulator_dir: Path) -> float:
    """Seconds to read every W, u, v once (CPU tensors), without computing: the I/O floor."""
    ckpt, emu = Checkpoint(model_dir), Checkpoint(emulator_dir)
    t0 = time.time()
    for name, _, _ in _modules(model_dir):
        for t in (ckpt.get(f"{name}.weight"), emu.get(f"{name}.u.weight"), emu.get(f"{name}.v.weight")):
            del t
    return time.time() - t0


def identity_error(model_dir: Path, run: Path, module: str, device: str) -> float:
    """max |x(W+Λᶜ)ᵀ − x(Wᴱ+Λ)ᵀ| / max |x(Wᴱ+Λ)ᵀ| over x in span(Aᵀ), fp64, for one module."""
    src, out = read_adapter(run / "adapter"), read_adapter(run / "adapter-corrected")
    ckpt, emu = Checkpoint(model_dir), Checkpoint(run / "emulator")
    f64 = torch.float64
    w = ckpt.get(f"{module}.weight").to(device).to(f64)
    u, v = (emu.get(f"{module}.{x}.weight").to(device).to(f64) for x in ("u", "v"))
    a, b = src.A(module).to(device, f64), src.B(module).to(device, f64)
    ac, bc = out.A(module).to(device, f64), out.B(module).to(device, f64)
    s = src.modules[module].scale
    x = torch.randn(8, a.shape[0], dtype=f64, device=device) @ a
    want = x @ v.T @ u.T + s * (x @ a.T) @ b.T
    got = x @ w.T + s * (x @ ac.T) @ bc.T
    return float((got - want).abs().max() / want.abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, help="Original model folder (Llama-3-8B architecture).")
    ap.add_argument("--work", type=Path, help="Folder for the run (emulator, adapters); default: a temp folder.")
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=2, help="Correction runs (the first may read from disk).")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny Llama.")
    ap.add_argument("--keep", action="store_true", help="Keep the work folder.")
    args = ap.parse_args()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        device = "cpu"
        torch.set_num_threads(1)  # tiny matrices: threads only add contention
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-corr-"))
    run = work / "run"
    if run.exists():
        shutil.rmtree(run)
    model_dir = make_tiny_model(work / "tiny-model") if args.tiny else args.model_dir
    if model_dir is None:
        ap.error("--model-dir is required (or --tiny)")
    result: dict[str, Any] = {"benchmark": "correction", "date": dt.date.today().isoformat(),
                              "model_dir": str(model_dir), "device": device, "ratio": args.ratio,
                              "rank": args.rank, "alpha": args.alpha,
                              "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
                              "torch": torch.__version__}
    try:
        result.update(make_emulator(model_dir, run / "emulator", args.ratio, device))
        result["modules"] = make_adapter(model_dir, run / "adapter", args.rank, args.alpha)
        result["read_only_s"] = round(read_only_pass(model_dir, run / "emulator"), 2)
        runs = []
        with RssSampler() as rss:
            for _ in range(args.repeats):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                res = correct_lora(CorrectionConfig(run_dir=run, model_dir=model_dir, lambda_=3.0, device=device,
                                                    overwrite=True))
                runs.append({"correction_s": round(res.correction_s, 2), "wall_s": round(res.wall_s, 2),
                             "write_s": round(res.wall_s - res.correction_s - res.eval_s, 2),
                             "peak_vram_gib": round(res.peak_vram_gib, 2)})
        result["runs"] = runs
        result["correction_s"] = min(r["correction_s"] for r in runs)
        result["peak_cpu_rss_gib"] = round(rss.peak_bytes / 2**30, 2)
        result["modules_damped_at_lambda_3"] = sum(m.damped for m in res.modules)
        # Every extra λ of the auto grid: re-damping only, no weights read.
        prepared = prepare_adapter(read_adapter(run / "adapter"), model_dir, run / "emulator",
                                   device=torch.device(device))
        t0 = time.time()
        for lam in (0.0, 0.5, 1.0, 3.0, math.inf):
            corrected_weights(prepared, lam)
        result["lambda_grid_s"] = round(time.time() - t0, 2)
        first = _modules(model_dir)[-1][0]
        result["identity_module"] = first
        shutil.rmtree(run / "adapter-corrected")
        correct_lora(CorrectionConfig(run_dir=run, model_dir=model_dir, lambda_=math.inf, device=device))
        result["identity_rel_err"] = identity_error(model_dir, run, first, device)
        result["target_s"] = 10.0
        result["meets_target"] = result["correction_s"] <= 10.0
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
