"""Read a GGUF this exporter wrote back into Hugging Face tensors, for verification.

transformers' GGUF loader reads llama, mistral, qwen2, qwen3 and phi3 files (and the types the
``gguf`` package dequantizes). For the families it does not read (gemma, granite, olmo2) the
verification loads the file itself: every tensor is dequantized with ``gguf.quants.dequantize``, its
GGUF name mapped back to the Hugging Face name (the same ``gguf`` name map the writer used), and the
writer's value transforms undone (the q/k rope permutation, Gemma's ``1 + w`` norms). This checks the
tensor data and layout; llama.cpp's reading of the metadata is what the family tests pin down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from emloc_engine.core.errors import MergeError
from emloc_engine.stages.export.gguf_families import family_of, is_tied
from emloc_engine.stages.export.merge import read_shard_index
from emloc_engine.weights.headers import load_config


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of :func:`~emloc_engine.stages.export.gguf_export.permute_qk` (``n_head``: that tensor's heads)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantized(tensor: Any) -> np.ndarray:
    """One ``GGUFReader`` tensor as float32 in the Hugging Face (row-major) shape."""
    import gguf

    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    arr = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(arr, dtype=np.float32).reshape(shape)


def undo_transform(t: torch.Tensor, kind: str, config: dict[str, Any]) -> torch.Tensor:
    heads = int(config["num_attention_heads"])
    if kind == "q":
        return unpermute_qk(t, heads)
    if kind == "k":
        return unpermute_qk(t, int(config.get("num_key_value_heads") or heads))
    if kind == "+1":
        return t - 1.0
    return t


def gguf_state_dict(gguf_path: Path, model_dir: Path) -> dict[str, torch.Tensor]:
    """The GGUF's tensors as ``{hf_name: fp32 tensor}``, for the model folder it was written from.

    Raises:
        MergeError: a tensor of the folder is missing from the file, or has another shape.
    """
    import gguf

    from emloc_engine.stages.export.gguf_export import gguf_name_map, tensor_transform

    config = load_config(model_dir)
    fam = family_of(config)
    assert fam is not None
    name_map = gguf_name_map(config)
    by_name = {t.name: t for t in gguf.GGUFReader(str(gguf_path)).tensors}
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        for e in read_shard_index(f)[0]:
            if e.name.endswith(".rotary_emb.inv_freq") or (is_tied(config) and e.name == "lm_head.weight"):
                continue
            gname = name_map.get_name(e.name, try_suffixes=(".weight", ".bias"))
            if gname not in by_name:
                raise MergeError(f"{gguf_path.name} has no tensor {gname} (for {e.name}).")
            t = torch.from_numpy(dequantized(by_name[gname]).copy())
            if tuple(t.shape) != tuple(e.shape):
                raise MergeError(f"{gname} in {gguf_path.name} has shape {tuple(t.shape)}, {e.name} has {e.shape}.")
            out[e.name] = undo_transform(t, tensor_transform(e.name, fam), config)
    return out


def load_gguf_as_hf(gguf_path: Path, model_dir: Path, dtype: torch.dtype = torch.float32) -> Any:
    """A transformers model with ``model_dir``'s config and the GGUF's (dequantized) weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    missing, unexpected = model.load_state_dict(gguf_state_dict(gguf_path, model_dir), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight") and "rotary_emb" not in m]
    if missing or unexpected:
        raise MergeError(f"{gguf_path.name} does not fill the model:", problems=[*missing, *unexpected][:10])
    if is_tied(load_config(model_dir)):
        model.tie_weights()
    return model.eval()
