"""Shape facts of a VLM's vision tower and of its images, from configs and headers (no torch, no weights).

The planner needs, per image: how many patches go through the vision tower (its activations) and
how many tokens reach the language model (they sit in the context like text tokens and usually
dominate it). Both depend on the image's resolution; we count them at the processor's default
resolution (``preprocessor_config.json`` when present, else the vision config's ``image_size``),
the setting a user who does not resize gets:

* Qwen2-VL / Qwen2.5-VL: dynamic resolution; at the processor's ``max_pixels`` (its default
  1003520 ≈ 1002², where a phone photo lands) capped to 1024²: patches = pixels / 14², tokens =
  patches / merge² (a 1024×1024 image measured 70² patches, 1225 tokens).
* LLaVA 1.5: (image_size / patch)² (+1 CLS) patches, ``image_seq_length`` tokens.
* LLaVA-NeXT / OneVision: anyres, base tile + up to 4 tiles at the largest grid: 5 tiles.
* InternVL: ``max_patches`` tiles (+1 thumbnail) when ``crop_to_patches``, 1 otherwise; 256 tokens
  per tile after the pixel shuffle.
* Idefics3 / SmolVLM: splits into ``longest_edge / max_image_size`` tiles² + 1 global image.
* Gemma 3: one 896² image, ``mm_tokens_per_image`` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from emloc_engine.vision.families import vision_blocks, vlm_spec


@dataclass(frozen=True)
class VisionFacts:
    """The vision tower's shapes and the per-image token counts at the default resolution."""

    num_blocks: int
    hidden_size: int
    intermediate_size: int
    num_parameters: int
    linear_parameters_per_block: int
    patches_per_image: int
    tokens_per_image: int
    block_prefix: str


def _size(value: Any, default: int) -> int:
    if isinstance(value, (list, tuple)) and value:
        return int(value[0])
    if isinstance(value, dict):
        for k in ("height", "longest_edge", "shortest_edge"):
            if isinstance(value.get(k), int):
                return int(value[k])
    return int(value) if isinstance(value, int) else default


def image_counts(config: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> tuple[int, int]:
    """(vision-tower patches, language-model tokens) per image at the processor's default resolution."""
    pre = preprocessor or {}
    vc: dict[str, Any] = config.get("vision_config") or {}
    mt = config.get("model_type")
    patch = _size(vc.get("patch_size"), 14)
    if mt in ("qwen2_vl", "qwen2_5_vl"):
        merge = int(vc.get("spatial_merge_size") or 2)
        pixels = min(
            int(pre.get("max_pixels") or (pre.get("size") or {}).get("longest_edge") or 1003520), 1 << 20
        )
        patches = pixels // (patch * patch)
        return patches, patches // (merge * merge)
    side = _size(vc.get("image_size"), 224) // patch
    if mt == "llava":
        return side * side + 1, int(config.get("image_seq_length") or side * side)
    if mt in ("llava_next", "llava_onevision"):
        return 5 * (side * side + 1), 5 * side * side
    if mt == "internvl":
        tiles = 1 + int(pre.get("max_patches") or 12) if pre.get("crop_to_patches") else 1
        ratio = float(config.get("downsample_ratio") or 0.5)
        return tiles * (side * side + 1), tiles * int(side * side * ratio * ratio)
    if mt in ("idefics3", "smolvlm"):
        longest = _size(pre.get("size"), 4 * 364)
        tile = _size(pre.get("max_image_size"), _size(vc.get("image_size"), 364))
        tiles = math.ceil(longest / tile) ** 2 + 1 if pre.get("do_image_splitting", True) else 1
        scale = int(config.get("scale_factor") or 2)
        return tiles * side * side, tiles * (side * side // (scale * scale))
    if mt == "gemma3":
        return side * side, int(config.get("mm_tokens_per_image") or 256)
    return side * side, side * side


def vision_facts(
    config: dict[str, Any],
    tensors: dict[str, tuple[str, tuple[int, ...]]] | None = None,
    preprocessor: dict[str, Any] | None = None,
) -> VisionFacts:
    """:class:`VisionFacts` of a VLM config; exact parameter counts when header ``tensors`` are given.

    Raises:
        UnsupportedModel: not a supported VLM family.
    """
    spec = vlm_spec(config)
    vc: dict[str, Any] = config.get("vision_config") or {}
    h = int(vc.get("embed_dim") or vc.get("hidden_size") or 0)
    inter = int(vc.get("intermediate_size") or h * int(vc.get("mlp_ratio") or 4))
    blocks = vision_blocks(vc)
    tower = spec.vision
    per_block = 0
    params = 0
    if tensors:
        for m in tower.linear_modules:
            entry = tensors.get(tower.tensor_name(0, m))
            if entry is not None and len(entry[1]) == 2:
                per_block += entry[1][0] * entry[1][1]
        vision_roots = (tower.checkpoint_prefix.split(".encoder")[0].rsplit(".blocks", 1)[0],)
        for name, (_, shape) in tensors.items():
            if name.startswith(vision_roots):
                params += math.prod(shape)
    else:
        per_block = 4 * h * h + (3 if len(tower.groups[2].modules) > 1 else 2) * h * inter
        params = blocks * (per_block + 9 * h)
    patches, tokens = image_counts(config, preprocessor)
    return VisionFacts(blocks, h, inter, params, per_block, patches, tokens, tower.checkpoint_prefix)


__all__ = ["VisionFacts", "image_counts", "vision_facts"]
