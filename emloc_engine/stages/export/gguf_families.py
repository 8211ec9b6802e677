"""Which model families the GGUF writers handle, and what llama.cpp's converter does differently for each.

What llama.cpp's ``convert_hf_to_gguf.py`` does per family, kept to what changes the file:

* ``llama``/``mistral`` (``LlamaModel``) and ``granite`` (``GraniteModel(LlamaModel)``): q/k rows permuted
  from HF's rotate-half layout to GGML's interleaved pairs; ``rope.dimension_count``; Granite adds its
  four multipliers (``attention.scale``, ``embedding_scale``, ``residual_scale``, ``logit_scale``).
* ``qwen2``, ``qwen3`` (``q_norm``/``k_norm``), ``olmo2`` (post-norms, ``q_norm``/``k_norm``): NEOX rope, no
  permutation.
* ``gemma`` (``GemmaModel``): RMSNorm weights stored as ``1 + w`` (Gemma multiplies by ``1 + w``); the
  head is tied to the embeddings; ``attention.key_length``/``value_length`` always written.
* ``gemma2`` (``Gemma2Model``): as Gemma, plus its post-attention/post-FFN norms and
  ``attn_logit_softcapping``, ``final_logit_softcapping``, ``attention.sliding_window``. llama.cpp scales
  queries by ``1/√head_dim`` (``1/√(hidden/heads)`` for the 27B), so a ``query_pre_attn_scalar`` that is
  neither is refused.
* ``phi3`` (``Phi3MiniModel``): the fused ``qkv_proj`` and ``gate_up_proj`` stay fused (``attn_qkv``,
  ``ffn_up``); ``rope.dimension_count``, ``rope.scaling.original_context_length`` and ``attention.sliding_window``.

* ``gemma3_text`` (``Gemma3Model``): as Gemma (q/k norms too are ``1 + w``), the global layers' rope base
  and linear scaling, ``attention.sliding_window``. llama.cpp fixes the rest: every 6th layer global, the
  local layers' rope base 10000, the query scale as Gemma 2's; a model that differs is refused.

Whatever a family needs that these writers do not write is refused with the missing piece named, before
any training (:func:`family_problem`, called when the run is planned).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GgufFamily:
    """How one Hugging Face ``model_type`` is written as GGUF.

    Attributes:
        arch: llama.cpp's ``general.architecture``.
        permute_qk: q/k rows go from rotate-half to interleaved rope pairs (Llama-style rope).
        norm_plus_one: RMSNorm weights are stored as ``1 + w`` (Gemma).
        transformers_reads: the installed transformers loads this architecture from a GGUF (else the
            verification reads the tensors back itself).
        tied_by_default: ``tie_word_embeddings`` when the config does not say.
    """

    arch: str
    permute_qk: bool
    norm_plus_one: bool = False
    transformers_reads: bool = True
    tied_by_default: bool = False


GGUF_FAMILIES: dict[str, GgufFamily] = {
    "llama": GgufFamily("llama", True),
    "mistral": GgufFamily("llama", True),
    "granite": GgufFamily("granite", True, transformers_reads=False),
    "qwen2": GgufFamily("qwen2", False),
    "qwen3": GgufFamily("qwen3", False),
    "olmo2": GgufFamily("olmo2", False, transformers_reads=False),
    "gemma": GgufFamily("gemma", False, norm_plus_one=True, transformers_reads=False, tied_by_default=True),
    # transformers' reader leaves query_pre_attn_scalar at its default: our read-back verifies instead.
    "gemma2": GgufFamily("gemma2", False, norm_plus_one=True, transformers_reads=False, tied_by_default=True),
    "gemma3_text": GgufFamily("gemma3", False, norm_plus_one=True, transformers_reads=False, tied_by_default=True),
    "phi3": GgufFamily("phi3", False),
}

# Families training supports that the GGUF writers refuse, with the missing piece.
MISSING_PIECES: dict[str, str] = {}


def family_of(config: dict[str, Any]) -> GgufFamily | None:
    return GGUF_FAMILIES.get(str(config.get("model_type")))


def is_tied(config: dict[str, Any]) -> bool:
    fam = family_of(config)
    return bool(config.get("tie_word_embeddings", fam.tied_by_default if fam else False))


def rope_params(config: dict[str, Any]) -> dict[str, Any]:
    """The rope parameters (of the global layers, where a model has one set per layer type)."""
    rp = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if isinstance(rp, dict) and isinstance(rp.get("full_attention"), dict):
        rp = rp["full_attention"]
    return dict(rp) if isinstance(rp, dict) else {}


def rope_theta(config: dict[str, Any]) -> float:
    return float(rope_params(config).get("rope_theta") or config.get("rope_theta") or 10000.0)


def family_problem(config: dict[str, Any]) -> str | None:
    """Why a model's family cannot be written as GGUF (``None`` when it can)."""
    mt = config.get("model_type")
    if mt in MISSING_PIECES:
        return MISSING_PIECES[str(mt)]
    if mt not in GGUF_FAMILIES:
        return (f"GGUF export supports the {', '.join(sorted(GGUF_FAMILIES))} families, not {mt!r} "
                "(use llama.cpp's convert_hf_to_gguf.py on the merged folder)")
    if mt in ("gemma2", "gemma3_text"):
        heads, head_dim = int(config["num_attention_heads"]), int(config.get("head_dim") or 256)
        scalar = config.get("query_pre_attn_scalar")
        if scalar is not None and int(scalar) not in (head_dim, int(config["hidden_size"]) // heads):
            return (f"query_pre_attn_scalar={scalar} is neither head_dim nor hidden_size/heads, and llama.cpp "
                    "scales Gemma queries by one of those")
    if mt == "gemma3_text":
        problem = _gemma3_problem(config)
        if problem:
            return problem
    rope = rope_params(config)
    rtype = rope.get("rope_type") or rope.get("type") or "default"
    if rtype in ("longrope", "su"):
        return ("LongRoPE (Phi-3 128k / Phi-3.5: the rope_factors_long/short tensors and attention factor) "
                "is not written by this GGUF exporter")
    if rtype not in ("default", "linear", "llama3", "yarn"):
        return f"rope scaling {rtype!r} is not supported by this GGUF exporter"
    return None


def _gemma3_problem(config: dict[str, Any]) -> str | None:
    """What llama.cpp's Gemma 3 graph fixes that this model does differently."""
    n = int(config["num_hidden_layers"])
    want = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    if config.get("layer_types") and list(config["layer_types"]) != want:
        return ("its sliding-window layer pattern differs from llama.cpp's fixed one (every 6th layer global; "
                "the gemma3.attention.sliding_window_pattern key is not written by this exporter)")
    rp = config.get("rope_parameters") or {}
    local = rp.get("sliding_attention") if isinstance(rp, dict) else None
    base = float((local or {}).get("rope_theta") or config.get("rope_local_base_freq") or 10000.0)
    if base != 10000.0 or (local or {}).get("rope_type", "default") != "default":
        return (f"its local layers' rope (base {base:g}) differs from llama.cpp's fixed 10000 "
                "(gemma3.rope.freq_base_swa is not written by this exporter)")
    if config.get("attn_logit_softcapping") is not None:
        return "attention logit soft-capping, which llama.cpp's Gemma 3 graph does not have"
    return None


def add_family_hparams(w: Any, config: dict[str, Any], fam: GgufFamily, head_dim: int) -> None:
    """The keys llama.cpp's converter adds for this family beyond the common ones."""
    if fam.arch in ("llama", "granite"):
        w.add_rope_dimension_count(head_dim)
    if fam.arch == "granite":
        for key, add in (("attention_multiplier", w.add_attention_scale), ("embedding_multiplier", w.add_embedding_scale),
                         ("residual_multiplier", w.add_residual_scale), ("logits_scaling", w.add_logit_scale)):
            if config.get(key) is not None:
                add(float(config[key]))
    if fam.arch == "gemma2":
        w.add_attn_logit_softcapping(float(config.get("attn_logit_softcapping") or 50.0))
        w.add_final_logit_softcapping(float(config.get("final_logit_softcapping") or 30.0))
        w.add_sliding_window(int(config.get("sliding_window") or 4096))
    if fam.arch == "gemma3":
        w.add_sliding_window(int(config.get("sliding_window") or 4096))
        if config.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    if fam.arch == "phi3":
        heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
        rot = float(rope_params(config).get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0)
        w.add_rope_dimension_count(int(rot * hidden) // heads)
        orig = (rope_params(config).get("original_max_position_embeddings")
                or config.get("original_max_position_embeddings") or config.get("max_position_embeddings") or 4096)
        w.add_rope_scaling_orig_ctx_len(int(orig))
        w.add_sliding_window(int(config.get("sliding_window") or 0))
