"""What the engine knows about each supported vision-language family (transformers-native, no remote code).

A VLM is a vision tower (a ViT: blocks of attention + MLP linears), a projector into the language
model's width, and a decoder-only language model. EMLoC compresses the linears of the vision
tower's blocks and of the language model's blocks (the paper compresses the ViT and the LLM) and
keeps everything else dense: patch/position embeddings, the projector, the token embeddings, norms,
the head and, for SigLIP towers, the attention-pooling head (Gemma 3 and LLaVA-OneVision never use
it for their image features).

Each tower has two names for the same block: where its tensors are in the checkpoint
(``checkpoint_prefix``, the hub's layout: ``visual.blocks`` for Qwen2-VL, ``language_model.model.layers``
for LLaVA...) and where the module is in a transformers ≥ 5 model (``module_prefix``:
``model.visual.blocks``, ``model.language_model.layers``...). transformers converts one into the
other when it loads and saves; the emulator reads tensors by checkpoint name and hooks modules by
module name, and adapters name modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from emloc_engine.core.architectures import _LLAMA_LIKE, InputGroup
from emloc_engine.core.errors import UnsupportedModel


@dataclass(frozen=True)
class Tower:
    """The blocks of one tower (vision or language) and their compressible linears."""

    checkpoint_prefix: str
    module_prefix: str
    groups: tuple[InputGroup, ...]
    num_blocks: int

    @property
    def linear_modules(self) -> tuple[str, ...]:
        return tuple(m for g in self.groups for m in g.modules)

    def tensor_name(self, block: int, module: str) -> str:
        """Checkpoint name of a module's weight, e.g. ``visual.blocks.3.attn.qkv.weight``."""
        return f"{self.checkpoint_prefix}.{block}.{module}.weight"

    def module_name(self, block: int, module: str) -> str:
        """Module name in a transformers ≥ 5 model, e.g. ``model.visual.blocks.3.attn.qkv``."""
        return f"{self.module_prefix}.{block}.{module}"


@dataclass(frozen=True)
class VisionLanguageSpec:
    """One VLM family: its two towers (what is dense is everything else)."""

    family: str
    vision: Tower
    language: Tower

    @property
    def towers(self) -> tuple[Tower, Tower]:
        return (self.vision, self.language)


_VIT = (  # CLIP, SigLIP and Idefics3's SigLIP
    InputGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    InputGroup("attn_out", ("self_attn.out_proj",)),
    InputGroup("mlp_in", ("mlp.fc1",)),
    InputGroup("mlp_out", ("mlp.fc2",)),
)
_INTERN_VIT = (
    InputGroup("attn_in", ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
    InputGroup("attn_out", ("attention.projection_layer",)),
    InputGroup("mlp_in", ("mlp.fc1",)),
    InputGroup("mlp_out", ("mlp.fc2",)),
)
_QWEN2_VIT = (
    InputGroup("attn_in", ("attn.qkv",)),
    InputGroup("attn_out", ("attn.proj",)),
    InputGroup("mlp_in", ("mlp.fc1",)),
    InputGroup("mlp_out", ("mlp.fc2",)),
)
_QWEN25_VIT = (
    InputGroup("attn_in", ("attn.qkv",)),
    InputGroup("attn_out", ("attn.proj",)),
    InputGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj")),
    InputGroup("mlp_out", ("mlp.down_proj",)),
)

# model_type -> (vision ckpt prefix, vision module prefix, vision groups, LM ckpt prefix, LM module prefix)
_LAYOUTS: dict[str, tuple[str, str, tuple[InputGroup, ...], str, str]] = {
    "qwen2_vl": (
        "visual.blocks",
        "model.visual.blocks",
        _QWEN2_VIT,
        "model.layers",
        "model.language_model.layers",
    ),
    "qwen2_5_vl": (
        "visual.blocks",
        "model.visual.blocks",
        _QWEN25_VIT,
        "model.layers",
        "model.language_model.layers",
    ),
    **{
        t: (
            "vision_tower.encoder.layers",
            "model.vision_tower.encoder.layers",
            _VIT,
            "language_model.model.layers",
            "model.language_model.layers",
        )
        for t in ("llava", "llava_next", "llava_onevision", "gemma3")
    },
    "internvl": (
        "vision_tower.encoder.layer",
        "model.vision_tower.encoder.layer",
        _INTERN_VIT,
        "language_model.model.layers",
        "model.language_model.layers",
    ),
    **{
        t: (
            "model.vision_model.encoder.layers",
            "model.vision_model.encoder.layers",
            _VIT,
            "model.text_model.layers",
            "model.text_model.layers",
        )
        for t in ("idefics3", "smolvlm")
    },
}

VLM_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_LAYOUTS))
"""Vision-language ``model_type`` values the engine supports."""


def _get(config: dict[str, Any] | Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def is_vision_language(config: dict[str, Any] | Any) -> bool:
    """True for a config with a vision tower (``vision_config``), supported or not."""
    return _get(config, "vision_config") is not None


def vision_blocks(vision_config: dict[str, Any] | Any) -> int:
    """Blocks of a vision tower config (``depth`` for Qwen's ViT, else ``num_hidden_layers``)."""
    n = _get(vision_config, "depth") or _get(vision_config, "num_hidden_layers")
    if not isinstance(n, int) or n <= 0:
        raise UnsupportedModel("The vision tower's config has no block count (depth / num_hidden_layers).")
    return n


def vlm_spec(config: dict[str, Any] | Any) -> VisionLanguageSpec:
    """The :class:`VisionLanguageSpec` of a VLM config (``config.json`` dict or ``PretrainedConfig``).

    Raises:
        UnsupportedModel: not a VLM the engine knows (the hint lists those it knows).
    """
    model_type = _get(config, "model_type")
    if model_type not in _LAYOUTS:
        raise UnsupportedModel(
            f"Vision-language model type {model_type!r} is not supported.",
            hint=f"Supported vision-language families: {', '.join(VLM_MODEL_TYPES)}.",
        )
    v_ckpt, v_mod, v_groups, l_ckpt, l_mod = _LAYOUTS[str(model_type)]
    text, vision = _get(config, "text_config"), _get(config, "vision_config")
    if text is None or vision is None:
        raise UnsupportedModel(f"The {model_type} config lacks text_config or vision_config.")
    lm_blocks = _get(text, "num_hidden_layers")
    if not isinstance(lm_blocks, int) or lm_blocks <= 0:
        raise UnsupportedModel("The language model's config has no num_hidden_layers.")
    return VisionLanguageSpec(
        str(model_type),
        Tower(v_ckpt, v_mod, v_groups, vision_blocks(vision)),
        Tower(l_ckpt, l_mod, _LLAMA_LIKE, lm_blocks),
    )


__all__ = [
    "VLM_MODEL_TYPES",
    "Tower",
    "VisionLanguageSpec",
    "is_vision_language",
    "vision_blocks",
    "vlm_spec",
]
