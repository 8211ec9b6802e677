"""Random LoRA adapters in peft's folder format, for tests of correction and export.

``write_random_adapter(model_dir, out_dir, r=4, alpha=8)`` writes ``adapter_config.json`` (through
peft's own ``LoraConfig.save_pretrained``) and ``adapter_model.safetensors`` with random ``A`` and a
NONZERO random ``B`` on every linear module of every block, under peft's key names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file

from emloc_engine.core.architectures import arch_spec, num_blocks
from emloc_engine.weights.checkpoint import Checkpoint
from emloc_engine.weights.headers import load_config


def write_random_adapter(model_dir: Path, out_dir: Path, *, r: int = 4, alpha: float = 8.0,
                         use_rslora: bool = False, rank_pattern: dict[str, int] | None = None,
                         alpha_pattern: dict[str, float] | None = None, seed: int = 0,
                         dtype: torch.dtype = torch.float32, b_std: float = 0.05,
                         **config_kw: Any) -> Path:
    """Write a random peft LoRA adapter for ``model_dir`` into ``out_dir``; returns ``out_dir``."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = load_config(model_dir)
    spec = arch_spec(config)
    ckpt = Checkpoint(model_dir)
    gen = torch.Generator().manual_seed(seed)
    lora_cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(spec.short_names), use_rslora=use_rslora,
                          rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}),
                          lora_dropout=0.0, **config_kw)
    lora_cfg.save_pretrained(str(out_dir))
    tensors: dict[str, torch.Tensor] = {}
    for b in range(num_blocks(config)):
        for m in spec.linear_modules:
            name = spec.module_name(b, m)
            out_f, in_f = ckpt.info(f"{name}.weight").shape
            key = get_pattern_key(list(lora_cfg.rank_pattern), name)
            rank = int(lora_cfg.rank_pattern.get(key, r))
            a = torch.randn(rank, in_f, generator=gen, dtype=torch.float64) / in_f ** 0.5
            bb = torch.randn(out_f, rank, generator=gen, dtype=torch.float64) * b_std
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(dtype)
            tensors[f"base_model.model.{name}.lora_B.weight"] = bb.to(dtype)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir
