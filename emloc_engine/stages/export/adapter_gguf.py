"""Write the (corrected) LoRA adapter as a llama.cpp LoRA adapter GGUF (``RUN/adapter.gguf``).

The file is what llama.cpp's ``convert_lora_to_gguf.py`` writes, so ``llama-cli -m BASE.gguf --lora
adapter.gguf``, ``llama-server --lora`` and Ollama's ``ADAPTER`` apply it on top of the user's unchanged
base GGUF:

* ``general.architecture`` = the base's llama.cpp architecture (llama.cpp refuses an adapter of another
  one), ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32);
* per adapted module two tensors, ``blk.N.<name>.weight.lora_a`` (A, r × in) and ``….lora_b`` (B, out × r),
  named by the same ``gguf`` name map as the base's tensors;
* the q/k rope permutation of the Llama family applied to B's rows (the rows of ``ΔW = B·A`` are
  permuted exactly as the base's rows are; A is untouched), as ``LoraTorchTensor.permute`` does;
* F32 tensors (the converter's default ``--outtype``; an adapter is small).

llama.cpp scales every pair by ``alpha / r`` with ``r`` read from that pair's A. peft may give modules
their own rank or alpha (``rank_pattern``/``alpha_pattern``) or use rsLoRA (``alpha / √r``); one file-wide
alpha cannot say that, so each B is multiplied by ``s · r / alpha`` (``s``: the module's own peft scale),
which leaves ``alpha / r · B'·A = s · B·A`` exact for every module. For a plain adapter the factor is 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emloc_engine.core.atomic import atomic_path
from emloc_engine.core.errors import MergeError, UnsupportedModel
from emloc_engine.core.progress import NULL_PROGRESS, Progress
from emloc_engine.stages.export.gguf_families import family_of, family_problem, is_tied
from emloc_engine.weights.headers import load_config


@dataclass(frozen=True)
class AdapterGgufConfig:
    """Which adapter, for which base, written where."""

    adapter_dir: Path = field(metadata={"help": "The peft adapter folder (the corrected one)."})
    model_dir: Path = field(metadata={"help": "The base model folder the adapter was trained for (its config)."})
    out_path: Path = field(metadata={"help": "The .gguf to write (as .partial, then renamed)."})
    name: str = field(default="", metadata={"help": "general.name; the adapter folder's name if empty."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing file."})


@dataclass(frozen=True)
class AdapterGgufResult:
    """The written adapter file."""

    path: Path
    arch: str
    n_modules: int
    alpha: float
    file_bytes: int
    wall_s: float


def adapter_tensors(adapter_dir: Path, config: dict[str, Any]) -> tuple[float, dict[str, np.ndarray]]:
    """``(alpha, {gguf tensor name: float32 array})`` of a peft adapter, as the adapter GGUF stores them.

    Raises:
        UnsupportedModel: a module without a GGUF name (or an adapted head tied to the embeddings).
        MergeError: from :func:`~emloc_engine.stages.export.merge.read_lora_deltas`.
    """
    from emloc_engine.stages.export.gguf_export import gguf_name_map, permute_qk, tensor_transform
    from emloc_engine.stages.export.merge import read_lora_deltas

    fam = family_of(config)
    assert fam is not None
    adapter, deltas = read_lora_deltas(Path(adapter_dir))
    alpha = float(adapter.config.get("lora_alpha") or 8.0)
    name_map = gguf_name_map(config)
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    out: dict[str, np.ndarray] = {}
    for module, d in deltas.items():
        weight = f"{module}.weight"
        gname = name_map.get_name(weight, try_suffixes=(".weight",))
        if gname is None or (is_tied(config) and module.endswith("lm_head")):
            raise UnsupportedModel(f"The adapter adapts {module}, which has no tensor of its own in a {fam.arch} GGUF.",
                                   hint="Train without that module in target_modules, or export the merged GGUF.")
        B = d.B.to(torch.float32) * (d.scale * d.rank / alpha)
        kind = tensor_transform(weight, fam)
        if kind in ("q", "k"):
            B = permute_qk(B, heads, kv if kind == "k" else heads)
        out[f"{gname}.lora_a"] = d.A.to(torch.float32).contiguous().numpy()
        out[f"{gname}.lora_b"] = B.contiguous().numpy()
    return alpha, out


def export_adapter_gguf(cfg: AdapterGgufConfig, progress: Progress = NULL_PROGRESS) -> AdapterGgufResult:
    """Write ``cfg.adapter_dir`` as a llama.cpp LoRA adapter GGUF.

    Raises:
        UnsupportedModel: a family the GGUF writers do not handle, or an adapter module without a GGUF tensor.
        MergeError: the file exists (without ``overwrite``) or the adapter carries more than LoRA factors.
        DiskFull: the disk is full (nothing is left under the final name).
    """
    import gguf

    t0 = time.monotonic()
    config = load_config(Path(cfg.model_dir))
    problem = family_problem(config)
    if problem:
        raise UnsupportedModel(f"Cannot write a GGUF adapter for {Path(cfg.model_dir).name}: {problem}.")
    out = Path(cfg.out_path)
    if out.exists() and not cfg.overwrite:
        raise MergeError(f"{out} already exists.", hint="Pass overwrite (CLI: --overwrite) to replace it.")
    fam = family_of(config)
    assert fam is not None
    alpha, tensors = adapter_tensors(Path(cfg.adapter_dir), config)
    progress.update(0.3, "Adapter GGUF: tensors ready")
    with atomic_path(out, needed_bytes=sum(a.nbytes for a in tensors.values()) + 2**20) as tmp:
        w = gguf.GGUFWriter(None, fam.arch)
        try:
            w.add_type(gguf.GGUFType.ADAPTER)
            w.add_string(gguf.Keys.Adapter.TYPE, "lora")
            w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            w.add_name(cfg.name or Path(cfg.adapter_dir).name)
            w.add_file_type(gguf.LlamaFileType.ALL_F32)
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for name, arr in tensors.items():
                w.add_tensor(name, arr)
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    progress.update(1.0, "Adapter GGUF written")
    return AdapterGgufResult(out, fam.arch, len(tensors) // 2, alpha, out.stat().st_size, time.monotonic() - t0)


def apply_adapter_gguf(model: Any, adapter_gguf: Path, config: dict[str, Any]) -> int:
    """Add an adapter GGUF to a transformers model in place as llama.cpp does (``W += alpha/r · B·A``).

    B's rows are un-permuted back into the Hugging Face layout first. Returns the modules changed.

    Raises:
        MergeError: a tensor names no module of the model, or the file is not a LoRA adapter.
    """
    import gguf

    from emloc_engine.stages.export.gguf_export import gguf_name_map, tensor_transform
    from emloc_engine.stages.export.gguf_readback import dequantized, undo_transform

    reader = gguf.GGUFReader(str(adapter_gguf))
    if reader.fields["general.type"].contents() != "adapter" or reader.fields["adapter.type"].contents() != "lora":
        raise MergeError(f"{adapter_gguf} is not a LoRA adapter GGUF.")
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    fam = family_of(config)
    assert fam is not None
    name_map = gguf_name_map(config)
    params = dict(model.named_parameters())
    by_gguf = {name_map.get_name(n, try_suffixes=(".weight",)): n for n in params if n.endswith(".weight")}
    tensors = {t.name: t for t in reader.tensors}
    n = 0
    with torch.no_grad():
        for tname, t in tensors.items():
            if not tname.endswith(".lora_a"):
                continue
            base = tname[: -len(".lora_a")]
            if base not in by_gguf:
                raise MergeError(f"{adapter_gguf.name}: {base} is no tensor of this model.")
            hf = by_gguf[base]
            A = torch.from_numpy(dequantized(t).copy())
            B = torch.from_numpy(dequantized(tensors[base + ".lora_b"]).copy())
            B = undo_transform(B, tensor_transform(hf, fam), config)
            w = params[hf]
            w.add_((alpha / A.shape[0]) * (B @ A).to(w.dtype).to(w.device))
            n += 1
    return n
