"""A denoiser's LoRA as the files image tools load: diffusers naming and kohya naming (pure functions).

Input everywhere: ``{module: LoraDelta}`` with module names relative to the denoiser (what a peft
adapter folder for the denoiser holds), each meaning ``ΔW = s · B A``.

**Scale.** Both formats are written *with the scale folded into B* (``B' = s · B``, so ``ΔW = B' A``):
diffusers' reader without metadata, ComfyUI, Forge and A1111 all apply scale 1 when no alpha says
otherwise. The kohya file has one ``.alpha = R`` (its largest rank) on every module and ``r / R``
folded into each module's up weight as well, so ``alpha / r · up · down = ΔW`` in every tool. One
file thus means the same everywhere, whatever ``lora_alpha``, ``rank_pattern`` or rsLoRA the
training used.

**diffusers** (:func:`diffusers_state_dict`): ``<denoiser>.<module>.lora_A.weight`` /
``.lora_B.weight``; the export hands it to the pipeline class's own ``save_lora_weights``
(``transformer_lora_layers=`` for FLUX/SD3, ``unet_lora_layers=`` for SDXL), which adds the prefix.

**kohya** (:func:`kohya_state_dict`), one naming per family, each the one the family's trainers write
and diffusers' own converter (``diffusers.loaders.lora_conversion_utils``) reads back:

- SDXL: kohya sd-scripts' names on the original (sgm) UNet, ``lora_unet_input_blocks_4_1_transformer_
  blocks_0_attn1_to_q`` (what A1111, Forge, ComfyUI and kohya load). The diffusers block
  ``down_blocks.b.attentions.j`` is sgm ``input_blocks.{1 + b·(L+1) + j}.1`` (``L`` = layers per
  block), ``up_blocks.b.attentions.j`` is ``output_blocks.{b·(L+1) + j}.1``, ``mid_block.attentions.0``
  is ``middle_block.1``; resnets are ``.0`` with ``time_emb_proj`` = ``emb_layers.1``.
- FLUX.1: sd-scripts' names on the original (BFL) transformer, ``lora_unet_double_blocks_0_img_attn_qkv``
  (what kohya, ComfyUI and Forge load). BFL fuses q/k/v (and, in single blocks, q/k/v/mlp) into one
  linear: the fused LoRA has ``down = [A_q; A_k; A_v]`` and a block-diagonal ``up = diag(B_q, B_k, B_v)``
  (rank n·r; parts the adapter lacks are zero blocks; ranks are zero-padded to the largest), which
  is exactly ``ΔW`` of each part and which diffusers' converter recognises and splits back losslessly.
- SD3: no kohya naming exists that diffusers reads back, so none is written: ComfyUI and Forge load
  SD3 LoRAs in the diffusers naming directly (:class:`UnsupportedKohya` says so).

A module without a name in the family's kohya naming is refused (with the list), never dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from emloc_engine.core.errors import MergeError
from emloc_engine.stages.export.merge import LoraDelta

KOHYA_BASE_MODEL = {"flux": "flux1", "sdxl": "sdxl_base_v1-0"}


class UnsupportedKohya(MergeError):
    """The adapter (or its family) has no kohya naming that the image tools and diffusers agree on."""


def _folded(delta: LoraDelta, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, s·B)`` computed in fp32, returned in ``dtype`` (default: A's stored dtype)."""
    out = dtype or delta.A.dtype
    b = delta.B.to(torch.float32) * float(delta.scale)
    return delta.A.to(torch.float32).to(out).contiguous(), b.to(out).contiguous()


def diffusers_state_dict(deltas: Mapping[str, LoraDelta]) -> dict[str, torch.Tensor]:
    """The denoiser's LoRA layers as ``save_lora_weights`` takes them (``<module>.lora_A.weight``...).

    Args:
        deltas: module (relative to the denoiser) -> delta.

    Returns:
        ``{module.lora_A.weight: A, module.lora_B.weight: s·B}`` (no component prefix).
    """
    out: dict[str, torch.Tensor] = {}
    for module, delta in deltas.items():
        a, b = _folded(delta)
        out[f"{module}.lora_A.weight"] = a
        out[f"{module}.lora_B.weight"] = b
    return out


# -- SDXL: diffusers UNet module -> sgm (original UNet) module ------------------------------------------------
_SDXL_RESNET = {"time_emb_proj": "emb_layers.1"}
_SDXL_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def sdxl_sgm_name(module: str, layers_per_block: int) -> str | None:
    """The sgm (kohya/A1111) name of a diffusers SDXL UNet linear module, or ``None`` when it has none."""
    if module in _SDXL_TOP:
        return _SDXL_TOP[module]
    step = layers_per_block + 1
    m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", module)
    if m:
        kind, b, inner, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        index = 1 + b * step + j if kind == "down_blocks" else b * step + j
        outer = "input_blocks" if kind == "down_blocks" else "output_blocks"
        return _sgm_inner(f"{outer}.{index}", inner, rest)
    m = re.fullmatch(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)", module)
    if m:
        inner, j, rest = m.group(1), int(m.group(2)), m.group(3)
        index = 1 if inner == "attentions" else 2 * j  # sgm middle_block: resnet 0, attention 1, resnet 2
        if inner == "attentions" and j != 0:
            return None
        return _sgm_inner(f"middle_block.{index}", inner, rest)
    return None


