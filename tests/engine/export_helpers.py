"""Helpers for the export tests: peft adapters with nonzero B on the tiny models, logits, resharding."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from emloc_engine.core.architectures import arch_spec
from emloc_engine.weights.headers import load_config

PROMPTS = ([5, 70, 100, 3, 200, 17, 44], [9, 8, 7, 6, 250, 251])


def make_adapter(model_dir: Path, out: Path, *, rank: int = 4, alpha: float = 8.0, seed: int = 0,
                 use_rslora: bool = False, target_modules: list[str] | None = None, std: float = 0.1) -> Path:
    """A peft LoRA adapter on the original model with random nonzero B, saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    targets = target_modules or list(arch_spec(load_config(model_dir)).short_names)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                  use_rslora=use_rslora, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif "lora_A" in name:  # peft's own init draws from the global RNG: order-dependent results
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) / p.shape[1] ** 0.5)
    peft_model.save_pretrained(str(out))
    return out


@torch.no_grad()
def logits(model: Any, prompts: tuple[list[int], ...] = PROMPTS) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([p])).logits.float() for p in prompts]


def peft_logits(model_dir: Path, adapter_dir: Path, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    return logits(PeftModel.from_pretrained(base, str(adapter_dir)).eval())


def hf_logits(model_dir: Path, dtype: torch.dtype = torch.float32, **kw: Any) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return logits(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, **kw).eval())


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def copy_model(model_dir: Path, out: Path, *, max_shard_size: str | None = None,
               dtype: torch.dtype | None = None) -> Path:
    """A writable copy of a tiny model (optionally resharded and/or cast), tokenizer files included."""
    from transformers import AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for p in Path(model_dir).iterdir():
        if not p.name.endswith(".safetensors") and p.name != "model.safetensors.index.json":
            shutil.copy2(p, out / p.name)
    if max_shard_size is None and dtype is None:
        for p in Path(model_dir).glob("*.safetensors"):
            shutil.copy2(p, out / p.name)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype or torch.float32)
        model.save_pretrained(str(out), max_shard_size=max_shard_size or "5GB")
    return out
