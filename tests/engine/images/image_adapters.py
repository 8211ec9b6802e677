"""A peft adapter folder for a tiny pipeline's denoiser, as img-core's training writes it (tests only).

``make_denoiser_adapter(snapshot, kind, out)``: the denoiser of ``snapshot`` wrapped by peft with a
``LoraConfig``, every ``lora_B`` drawn non-zero (a fresh LoRA has B = 0 and would prove nothing), saved
with ``save_pretrained`` (keys ``base_model.model.<module>.lora_A.weight``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TARGETS = {
    "flux": [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_k",
        "transformer_blocks.0.attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff_context.net.2",
        "single_transformer_blocks.0.proj_out",
    ],
    "sd3": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "ff.net.0.proj"],
    "sdxl": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "time_emb_proj"],
}


def make_denoiser_adapter(
    snapshot: Path,
    kind: str,
    out: Path,
    *,
    targets: list[str] | None = None,
    r: int = 4,
    alpha: float = 8.0,
    rank_pattern: dict[str, int] | None = None,
    seed: int = 0,
    use_rslora: bool = False,
) -> Path:
    import diffusers
    from peft import LoraConfig, get_peft_model

    name = "unet" if kind == "sdxl" else "transformer"
    cls: Any = {
        "flux": diffusers.FluxTransformer2DModel,
        "sd3": diffusers.SD3Transformer2DModel,
        "sdxl": diffusers.UNet2DConditionModel,
    }[kind]
    denoiser = cls.from_pretrained(str(Path(snapshot) / name))
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets or TARGETS[kind],
        rank_pattern=rank_pattern or {},
        use_rslora=use_rslora,
    )
    model = get_peft_model(denoiser, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname or "lora_A" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(str(out))
    return Path(out)
