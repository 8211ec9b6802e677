"""Create a random-weight model of a real architecture as safetensors shards (for GPU benchmarks).

Speed and memory do not depend on weight values, so the scale benchmarks use random bf16 weights
of the exact shapes of Llama-3-8B (and friends), written as an HF model folder with N shards, the
byte-level test tokenizer and a chat template. Weights are drawn on the GPU when there is one.

    python benchmarks/make_random_model.py --arch llama3-8b --out /tmp/llama3-8b --shards 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# What a family's checkpoints share; a preset adds its shapes (and overrides what differs).
_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=152064, rope_theta=1000000.0,
                  max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], rope_theta=1000000.0,
                    max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=None),
}


def _preset(family: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
            **extra: Any) -> dict[str, Any]:
    """A preset's config fields: its family's, then its shapes, then ``extra``."""
    return dict(_FAMILIES[family], hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=False, **extra)


_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)
PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": _preset("llama", 4096, 14336, 32, 32, 8, **_LLAMA3),
    "qwen2.5-7b": _preset("qwen2", 3584, 18944, 28, 28, 4),
    "mistral-7b": _preset("mistral", 4096, 14336, 32, 32, 8, vocab_size=32768),
    "llama2-13b": _preset("llama", 5120, 13824, 40, 40, 40, vocab_size=32000, rope_theta=10000.0,
                          max_position_embeddings=4096),
    "qwen2.5-14b": _preset("qwen2", 5120, 13824, 48, 40, 8),
    "qwen2.5-32b": _preset("qwen2", 5120, 27648, 64, 40, 8),
    "llama3-70b": _preset("llama", 8192, 28672, 80, 64, 8, **_LLAMA3),
}


def tensor_shapes(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of every tensor of a Llama-family checkpoint, in file order."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    bias = cfg["model_type"] == "qwen2"
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for b in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{b}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
        if bias:
            out += [(p + "self_attn.q_proj.bias", (h,)), (p + "self_attn.k_proj.bias", (kv,)),
                    (p + "self_attn.v_proj.bias", (kv,))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def model_config(arch: str, layers: int | None = None) -> dict[str, Any]:
    """The config.json of a preset (bf16); ``layers`` keeps only the first blocks (per-block measurements)."""
    cfg = dict(PRESETS[arch], torch_dtype="bfloat16", bos_token_id=None, eos_token_id=3, pad_token_id=0,
               hidden_act="silu", attention_bias=PRESETS[arch]["model_type"] == "qwen2")
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return cfg


def make(arch: str, out: Path, shards: int, seed: int = 0, layers: int | None = None) -> dict[str, Any]:
    from tests.tiny_models import make_tokenizer

    cfg = model_config(arch, layers)
    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(seed)
    shapes = tensor_shapes(cfg)
    total = sum(int(torch.Size(s).numel()) * 2 for _, s in shapes)
    per_shard = total / shards
    t0 = time.time()
    index: dict[str, str] = {}
    buf: dict[str, torch.Tensor] = {}
    size = 0
    n = 1
    names = [f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)]
    for name, shape in shapes:
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            std = 0.02 if "embed" in name or "lm_head" in name else (1.0 / shape[1]) ** 0.5
            t = (torch.randn(shape, generator=gen, device=dev, dtype=torch.float32) * std).to(torch.bfloat16).cpu()
        buf[name] = t
        index[name] = names[n - 1]
        size += t.numel() * 2
        if size >= per_shard * n and n < shards:
            save_file(buf, str(out / names[n - 1]), metadata={"format": "pt"})
            buf, n = {}, n + 1
    save_file(buf, str(out / names[n - 1]), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 3, "pad_token_id": 0}))
    make_tokenizer().save_pretrained(out)
    return {"arch": arch, "out": str(out), "bytes": total, "shards": shards, "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", choices=sorted(PRESETS), default="llama3-8b")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--layers", type=int, default=None,
                    help="Keep only this many decoder blocks (the same block shapes: per-block memory, fast to write).")
    ap.add_argument("--config-only", action="store_true",
                    help="Write config.json only (for `emloc plan`: the planner reads shapes from the config).")
    args = ap.parse_args()
    if args.layers is not None and not 1 <= args.layers <= PRESETS[args.arch]["num_hidden_layers"]:
        ap.error(f"--layers must be between 1 and {PRESETS[args.arch]['num_hidden_layers']} for {args.arch} "
                 f"(got {args.layers}).")
    if args.config_only:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "config.json").write_text(json.dumps(model_config(args.arch, args.layers), indent=2))
        print(json.dumps({"arch": args.arch, "out": str(args.out), "config_only": True}))
        return
    print(json.dumps(make(args.arch, args.out, args.shards, layers=args.layers)))


if __name__ == "__main__":
    main()