def _sgm_inner(prefix: str, inner: str, rest: str) -> str | None:
    if inner == "attentions":
        return f"{prefix}.1.{rest}" if not prefix.startswith("middle_block") else f"{prefix}.{rest}"
    if rest not in _SDXL_RESNET:
        return None
    return (
        f"{prefix}.0.{_SDXL_RESNET[rest]}"
        if not prefix.startswith("middle_block")
        else f"{prefix}.{_SDXL_RESNET[rest]}"
    )


def _sdxl_kohya(deltas: Mapping[str, LoraDelta], unet_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    lpb = unet_config.get("layers_per_block", 2)
    if not isinstance(lpb, int):
        if len(set(lpb)) != 1:
            raise UnsupportedKohya(
                f"This UNet has a different layers_per_block per level ({lpb}); kohya's SDXL "
                "naming assumes one value.",
                hint="Use the diffusers file (--format diffusers).",
            )
        lpb = int(lpb[0])
    out: dict[str, torch.Tensor] = {}
    missing = []
    for module, delta in deltas.items():
        sgm = sdxl_sgm_name(module, int(lpb))
        if sgm is None:
            missing.append(module)
            continue
        _put_kohya(out, "lora_unet_" + sgm.replace(".", "_"), *_folded(delta))
    _refuse_missing("sdxl", missing)
    return out


# -- FLUX.1: diffusers transformer module -> BFL (original) module, fused where BFL fuses ----------------------
_FLUX_DOUBLE = {
    "attn.to_out.0": "img_attn_proj",
    "ff.net.0.proj": "img_mlp_0",
    "ff.net.2": "img_mlp_2",
    "norm1.linear": "img_mod_lin",
    "attn.to_add_out": "txt_attn_proj",
    "ff_context.net.0.proj": "txt_mlp_0",
    "ff_context.net.2": "txt_mlp_2",
    "norm1_context.linear": "txt_mod_lin",
}
_FLUX_DOUBLE_FUSED = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_FLUX_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation_lin"}
_FLUX_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
FLUX1_WIDTH = 3072
"""diffusers' reader splits a single block's fused ``linear1`` as FLUX.1's [3072, 3072, 3072, 12288]."""


@dataclass(frozen=True)
class _Fused:
    kohya: str
    parts: tuple[str, ...]  # full module names, in fused order


def _flux_plan(modules: list[str]) -> tuple[dict[str, str], list[_Fused], list[str]]:
    """Which kohya name each module gets: ``(plain, fused groups, modules without a name)``."""
    plain: dict[str, str] = {}
    fused: dict[str, _Fused] = {}
    missing = []
    for module in modules:
        m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module)
        if not m:
            missing.append(module)
            continue
        double = m.group(1) == "transformer_blocks"
        i, rest = int(m.group(2)), m.group(3)
        base = f"lora_unet_{'double' if double else 'single'}_blocks_{i}_"
        simple, groups = (_FLUX_DOUBLE, _FLUX_DOUBLE_FUSED) if double else (_FLUX_SINGLE, _FLUX_SINGLE_FUSED)
        if rest in simple and i < (19 if double else 38):
            plain[module] = base + simple[rest]
            continue
        for name, parts in groups.items():
            if rest in parts and i < (19 if double else 38):
                key = base + name
                fused[key] = _Fused(key, tuple(f"{m.group(1)}.{i}.{p}" for p in parts))
                break
        else:
            missing.append(module)
    return plain, list(fused.values()), missing


