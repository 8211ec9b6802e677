"""The shape facts of a model that memory planning needs, from ``config.json`` and safetensors headers.

No weights are read: a safetensors header is a few KiB of JSON at the start of each shard, and
``config.json`` gives the widths (both read by :mod:`emloc_engine.weights.headers`). This module
imports neither torch nor safetensors, so :mod:`emloc_engine.run.planning` stays pure arithmetic.

Reference configurations of popular models (``REFERENCE_CONFIGS``) let the planner answer
"would Llama-3-8B fit?" without the model on disk, and drive the GPU benchmark.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from emloc_engine.core.dtypes import ELEMENT_BYTES, dtype_name, element_bytes
from emloc_engine.core.errors import ModelNotFound, UnsupportedModel
from emloc_engine.vision.facts import VisionFacts, vision_facts
from emloc_engine.vision.families import is_vision_language, vlm_spec
from emloc_engine.weights.headers import read_config, read_safetensors_header

# Families whose config omits tie_word_embeddings and whose default is to tie.
_TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3_text"}
_QKV_BIAS_FAMILIES = {"qwen2", "qwen2_vl", "qwen2_5_vl"}


@dataclass(frozen=True)
class ModuleShape:
    """One compressible linear module of a decoder block (name relative to the block)."""

    name: str
    out_features: int
    in_features: int
    bias: bool = False

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class ModelFacts:
    """Everything the planner needs about a model; all counts are parameters, not bytes.

    Attributes:
        modules: the compressible linear modules of ONE block (every block has the same shapes).
        num_parameters: every stored parameter (tied embeddings counted once).
        dtype: storage dtype of most parameters, torch-style (``"bfloat16"``).
        source: ``"headers"`` (shapes read from safetensors headers) or ``"config"`` (computed).
    """

    name: str
    model_type: str
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    dtype: str
    num_parameters: int
    modules: tuple[ModuleShape, ...]
    max_position_embeddings: int | None = None
    quantization: str | None = None
    source: str = "config"
    model_dir: str | None = None
    vision: VisionFacts | None = None

    @property
    def kind(self) -> str:
        """``"vision-language"`` for a model with a vision tower, else ``"text"``."""
        return "text" if self.vision is None else "vision-language"

    @property
    def dtype_bytes(self) -> int:
        return element_bytes(self.dtype)

    @property
    def linear_parameters_per_block(self) -> int:
        """Σ out·in over the compressible modules of one block (biases excluded)."""
        return sum(m.numel for m in self.modules)

    @property
    def linear_parameters(self) -> int:
        return self.num_layers * self.linear_parameters_per_block

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_parameters(self) -> int:
        """Separate output projection (0 when tied to the embeddings)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def dense_parameters(self) -> int:
        """Never compressed: embeddings, lm_head, norms, biases."""
        return self.num_parameters - self.linear_parameters

    @property
    def block_parameters(self) -> int:
        """Parameters of one decoder block, norms and biases included."""
        vision = self.vision.num_parameters if self.vision is not None else 0
        return (self.num_parameters - vision - self.embedding_parameters - self.lm_head_parameters
                - self.hidden_size) // max(1, self.num_layers)


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs nest the decoder under ``text_config``; fall back to the top level."""
    inner = config.get("text_config")
    if isinstance(inner, dict) and inner.get("hidden_size"):
        merged = dict(config)
        merged.update(inner)
        return merged
    return config


def _req(cfg: dict[str, Any], key: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or value <= 0:
        raise UnsupportedModel(f"config.json has no usable {key!r} (got {value!r}).",
                               hint="Use a standard transformers decoder config.")
    return value


def _config_modules(cfg: dict[str, Any], module_names: tuple[str, ...]) -> tuple[ModuleShape, ...]:
    h, a = _req(cfg, "hidden_size"), _req(cfg, "num_attention_heads")
    kv = int(cfg.get("num_key_value_heads") or a)
    d = int(cfg.get("head_dim") or h // a)
    inter = _req(cfg, "intermediate_size")
    qkv_bias = bool(cfg.get("attention_bias")) or cfg.get("model_type") in _QKV_BIAS_FAMILIES
    shapes = {
        "self_attn.q_proj": (a * d, h, qkv_bias), "self_attn.k_proj": (kv * d, h, qkv_bias),
        "self_attn.v_proj": (kv * d, h, qkv_bias), "self_attn.o_proj": (h, a * d, bool(cfg.get("attention_bias"))),
        "self_attn.qkv_proj": ((a + 2 * kv) * d, h, False),
        "mlp.gate_proj": (inter, h, False), "mlp.up_proj": (inter, h, False), "mlp.down_proj": (h, inter, False),
        "mlp.gate_up_proj": (2 * inter, h, False),
    }
    return tuple(ModuleShape(n, *shapes[n]) for n in module_names)


def _header_modules(tensors: dict[str, tuple[str, tuple[int, ...]]], prefix: str,
                    module_names: tuple[str, ...]) -> tuple[ModuleShape, ...] | None:
    out = []
    for n in module_names:
        entry = tensors.get(f"{prefix}.0.{n}.weight")
        if entry is None or len(entry[1]) != 2:
            return None
        out.append(ModuleShape(n, entry[1][0], entry[1][1], f"{prefix}.0.{n}.bias" in tensors))
    return tuple(out)


def facts_from_config(config: dict[str, Any], *, tensors: dict[str, tuple[str, tuple[int, ...]]] | None = None,
                      name: str = "", model_dir: Path | None = None,
                      preprocessor: dict[str, Any] | None = None) -> ModelFacts:
    """Build :class:`ModelFacts` from a config dict and (optionally) header shapes.

    Args:
        config: the parsed ``config.json``.
        tensors: ``{tensor_name: (safetensors_dtype, shape)}`` from the headers; when given, the
            parameter count, dtype, tying and module shapes come from it (exact).
        name: a display name.
        model_dir: where the model lives, for the record.
        preprocessor: a VLM's ``preprocessor_config.json`` (its default image resolution).

    Returns:
        The facts.

    Raises:
        UnsupportedModel: unknown architecture or a config without the needed widths.
    """
    from emloc_engine.core.architectures import arch_spec

    cfg = _text_config(config)
    vision = None
    if is_vision_language(config):  # the language model's facts, plus the vision tower's
        vision = vision_facts(config, tensors, preprocessor)
        spec = replace(arch_spec({"model_type": "llama"}), family=str(config.get("model_type")),
                       block_prefix=vlm_spec(config).language.checkpoint_prefix)
        cfg = dict(cfg, model_type=config.get("model_type"))
    else:
        spec = arch_spec(cfg)
    model_type = str(cfg.get("model_type"))
    h, layers, a = _req(cfg, "hidden_size"), _req(cfg, "num_hidden_layers"), _req(cfg, "num_attention_heads")
    kv = int(cfg.get("num_key_value_heads") or a)
    d = int(cfg.get("head_dim") or h // a)
    inter, vocab = _req(cfg, "intermediate_size"), _req(cfg, "vocab_size")
    tied = bool(cfg.get("tie_word_embeddings", model_type in _TIED_BY_DEFAULT))
    quant = cfg.get("quantization_config")
    quantization = str(quant.get("quant_method", "unknown")) if isinstance(quant, dict) else None
    modules = _config_modules(cfg, spec.linear_modules)
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    source = "config"
    if tensors:
        source = "headers"
        tied = not any(k == "lm_head.weight" or k.endswith(".lm_head.weight") for k in tensors)
        modules = _header_modules(tensors, spec.block_prefix, spec.linear_modules) or modules
        count: dict[str, int] = {}
        total = 0
        for st_dtype, shape in tensors.values():
            n = 1
            for s in shape:
                n *= s
            total += n
            count[st_dtype] = count.get(st_dtype, 0) + n
        dominant = max(count, key=lambda k: count[k])
        dtype = dtype_name(dominant)
        num_parameters = total
    else:
        block = sum(m.numel + (m.out_features if m.bias else 0) for m in modules) + 2 * h
        num_parameters = layers * block + vocab * h * (1 if tied else 2) + h
        num_parameters += vision.num_parameters if vision is not None else 0
    if dtype not in ELEMENT_BYTES:
        dtype = "bfloat16"
    arch = cfg.get("architectures") or [""]
    return ModelFacts(
        name=name or str(arch[0]) or model_type, model_type=model_type, architecture=str(arch[0]),
        hidden_size=h, num_layers=layers, num_heads=a, num_kv_heads=kv, head_dim=d, intermediate_size=inter,
        vocab_size=vocab, tie_word_embeddings=tied, dtype=dtype, num_parameters=num_parameters, modules=modules,
        max_position_embeddings=cfg.get("max_position_embeddings"), quantization=quantization, source=source,
        model_dir=str(model_dir) if model_dir else None, vision=vision,
    )


def read_tensor_shapes(model_dir: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` from every ``*.safetensors`` header in a folder, or from the GGUF of a
    model view (no data read).

    Raises:
        ModelNotFound: a shard's header is truncated or unreadable.
    """
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    from emloc_engine.weights.gguf_source import is_gguf_view, open_view_tensors

    if is_gguf_view(Path(model_dir)):  # the weights' shapes are in the GGUF; dtypes as the stages see them
        source = open_view_tensors(Path(model_dir))
        return {n: (source.storage_dtype(n), t.shape) for n, t in source.tensors.items()}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        for key, entry in read_safetensors_header(f).tensors.items():
            if isinstance(entry, dict):
                out[key] = (str(entry.get("dtype")), tuple(int(s) for s in entry.get("shape", ())))
    return out


