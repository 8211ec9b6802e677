"""How big each export will be, before it is written: arithmetic on the safetensors headers.

A GGUF's tensors take ``rows × (row_length / block) × block_bytes`` each, in the type the writer gives
that tensor (:func:`~emloc_engine.stages.export.gguf_export._target_type`: 1-D in F32, rows that are not
whole blocks in F16), plus 32-byte alignment and the metadata (mostly the tokenizer's vocabulary and
merges). K-quants are written by ``llama-quantize`` with its own per-tensor mix, so their size is an
estimate from llama.cpp's published bits per weight (:data:`K_QUANT_BITS`). The adapter GGUF holds
``r × (in + out)`` F32 values per adapted module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from emloc_engine.stages.export.merge import read_shard_index
from emloc_engine.stages.export.options import K_QUANT_TYPES
from emloc_engine.weights.headers import load_config

# Average bits per weight of llama.cpp's K-quant mixes (its quantize README, Llama 7B: file size / weights).
K_QUANT_BITS = {"q2_k": 3.35, "q3_k_s": 3.50, "q3_k_m": 3.91, "q3_k_l": 4.27, "q4_k_s": 4.58, "q4_k_m": 4.84,
                "q5_k_s": 5.21, "q5_k_m": 5.68, "q6_k": 6.56}
_ALIGN = 32


def _tokenizer_metadata_bytes(model_dir: Path, vocab_size: int) -> int:
    """Bytes of the tokenizer keys: every token (8-byte length + text + 4-byte type), merges, chat template."""
    d = Path(model_dir)
    try:
        tok = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return vocab_size * 20
    model = tok.get("model", {})
    texts = {int(i): t for t, i in model.get("vocab", {}).items()}
    texts.update({int(a["id"]): a["content"] for a in tok.get("added_tokens", [])})
    tokens = sum(12 + len(texts.get(i, f"[PAD{i}]").encode()) for i in range(vocab_size))
    if model.get("byte_fallback"):
        tokens += 4 * vocab_size  # scores
    merges = sum(8 + len((m if isinstance(m, str) else " ".join(m)).encode()) for m in model.get("merges", []))
    try:
        template = len(str(json.loads((d / "tokenizer_config.json").read_text()).get("chat_template") or ""))
    except (OSError, ValueError):
        template = 0
    if (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").stat().st_size
    return tokens + merges + template + 1000  # + the other keys


def gguf_bytes(model_dir: Path, gguf_type: str) -> int:
    """Predicted size of the merged GGUF of ``model_dir`` in ``gguf_type`` (an estimate for K-quants)."""
    from emloc_engine.stages.export.gguf_export import _plan_tensors, _planned_nbytes

    config = load_config(Path(model_dir))
    exact_type = "f16" if gguf_type in K_QUANT_TYPES else gguf_type
    plan = _plan_tensors(Path(model_dir), config, exact_type)
    total = 0
    for p in plan:
        if gguf_type in K_QUANT_TYPES and len(p.shape) > 1:
            n = math.ceil(math.prod(p.shape) * K_QUANT_BITS[gguf_type] / 8)
        else:
            n = _planned_nbytes(p)
        total += n + (-n) % _ALIGN + 40 + len(p.gguf_name)  # data, padding, tensor info
    return total + _tokenizer_metadata_bytes(Path(model_dir), int(config["vocab_size"]))


def adapter_gguf_bytes(adapter_dir: Path) -> int:
    """Predicted size of ``adapter.gguf`` for a peft adapter folder (F32 factors)."""
    entries, _ = read_shard_index(Path(adapter_dir) / "adapter_model.safetensors")
    lora = [e for e in entries if ".lora_A." in e.name or ".lora_B." in e.name]
    return sum(4 * math.prod(e.shape) + 72 for e in lora) + 600  # F32 data; name, shape, offset, padding; keys


def folder_bytes(model_dir: Path) -> int:
    """The merged folder: the same tensors in the same dtypes as the original's shards."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def predicted_export_bytes(fmt: str, model_dir: Path, adapter_dir: Path | None, gguf_type: str = "f16") -> int:
    """The bytes a format adds to disk: ``merged``, ``adapter``, ``gguf``, ``adapter-gguf``, ``ollama`` (its
    GGUF, the adapter GGUF when the run started from a GGUF) or ``lmstudio`` (the GGUF; 0 more when linked)."""
    from emloc_engine.stages.export.modelfile import base_gguf_of

    if fmt == "merged":
        return folder_bytes(model_dir)
    if fmt == "adapter":
        return (Path(adapter_dir) / "adapter_model.safetensors").stat().st_size if adapter_dir else 0
    if fmt == "adapter-gguf" or (fmt == "ollama" and base_gguf_of(model_dir) is not None):
        return adapter_gguf_bytes(Path(adapter_dir)) if adapter_dir else 0
    return gguf_bytes(model_dir, gguf_type)


def human_bytes(n: int) -> str:
    """``"1.4 GB"``, ``"820 MB"``, ``"12 KB"`` (powers of 1000, as file managers show sizes)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"
