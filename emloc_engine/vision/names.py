"""Checkpoint tensor names ↔ module names of a VLM in transformers ≥ 5.

Hub checkpoints keep the historical layout (``visual.blocks.0…`` and ``model.layers.0…`` for
Qwen2-VL, ``language_model.model.layers.0…`` and ``vision_tower…`` for LLaVA-style models);
transformers ≥ 5 renames them when it loads (``model.visual…``, ``model.language_model.layers…``,
``lm_head``) and renames them back when it saves. The emulator stores module names, so it loads
without any renaming; reading the source checkpoint goes through :func:`module_key`.
"""

from __future__ import annotations

from collections.abc import Iterable

# model_type -> ordered (checkpoint prefix, module prefix) rules; the first that matches applies.
_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "qwen2_vl": (("visual.", "model.visual."), ("model.", "model.language_model."), ("lm_head.", "lm_head.")),
    "llava": (
        ("language_model.lm_head.", "lm_head."),
        ("language_model.model.", "model.language_model."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("image_newline", "model.image_newline"),
    ),
    "idefics3": (),
}
_RULES["qwen2_5_vl"] = _RULES["qwen2_vl"]
for _t in ("llava_next", "llava_onevision", "internvl", "gemma3"):
    _RULES[_t] = _RULES["llava"]
_RULES["smolvlm"] = _RULES["idefics3"]


def module_key(model_type: str, name: str, module_keys: set[str]) -> str:
    """The model's state-dict key of a checkpoint tensor (unchanged when it already is one)."""
    if name in module_keys:
        return name
    for old, new in _RULES.get(model_type, ()):
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def module_keys_of(model_type: str, names: Iterable[str], module_keys: set[str]) -> dict[str, str]:
    """``{checkpoint name: module key}`` for every name."""
    return {n: module_key(model_type, n, module_keys) for n in names}


__all__ = ["module_key", "module_keys_of"]
