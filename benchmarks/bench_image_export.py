"""Image LoRA export at FLUX.1-dev's shapes: time and peak memory of each format, every output read back.

Builds a FLUX.1-dev-shaped transformer with random bf16 weights (19 double + 38 single blocks, width
3072: 11.9 B parameters, 23.8 GB in sharded safetensors) in a pipeline folder holding only the
transformer and ``model_index.json`` (the export never loads the text encoders or the VAE), a peft
rank-16 adapter on the modules img-core's training adapts (every attention and feed-forward linear
of the double and single blocks), then runs ``export_image_lora`` for the formats asked.

This is the only place the FLUX.1 kohya path runs at full width: the single blocks' ``linear1``
(q/k/v/mlp fused, rank 4·16) is split back by diffusers' own converter and loaded by
``FluxPipeline.load_lora_weights`` into the 12B transformer, whose output must match the peft
reference.

    python benchmarks/bench_image_export.py OUT_DIR                   # FLUX.1-dev shapes (GPU: ~24 GiB)
    python benchmarks/bench_image_export.py OUT_DIR --shape tiny      # seconds on a CPU (a smoke test)

Disk: the model (23.8 GB) and, with ``merged``, its merged copy (23.8 GB). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(out: Path, shape: str, rank: int) -> tuple[Path, Path]:
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model

    from benchmarks.image_shapes import FLUX_DEV
    from emloc_engine.images.pipelines import COMPRESSED
    from tests.tiny_pipelines import TINY_FLUX_TRANSFORMER

    pipe_dir, adapter_dir = out / "pipeline", out / "adapter"
    if (adapter_dir / "adapter_config.json").is_file():
        return pipe_dir, adapter_dir
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if shape == "flux1-dev" else torch.float32
    with torch.device("meta"):
        model = FluxTransformer2DModel(**(FLUX_DEV if shape == "flux1-dev" else TINY_FLUX_TRANSFORMER))
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    pipe_dir.mkdir(parents=True, exist_ok=True)
    (pipe_dir / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "FluxPipeline",
                "_diffusers_version": "0.42.1",
                "transformer": ["diffusers", "FluxTransformer2DModel"],
            }
        )
    )
    model.save_pretrained(pipe_dir / "transformer", max_shard_size="5GB")
    targets = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and COMPRESSED["flux"].search(n)
    ]
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.normal_(0.0, 0.02, generator=g)
    peft.save_pretrained(str(adapter_dir))
    del model, peft
    if device == "cuda":
        torch.cuda.empty_cache()
    return pipe_dir, adapter_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=("flux1-dev", "tiny"), default="flux1-dev")
    ap.add_argument("--formats", default="diffusers,kohya,merged")
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    import torch

    from emloc_engine.images.export import ImageExportConfig, export_image_lora

    t0 = time.monotonic()
    pipe_dir, adapter_dir = build(args.out, args.shape, args.rank)
    built_s = time.monotonic() - t0
    formats = tuple(f for f in args.formats.split(",") if f)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t1 = time.monotonic()
    result = export_image_lora(ImageExportConfig(pipe_dir, adapter_dir, args.out / "export", formats=formats))
    print(
        json.dumps(
            {
                "shape": args.shape,
                "formats": formats,
                "build_s": round(built_s, 1),
                "export_s": round(time.monotonic() - t1, 1),
                "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                if torch.cuda.is_available()
                else None,
                "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                "checks": [
                    {
                        "what": c.what,
                        "max_abs_diff": c.max_abs_diff,
                        "ref_max_abs": c.ref_max_abs,
                        "adapter_effect": c.adapter_effect,
                        "ok": c.ok,
                    }
                    for c in result.checks
                ],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
