"""Write a Hugging Face model folder (the merged model) as one GGUF file for llama.cpp, Ollama, LM Studio.

What llama.cpp's ``convert_hf_to_gguf.py`` does for the Llama, Mistral and Qwen2 families, and only
that, so the file behaves the same in llama.cpp and in transformers' GGUF reader:

* architecture ``llama`` for Llama and Mistral (llama.cpp converts Mistral as Llama), ``qwen2`` for Qwen2;
* tensor names from ``gguf.get_tensor_name_map`` (``token_embd``, ``blk.N.attn_q``, ``output``...);
* the rotary q/k row permutation of the Llama family (HF's rotate-half layout -> GGML's interleaved
  pairs): ``W.reshape(h, 2, d/2/h... ).swapaxes(1, 2)``; transformers' reader inverts it;
* 1-D tensors (norms, biases) in F32; 2-D weights in F32/F16/BF16, or Q8_0 (blocks of 32 values with
  one fp16 scale, ``gguf.quants.quantize``) when the row length is a multiple of 32, else F16;
* Llama-3 rope scaling as the ``rope_freqs`` tensor, linear/YaRN scaling as metadata;
* the tokenizer: a byte-level BPE ``tokenizer.json`` as ``gpt2`` (tokens, types, merges, pre-tokenizer
  name), a SentencePiece model as ``llama`` (via ``gguf.vocab``); special token ids, add-BOS/EOS flags and
  the chat template through ``gguf.SpecialVocab``. Rows of the embedding without a token get
  ``[PAD{i}]`` placeholders (llama.cpp's convention).

Tensors are streamed: every header is declared first from the safetensors headers, then each tensor
is read, converted and written, so memory holds one tensor. The file is written as
``model.gguf.partial`` and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emloc_engine.core.atomic import atomic_path
from emloc_engine.core.errors import ConfigError, MergeError, UnsupportedModel
from emloc_engine.core.progress import NULL_PROGRESS, Progress, sub
from emloc_engine.stages.export.gguf_families import GGUF_FAMILIES as GGUF_FAMILIES
from emloc_engine.stages.export.gguf_families import (
    GgufFamily,
    add_family_hparams,
    family_of,
    family_problem,
    is_tied,
    rope_params,
    rope_theta,
)
from emloc_engine.stages.export.gguf_quantize import quantize_with_llama_cpp, resolve_llama_quantize
from emloc_engine.stages.export.merge import ShardEntry, read_shard_index, read_tensor
from emloc_engine.stages.export.options import GGUF_TYPES as GGUF_TYPES
from emloc_engine.stages.export.options import K_QUANT_TYPES
from emloc_engine.weights.headers import load_config

log = logging.getLogger(__name__)


_SKIP_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class GgufConfig:
    """What to convert and how."""

    model_dir: Path = field(metadata={"help": "Hugging Face folder to convert (the merged model)."})
    out_path: Path = field(metadata={"help": "The .gguf file to write (written as .partial, then renamed)."})
    gguf_type: str = field(default="f16", metadata={"help": "Weight type: one of GGUF_TYPES (K-quants need llama-quantize)."})
    name: str = field(default="", metadata={"help": "general.name in the file; the folder name if empty."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing file."})

    def __post_init__(self) -> None:
        if self.gguf_type not in GGUF_TYPES:
            raise ConfigError(f"GGUF type {self.gguf_type!r} is not supported.", hint=f"Use one of {', '.join(GGUF_TYPES)}.")


@dataclass(frozen=True)
class GgufResult:
    """The written file and what is in it."""

    path: Path
    arch: str
    gguf_type: str
    n_tensors: int
    file_bytes: int
    tokenizer_model: str
    wall_s: float


def gguf_support_problem(config: dict[str, Any]) -> str | None:
    """Why a model cannot be written as GGUF by this exporter (``None`` when it can)."""
    return family_problem(config)


def gguf_tokenizer_problem(model_dir: Path) -> str | None:
    """Why the tokenizer of a folder cannot be written into a GGUF (``None`` when it can)."""
    d = Path(model_dir)
    if (d / "tokenizer.model").is_file():
        return None
    try:
        model = json.loads((d / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
    except (OSError, ValueError):
        return "the model folder has neither tokenizer.json nor tokenizer.model"
    if model.get("type") != "BPE":
        return f"its tokenizer is {model.get('type')!r}; only BPE (byte-level or SentencePiece-style) is supported"
    return None


_rope_params = rope_params
_rope_theta = rope_theta


def permute_qk(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: HF rotate-half rows -> GGML interleaved rope pairs.

    ``(n_head·d, ...) -> reshape(n_head, 2, d/2, ...) -> swap axes 1, 2 -> (n_head·d, ...)``;
    ``n_head_kv`` replaces ``n_head`` for the k projection under grouped-query attention.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(config: dict[str, Any]) -> torch.Tensor | None:
    """The ``rope_freqs`` tensor llama.cpp writes for Llama-3.1-style rope scaling (``None`` otherwise)."""
    rp = _rope_params(config)
    if (rp.get("rope_type") or rp.get("type")) != "llama3":
        return None
    dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    freqs = 1.0 / (_rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = float(rp.get("factor", 8.0))
    low, high = float(rp.get("low_freq_factor", 1.0)), float(rp.get("high_freq_factor", 4.0))
    old_ctx = float(rp.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


# -- tensors -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Planned:
    gguf_name: str
    hf_name: str
    file: Path | None
    entry: ShardEntry | None
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    permute: str = ""  # "", "q", "k" (rope row permutation) or "+1" (Gemma's norms stored as 1 + w)
    data: torch.Tensor | None = None  # generated tensors (rope_freqs)


def _target_type(shape: tuple[int, ...], gguf_type: str) -> Any:
    """The storage type of one tensor: 1-D in F32; 2-D in the chosen type, or F16 where a row is not a
    whole number of the type's blocks (32 values for Q8_0/Q5_x/Q4_x), as llama.cpp falls back."""
    import gguf

    q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or gguf_type == "f32":
        return q.F32
    if gguf_type in ("f16", "bf16"):
        return q.BF16 if gguf_type == "bf16" else q.F16
    qtype = q[gguf_type.upper()]
    return qtype if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else q.F16