def read_model_facts(model_dir: Path) -> ModelFacts:
    """:class:`ModelFacts` of a model folder from its config and safetensors headers (no weights).

    Args:
        model_dir: a folder with ``config.json`` and (optionally) ``*.safetensors`` shards.

    Returns:
        The facts; ``source == "headers"`` when shards were found.

    Raises:
        ModelNotFound: missing/bad config or unreadable shard headers.
        UnsupportedModel: unknown architecture.
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    return facts_from_config(config, tensors=read_tensor_shapes(model_dir), name=model_dir.name,
                             model_dir=model_dir, preprocessor=read_preprocessor(model_dir))


def read_preprocessor(model_dir: Path) -> dict[str, Any] | None:
    """A VLM folder's ``preprocessor_config.json`` as a dict (None when absent or unreadable)."""
    f = Path(model_dir) / "preprocessor_config.json"
    try:
        data = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _llama_like(model_type: str, arch: str, h: int, inter: int, layers: int, heads: int, kv: int,
                vocab: int, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"model_type": model_type, "architectures": [arch], "hidden_size": h,
                           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
                           "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": False,
                           "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5}
    cfg.update(extra)
    return cfg


REFERENCE_CONFIGS: dict[str, dict[str, Any]] = {
    "Llama-3-8B": _llama_like("llama", "LlamaForCausalLM", 4096, 14336, 32, 32, 8, 128256,
                              rope_theta=500000.0, max_position_embeddings=8192),
    "Qwen2.5-7B": _llama_like("qwen2", "Qwen2ForCausalLM", 3584, 18944, 28, 28, 4, 152064,
                              rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6),
    "Mistral-7B": _llama_like("mistral", "MistralForCausalLM", 4096, 14336, 32, 32, 8, 32000,
                              rope_theta=10000.0, max_position_embeddings=32768, sliding_window=None),
    "Qwen2.5-0.5B": _llama_like("qwen2", "Qwen2ForCausalLM", 896, 4864, 24, 14, 2, 151936,
                                tie_word_embeddings=True, max_position_embeddings=32768, rms_norm_eps=1e-6),
    "SmolLM2-135M": _llama_like("llama", "LlamaForCausalLM", 576, 1536, 30, 9, 3, 49152,
                                tie_word_embeddings=True, max_position_embeddings=8192),
    "Qwen2.5-14B": _llama_like("qwen2", "Qwen2ForCausalLM", 5120, 13824, 48, 40, 8, 152064,
                               rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6),
    "Qwen2.5-32B": _llama_like("qwen2", "Qwen2ForCausalLM", 5120, 27648, 64, 40, 8, 152064,
                               rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6),
    "Llama-3-70B": _llama_like("llama", "LlamaForCausalLM", 8192, 28672, 80, 64, 8, 128256,
                               rope_theta=500000.0, max_position_embeddings=8192),
}
"""Public shapes of well-known models (no weights), for "what if" plans and the GPU benchmark."""


def reference_facts(name: str) -> ModelFacts:
    """:class:`ModelFacts` of a model in :data:`REFERENCE_CONFIGS`.

    Raises:
        ModelNotFound: unknown name (the message lists the known ones).
    """
    if name not in REFERENCE_CONFIGS:
        raise ModelNotFound(f"No reference config named {name!r}.", hint=f"Known: {', '.join(REFERENCE_CONFIGS)}.")
    return facts_from_config(REFERENCE_CONFIGS[name], name=name)
