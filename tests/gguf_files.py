"""Tiny GGUF files written the way llama.cpp's ``convert_hf_to_gguf.py`` lays them out, for tests.

``write_gguf(snapshot, path, "Q4_0")`` writes a tiny Hugging Face model (:mod:`tests.tiny_models`) as a
GGUF with the ``gguf`` package: tensor names from ``gguf.get_tensor_name_map``, the Llama family's q/k
rotary row permutation, Gemma-2/3's norms stored as ``w + 1``, 1-D tensors in F32, 2-D weights quantized with ``gguf.quants.quantize`` (a
weight whose rows do not split into the type's blocks stays F16, as llama.cpp does), the tokenizer as a
``gpt2`` vocabulary with the ChatML template.

K-quants: gguf 0.19 can dequantize Q2_K…Q6_K but cannot quantize them. ``"Q4_K"`` therefore writes
*random valid blocks* (random 4-bit codes and 6-bit sub-scales, small fp16 super-scales) for every
weight whose rows are a multiple of 256: the file is a real Q4_K file, its weights are whatever the
blocks dequantize to (:func:`expected_weights` gives them under Hugging Face names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

# HF model_type -> llama.cpp architecture, and whether q/k rows are permuted (LlamaModel.permute)
GGUF_ARCH = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
             "qwen3": ("qwen3", False), "phi3": ("phi3", False), "gemma2": ("gemma2", False),
             "gemma3_text": ("gemma3", False)}
_PLUS_ONE_NORMS = ("gemma2", "gemma3_text")  # llama.cpp stores Gemma's (1 + w) norms as w + 1


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_kquant_blocks(shape: tuple[int, ...], qtype_name: str, seed: int) -> np.ndarray:
    """Valid K-quant bytes for a ``shape`` tensor: random codes, small positive fp16 super-scales."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.004).tobytes(), dtype=np.uint8)
    if qtype_name in ("Q4_K", "Q5_K", "Q2_K"):  # d, dmin at the start (Q2_K: at the end)
        at = 0 if qtype_name != "Q2_K" else size - 4
        raw[..., at:at + 2] = scale
        raw[..., at + 2:at + 4] = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    else:  # Q3_K, Q6_K: d is the last two bytes
        raw[..., size - 2:] = scale
    return raw.reshape(rows, cols // block * size)


def write_gguf(snap: Path, path: Path, qtype: str = "Q8_0", *, embed_qtype: str | None = None,
               arch: str | None = None) -> Path:
    """Write the tiny HF model folder ``snap`` as a GGUF at ``path``; returns ``path``.

    Args:
        snap: a folder written by :func:`tests.tiny_models.build_tiny_model`.
        path: the file to write.
        qtype: storage type of the 2-D weights (``F32``, ``F16``, ``BF16``, ``Q8_0``, ``Q4_0``, ``Q4_1``,
            ``Q5_0``, ``Q5_1``, or a K-quant ``Q2_K``…``Q6_K`` written as random valid blocks).
        embed_qtype: storage type of the token embedding and output (default ``qtype``).
        arch: override ``general.architecture`` (a file for an architecture nobody supports).
    """
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(snap, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(snap)
    c = model.config
    arch_name, permute = GGUF_ARCH[c.model_type]
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    name_map = gguf.get_tensor_name_map(arch_enum, c.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch or arch_name)
    w.add_name(f"tiny {c.model_type}")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = c.rope_parameters
    w.add_rope_freq_base(float(rope.get("rope_theta") or rope["full_attention"]["rope_theta"]))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if arch_name == "llama":
        w.add_rope_dimension_count(head_dim)
    if arch_name.startswith("gemma"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(int(getattr(c, "sliding_window", None) or 4096))
    w.add_vocab_size(c.vocab_size)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [f"<unused{i}>" for i in range(c.vocab_size - len(vocab))]
    special = set(tok.added_tokens_decoder)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if (i in special or i >= len(vocab)) else 1 for i in range(c.vocab_size)])
    w.add_token_scores([0.0] * c.vocab_size)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    seed = 0
    for name, t in model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq") or (c.tie_word_embeddings and name == "lm_head.weight"):
            continue
        gname = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, name
        arr = t.detach().float().numpy()
        if permute and name.endswith("q_proj.weight"):
            arr = _permute(arr, c.num_attention_heads)
        elif permute and name.endswith("k_proj.weight"):
            arr = _permute(arr, c.num_key_value_heads)
        if c.model_type in _PLUS_ONE_NORMS and name.endswith("norm.weight"):
            arr = arr + 1
        kind = (embed_qtype or qtype) if gname.startswith(("token_embd", "output.")) else qtype
        seed += 1
        _add(w, gname, np.ascontiguousarray(arr), kind, seed)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add(w: Any, name: str, arr: np.ndarray, kind: str, seed: int) -> None:
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if arr.ndim == 1 or kind == "F32":
        w.add_tensor(name, arr.astype(np.float32))
    elif kind == "F16" or arr.shape[-1] % block:
        w.add_tensor(name, arr.astype(np.float16))
    elif kind.endswith("_K"):
        w.add_tensor(name, random_kquant_blocks(arr.shape, kind, seed), raw_dtype=qtype)
    else:
        w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)


def expected_weights(path: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``{hf_name: fp32 tensor}``: what ``gguf.quants.dequantize`` makes of every tensor of the file, with
    llama.cpp's q/k permutation undone (written here independently of the engine, from the file)."""
    import gguf

    arch_name, permute = GGUF_ARCH[config["model_type"]]
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    name_map = gguf.get_tensor_name_map(arch_enum, config["num_hidden_layers"])
    hf_names = {}
    for b in range(config["num_hidden_layers"]):
        fused = config["model_type"] == "phi3"
        attn = ("self_attn.qkv_proj",) if fused else ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        mlp = ("mlp.gate_up_proj",) if fused else ("mlp.gate_proj", "mlp.up_proj")
        for leaf in (*attn, *mlp, "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm", "mlp.down_proj",
                     "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            for suffix in (".weight", ".bias"):
                hf = f"model.layers.{b}.{leaf}{suffix}"
                g = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
                if g:
                    hf_names[g] = hf
    hf_names.update({"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                     "output.weight": "lm_head.weight"})
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(x) for x in reversed(list(t.shape)))
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        data = np.asarray(t.data).reshape(rows, -1)
        values = gguf.quants.dequantize(data, t.tensor_type).reshape(shape).astype(np.float32)
        hf = hf_names[t.name]
        if config["model_type"] in _PLUS_ONE_NORMS and hf.endswith("norm.weight"):
            values = values - 1
        if permute and hf.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in hf else config["num_key_value_heads"]
            values = values.reshape(heads, values.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(shape)
        out[hf] = torch.from_numpy(np.ascontiguousarray(values))
    return out