def gguf_name_map(config: dict[str, Any]) -> Any:
    """gguf's HF-name -> GGUF-name map for this model's architecture and block count."""
    import gguf

    fam = family_of(config)
    assert fam is not None
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == fam.arch)
    return gguf.get_tensor_name_map(arch, int(config["num_hidden_layers"]))


def tensor_transform(hf_name: str, fam: GgufFamily) -> str:
    """What the converter does to a tensor's values: "q"/"k" rope permutation, "+1" (Gemma norms), or ""."""
    if fam.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return "q"
    if fam.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return "k"
    if fam.norm_plus_one and hf_name.endswith("norm.weight"):
        return "+1"
    return ""


def _plan_tensors(model_dir: Path, config: dict[str, Any], gguf_type: str) -> list[_Planned]:
    import gguf

    fam = family_of(config)
    if fam is None:
        raise MergeError(f"GGUF export does not support model type {config.get('model_type')!r}.",
                         hint="Export the merged folder or the adapter instead.")
    name_map = gguf_name_map(config)
    tied = is_tied(config)
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise MergeError(f"No *.safetensors in {model_dir} to convert to GGUF.")
    plan: list[_Planned] = []
    factors = llama3_rope_factors(config)
    if factors is not None:
        plan.append(_Planned(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", "rope_freqs", None, None,
                             gguf.GGMLQuantizationType.F32, tuple(factors.shape), data=factors))
    for f in files:
        entries, _ = read_shard_index(f)
        for e in entries:
            if e.name.endswith(_SKIP_SUFFIXES) or (tied and e.name == "lm_head.weight"):
                continue
            gname = name_map.get_name(e.name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise UnsupportedModel(f"Tensor {e.name!r} has no GGUF name for the {fam.arch} architecture.",
                                       hint="Convert the merged folder with llama.cpp's convert_hf_to_gguf.py.")
            plan.append(_Planned(gname, e.name, f, e, _target_type(e.shape, gguf_type), e.shape,
                                 tensor_transform(e.name, fam)))
    return plan


def _convert(t: torch.Tensor, p: _Planned, config: dict[str, Any]) -> np.ndarray:
    """A tensor (any float dtype) -> the numpy array GGUF stores for ``p.qtype`` (F32 maths first)."""
    import gguf

    t32 = t.to(torch.float32)
    if p.permute == "q":
        t32 = permute_qk(t32, int(config["num_attention_heads"]), int(config["num_attention_heads"]))
    elif p.permute == "k":
        t32 = permute_qk(t32, int(config["num_attention_heads"]),
                         int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    elif p.permute == "+1":
        t32 = t32 + 1.0
    arr = t32.contiguous().numpy()
    q = gguf.GGMLQuantizationType
    if p.qtype == q.F32:
        return arr
    if p.qtype == q.F16:
        return arr.astype(np.float16)
    return np.asarray(gguf.quants.quantize(arr, p.qtype))  # BF16, Q8_0, Q5_x, Q4_x: uint8 blocks


def _planned_nbytes(p: _Planned) -> int:
    """Bytes the tensor takes in the file (F32/F16 plain, the others in blocks)."""
    import gguf

    q = gguf.GGMLQuantizationType
    if p.qtype in (q.F32, q.F16):
        return math.prod(p.shape) * (4 if p.qtype == q.F32 else 2)
    return _quant_nbytes(p.shape, p.qtype)


def _quant_nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * (shape[-1] // block) * type_size


# -- metadata ------------------------------------------------------------------------------------------
def _add_hparams(w: Any, config: dict[str, Any], arch_name: str, file_type: int, name: str) -> None:
    import gguf

    w.add_name(name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    w.add_vocab_size(int(config["vocab_size"]))
    w.add_context_length(int(config.get("max_position_embeddings") or 4096))
    w.add_embedding_length(int(config["hidden_size"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_block_count(int(config["num_hidden_layers"]))
    w.add_head_count(heads)
    w.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    w.add_rope_freq_base(_rope_theta(config))
    if head_dim != int(config["hidden_size"]) // heads or arch_name.startswith("gemma"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    fam = family_of(config)
    assert fam is not None
    add_family_hparams(w, config, fam, head_dim)
    rp = _rope_params(config)
    rtype = rp.get("rope_type") or rp.get("type")
    if rtype == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
    elif rtype == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rp["factor"]))
        if rp.get("original_max_position_embeddings"):
            w.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))


# gguf.LlamaFileType (general.file_type) of each weight type.
_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10,
               "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17,
               "q6_k": 18, "bf16": 32}


def _pre_tokenizer_name(tok: dict[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a tokenizer.json, by its split regex."""
    pre = tok.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    if not regexes and any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts):
        return "gpt-2"
    if len(regexes) == 1:
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
        except ImportError:  # pragma: no cover - older transformers
            GGUF_PRE_TOKENIZER_SPLITS = {}
        preferred = ("llama-bpe", "qwen2", "tekken", "gpt-4o")
        names = sorted((n for n, r in GGUF_PRE_TOKENIZER_SPLITS.items() if r == regexes[0]),
                       key=lambda n: (n not in preferred, n))
        if names:
            return names[0]
    log.warning("Unknown pre-tokenizer in tokenizer.json; writing 'default' (llama.cpp may split text differently).")
    return "default"


def _add_tokenizer(w: Any, model_dir: Path, vocab_size: int) -> str:
    """Write the tokenizer; returns ``tokenizer.ggml.model`` (``gpt2`` or ``llama``)."""
    import gguf

    tj = model_dir / "tokenizer.json"
    tok: dict[str, Any] = json.loads(tj.read_text(encoding="utf-8")) if tj.is_file() else {}
    model = tok.get("model", {})
    byte_level = model.get("type") == "BPE" and not model.get("byte_fallback")
    if byte_level:
        kind = "gpt2"
        reverse: dict[int, str] = {int(i): t for t, i in model.get("vocab", {}).items()}
        types = {i: gguf.TokenType.NORMAL for i in reverse}
        for at in tok.get("added_tokens", []):
            reverse[int(at["id"])] = at["content"]
            types[int(at["id"])] = gguf.TokenType.CONTROL if at.get("special") else gguf.TokenType.USER_DEFINED
        if reverse and max(reverse) >= vocab_size:
            raise UnsupportedModel(f"The tokenizer has token id {max(reverse)} but the model only {vocab_size} rows.")
        tokens = [reverse.get(i, f"[PAD{i}]") for i in range(vocab_size)]
        toktypes = [types.get(i, gguf.TokenType.UNUSED) for i in range(vocab_size)]
        w.add_tokenizer_model(kind)
        w.add_tokenizer_pre(_pre_tokenizer_name(tok))
        w.add_token_list(tokens)
        w.add_token_types(toktypes)
        special = gguf.SpecialVocab(model_dir, load_merges=bool(model.get("merges")), n_vocab=vocab_size)
        if not special.merges:  # llama.cpp requires the key for gpt2 vocabularies, even when empty
            w.add_key_value(gguf.Keys.Tokenizer.MERGES, [], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
        special.add_to_gguf(w, quiet=True)
        return kind
    if (model_dir / "tokenizer.model").is_file() or model.get("byte_fallback"):
        vocab: Any = (gguf.vocab.SentencePieceVocab(model_dir) if (model_dir / "tokenizer.model").is_file()
                      else gguf.vocab.LlamaHfVocab(model_dir))
        tokens_b, scores, toktypes = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens_b.append(text)
            scores.append(score)
            toktypes.append(ttype)
        for i in range(len(tokens_b), vocab_size):
            tokens_b.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            toktypes.append(gguf.TokenType.UNUSED)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens_b[:vocab_size])
        w.add_token_scores(scores[:vocab_size])
        w.add_token_types(toktypes[:vocab_size])
        gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=vocab_size).add_to_gguf(w, quiet=True)
        return "llama"
    raise UnsupportedModel(f"The tokenizer of {model_dir} is neither byte-level BPE nor SentencePiece.",
                           hint="Convert the merged folder with llama.cpp's convert_hf_to_gguf.py.")


def _make_writer(arch_name: str) -> Any:
    """A ``GGUFWriter`` that can also write an empty array (gguf-py refuses them; the format allows them).

    A byte-level BPE vocabulary without merges needs ``tokenizer.ggml.merges = []``: llama.cpp refuses
    a ``gpt2`` vocabulary without the key, and transformers then builds a merge-free BPE.
    """
    import gguf

    class _Writer(gguf.GGUFWriter):
        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return bytes(head + self._pack("I", sub_type) + self._pack("Q", 0))
            return bytes(super()._pack_val(val, vtype, add_vtype, sub_type))

    return _Writer(None, arch_name)


def _write_array(writer: Any, arr: np.ndarray) -> None:
    """Append one tensor's data (a seam for tests that simulate a full disk)."""
    writer.write_tensor_data(arr)


def _iter_tensors(plan: list[_Planned]) -> Iterator[tuple[_Planned, torch.Tensor]]:
    handles: dict[Path, Any] = {}
    try:
        for p in plan:
            if p.data is not None:
                yield p, p.data
                continue
            assert p.file is not None and p.entry is not None
            if p.file not in handles:
                handles[p.file] = open(p.file, "rb")  # noqa: SIM115 - closed in finally
            yield p, read_tensor(handles[p.file], p.entry, p.file.name)
    finally:
        for fh in handles.values():
            fh.close()


def _mostly_bf16(model_dir: Path) -> bool:
    sizes: dict[str, int] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        for e in read_shard_index(f)[0]:
            sizes[e.dtype] = sizes.get(e.dtype, 0) + e.nbytes
    return bool(sizes) and max(sizes, key=lambda k: sizes[k]) == "BF16"


def _write_file(path: Path, plan: list[_Planned], config: dict[str, Any], model_dir: Path, arch_name: str,
                gguf_type: str, name: str, progress: Progress) -> str:
    """Write one GGUF (header, metadata, tokenizer, then the tensors one at a time); returns the tokenizer kind."""
    import gguf

    w = _make_writer(arch_name)
    try:
        _add_hparams(w, config, arch_name, _FILE_TYPES[gguf_type], name)
        tokenizer_model = _add_tokenizer(w, model_dir, int(config["vocab_size"]))
        for p in plan:
            if p.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dt = np.dtype(np.float32 if p.qtype == gguf.GGMLQuantizationType.F32 else np.float16)
                w.add_tensor_info(p.gguf_name, p.shape, dt, _planned_nbytes(p))
            else:
                w.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), _planned_nbytes(p), raw_dtype=p.qtype)
        w.open_output_file(path)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (p, t) in enumerate(_iter_tensors(plan)):
            progress.check_cancelled()
            _write_array(w, _convert(t, p, config))
            progress.update((i + 1) / len(plan), f"GGUF {p.gguf_name}")
        w.flush()
    finally:
        w.close()
    return tokenizer_model


def export_gguf(cfg: GgufConfig, progress: Progress = NULL_PROGRESS) -> GgufResult:
    """Convert a Hugging Face folder (any family of :data:`GGUF_FAMILIES`) to one GGUF file, one tensor in memory.

    Args:
        cfg: what to convert, where, and the weight type.
        progress: per-tensor updates; cancel is checked between tensors.

    Returns:
        The file written, its architecture, type, tensor count and size.

    Raises:
        UnsupportedModel: a family, rope scaling or tokenizer this exporter does not handle.
        MissingTool: a K-quant type without llama.cpp's ``llama-quantize``.
        MergeError: the file exists (without ``overwrite``), or a source shard is corrupt.
        DiskFull: the disk is full (message names the folder, the file's size and the free space);
            ``model.gguf.partial`` is removed and no ``model.gguf`` appears.
    """

    t0 = time.monotonic()
    model_dir, out = Path(cfg.model_dir), Path(cfg.out_path)
    config = load_config(model_dir)
    problem = gguf_support_problem(config) or gguf_tokenizer_problem(model_dir)
    if problem:
        raise UnsupportedModel(f"Cannot write GGUF for {model_dir.name}: {problem}.")
    if out.exists() and not cfg.overwrite:
        raise MergeError(f"{out} already exists.", hint="Pass overwrite (CLI: --overwrite) to replace it.")
    arch_name = GGUF_FAMILIES[str(config["model_type"])].arch
    name = cfg.name or model_dir.name
    if cfg.gguf_type not in K_QUANT_TYPES:
        plan = _plan_tensors(model_dir, config, cfg.gguf_type)
        with atomic_path(out, needed_bytes=sum(_planned_nbytes(p) for p in plan)) as tmp:
            tokenizer_model = _write_file(tmp, plan, config, model_dir, arch_name, cfg.gguf_type, name, progress)
    else:
        tool = resolve_llama_quantize(cfg.gguf_type)
        base_type = "bf16" if _mostly_bf16(model_dir) else "f16"
        plan = _plan_tensors(model_dir, config, base_type)
        with atomic_path(out, needed_bytes=2 * sum(_planned_nbytes(p) for p in plan)) as tmp:
            base = tmp.with_name(tmp.name + f".{base_type}")
            try:
                tokenizer_model = _write_file(base, plan, config, model_dir, arch_name, base_type, name,
                                              sub(progress, 0.0, 0.5))
                quantize_with_llama_cpp(tool, base, tmp, cfg.gguf_type, sub(progress, 0.5, 1.0))
            finally:
                base.unlink(missing_ok=True)
    return GgufResult(out, arch_name, cfg.gguf_type, len(plan), out.stat().st_size, tokenizer_model,
                      time.monotonic() - t0)
