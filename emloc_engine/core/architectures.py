"""What the engine knows about each supported decoder architecture.

For every ``model_type`` this says where the decoder blocks live in the checkpoint, which linear
modules a block has, and which of them read the same input (they share one calibration
statistic ``C = Σ XᵀX``). Everything else in a checkpoint (embeddings, norms, lm_head, biases) is
never compressed.

Names are relative to a block, e.g. ``self_attn.q_proj``; the full module name is
``f"{block_prefix}.{i}.{name}"`` and its weight tensor ``f"{...}.weight"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from emloc_engine.core.errors import UnsupportedModel


@dataclass(frozen=True)
class InputGroup:
    """Linear modules of one block that read the same activation."""

    name: str
    modules: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    """The decoder layout of one architecture family."""

    family: str
    block_prefix: str
    groups: tuple[InputGroup, ...]

    @property
    def linear_modules(self) -> tuple[str, ...]:
        """Every compressible linear module of a block, in execution order."""
        return tuple(m for g in self.groups for m in g.modules)

    @property
    def short_names(self) -> tuple[str, ...]:
        """Leaf names (``q_proj``...), as peft's ``target_modules`` expects them."""
        return tuple(m.rsplit(".", 1)[-1] for m in self.linear_modules)

    def module_name(self, block: int, module: str) -> str:
        return f"{self.block_prefix}.{block}.{module}"


_LLAMA_LIKE = (
    InputGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    InputGroup("attn_out", ("self_attn.o_proj",)),
    InputGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj")),
    InputGroup("mlp_out", ("mlp.down_proj",)),
)

_PHI3 = (
    InputGroup("attn_in", ("self_attn.qkv_proj",)),
    InputGroup("attn_out", ("self_attn.o_proj",)),
    InputGroup("mlp_in", ("mlp.gate_up_proj",)),
    InputGroup("mlp_out", ("mlp.down_proj",)),
)

# model_type -> spec. Llama-like families share one layout.
_SPECS: dict[str, ArchSpec] = {
    **{
        t: ArchSpec(t, "model.layers", _LLAMA_LIKE)
        for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite", "olmo2")
    },
    "phi3": ArchSpec("phi3", "model.layers", _PHI3),
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_SPECS))


def arch_spec(config: dict[str, Any] | Any) -> ArchSpec:
    """The :class:`ArchSpec` for a model config (a ``config.json`` dict or a ``PretrainedConfig``).

    Raises:
        UnsupportedModel: the model type is not one the engine knows, with the list it knows.
    """
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in _SPECS:
        vision = config.get("vision_config") if isinstance(config, dict) else getattr(config, "vision_config", None)
        if vision is not None:  # a VLM: the orchestrator runs its own stages (emloc_engine.run.vision_stages)
            raise UnsupportedModel(
                f"{model_type!r} is a vision-language model; this stage handles text models only.",
                hint="Fine-tune it with `emloc run MODEL DATA --out RUN` (images + conversations).",
            )
        if model_type is None:
            raise UnsupportedModel(
                "The model's config.json names no model_type, so its architecture is unknown.",
                hint="Use the config.json the model was published with (it has \"model_type\": \"llama\" or "
                     f"another family: {', '.join(SUPPORTED_MODEL_TYPES)}).",
            )
        raise UnsupportedModel(
            f"Model type {model_type!r} is not supported.",
            hint=f"Supported decoder families: {', '.join(SUPPORTED_MODEL_TYPES)}.",
        )
    return _SPECS[str(model_type)]


def num_blocks(config: dict[str, Any] | Any) -> int:
    """Number of decoder blocks (``num_hidden_layers``)."""
    if isinstance(config, dict):
        return int(config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers"))
    return int(config.num_hidden_layers)