def _fuse(
    group: _Fused, deltas: Mapping[str, LoraDelta], out_dims: list[int], in_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``down = [A_1; …; A_n]`` (n·r × in), ``up = diag(s_1 B_1, …, s_n B_n)`` (Σout × n·r), zero-padded."""
    present = [deltas[p] for p in group.parts if p in deltas]
    rank = max(d.rank for d in present)
    dtype = present[0].A.dtype
    n = len(group.parts)
    down = torch.zeros(n * rank, in_dim, dtype=torch.float32)
    up = torch.zeros(sum(out_dims), n * rank, dtype=torch.float32)
    row = 0
    for k, (part, out_dim) in enumerate(zip(group.parts, out_dims, strict=True)):
        if part in deltas:
            a, b = _folded(deltas[part], torch.float32)
            down[k * rank : k * rank + a.shape[0]] = a
            up[row : row + out_dim, k * rank : k * rank + b.shape[1]] = b
        row += out_dim
    return down.to(dtype).contiguous(), up.to(dtype).contiguous()


def _flux_kohya(deltas: Mapping[str, LoraDelta], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    mlp = int(width * float(config.get("mlp_ratio", 4.0)))
    plain, fused, missing = _flux_plan(list(deltas))
    problems = [f"{m}: no FLUX.1 (BFL) module of that name" for m in missing]
    if width != FLUX1_WIDTH:
        for g in fused:
            if g.kohya.endswith("_linear1"):
                problems.append(
                    f"{', '.join(p for p in g.parts if p in deltas)}: fused into {g.kohya}, which "
                    f"diffusers' reader splits as FLUX.1's width {FLUX1_WIDTH} (this model: {width})"
                )
    if problems:
        raise UnsupportedKohya(
            "These adapted modules have no kohya (sd-scripts) name that diffusers reads back:",
            problems=problems,
            hint="Use the diffusers file (--format diffusers), which "
            "ComfyUI and Forge also load, or train without these modules.",
        )
    out: dict[str, torch.Tensor] = {}
    for module, name in plain.items():
        _put_kohya(out, name, *_folded(deltas[module]))
    for g in fused:
        dims = [width] * 3 + ([mlp] if len(g.parts) == 4 else [])
        present = next(deltas[p] for p in g.parts if p in deltas)
        down, up = _fuse(g, deltas, dims, int(present.A.shape[1]))
        _put_kohya(out, g.kohya, down, up)
    return out


# -- shared ---------------------------------------------------------------------------------------------------
def _put_kohya(out: dict[str, torch.Tensor], name: str, down: torch.Tensor, up: torch.Tensor) -> None:
    out[f"{name}.lora_down.weight"] = down
    out[f"{name}.lora_up.weight"] = up


def _uniform_alpha(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give every module the same ``alpha = R`` (the largest rank) and fold ``rank / R`` into its up weight.

    Every tool applies ``alpha / rank`` per module, so each module still means ``ΔW = up · down`` as
    written; one alpha for all matters because diffusers' SDXL reader mis-assigns per-module alphas
    (it names them for its old attention processors, and peft then ignores them).
    """
    downs = [k for k in state if k.endswith(".lora_down.weight")]
    top = max(int(state[k].shape[0]) for k in downs)
    for k in downs:
        name = k[: -len(".lora_down.weight")]
        rank = int(state[k].shape[0])
        up = state[f"{name}.lora_up.weight"]
        if rank != top:
            state[f"{name}.lora_up.weight"] = (up.to(torch.float32) * (rank / top)).to(up.dtype).contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(top), dtype=torch.float32)
    return state


def _refuse_missing(family: str, missing: list[str]) -> None:
    if missing:
        raise UnsupportedKohya(
            f"These adapted modules have no {family.upper()} kohya name:",
            problems=missing,
            hint="Use the diffusers file (--format diffusers), or train without these modules.",
        )


def kohya_state_dict(
    family: str, deltas: Mapping[str, LoraDelta], denoiser_config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The denoiser's LoRA in kohya naming (``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``).

    Args:
        family: ``"flux"``, ``"sd3"`` or ``"sdxl"``.
        deltas: module (relative to the denoiser) -> delta.
        denoiser_config: the denoiser's ``config.json`` (block layout and widths).

    Returns:
        The state dict to save (alpha = rank, scale folded into the up weights).

    Raises:
        UnsupportedKohya: SD3 (no kohya naming that diffusers reads), or modules without a kohya name.
    """
    if family == "sdxl":
        return _uniform_alpha(_sdxl_kohya(deltas, denoiser_config))
    if family == "flux":
        return _uniform_alpha(_flux_kohya(deltas, denoiser_config))
    raise UnsupportedKohya(
        f"No kohya naming is written for {family.upper()} pipelines: no image tool and diffusers "
        "agree on one.",
        hint="Use the diffusers file (--format diffusers): ComfyUI and Forge load "
        "SD3 LoRAs in that naming directly.",
    )


def kohya_metadata(family: str, state: Mapping[str, torch.Tensor], version: str) -> dict[str, str]:
    """The few ``ss_*`` header fields kohya-style tools show (network type, rank, base model)."""
    ranks = sorted({int(v.shape[0]) for k, v in state.items() if k.endswith(".lora_down.weight")})
    return {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[-1] if ranks else 0),
        "ss_network_alpha": str(ranks[-1] if ranks else 0),  # = the uniform alpha (see _uniform_alpha)
        "ss_base_model_version": KOHYA_BASE_MODEL.get(family, family),
        "emloc_version": version,
        "emloc_note": "LoRA scale folded into lora_up; one alpha (the largest rank) for all modules",
    }
