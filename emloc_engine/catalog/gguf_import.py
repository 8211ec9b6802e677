"""Turn a GGUF file (the format llama.cpp, LM Studio and Ollama run) into a trainable model folder.

People try to fine-tune the model they chat with, and that model is often only on disk as a
quantized GGUF. EMLoC needs full-precision weights: the emulator is built from ``W`` itself, and
the LoRA correction compares ``W`` with its emulator. This module dequantises a GGUF once into a
Hugging Face model folder (``config.json``, ``model.safetensors`` in bf16 by default, tokenizer,
chat template, ``generation_config.json``) that every stage reads like any other checkpoint.

How, in three steps:

1. ``transformers`` reads the file with ``from_pretrained(folder, gguf_file=name)`` and the ``gguf``
   package, asked to dequantise every block (``GgufConfig(dequantize=True)``): a quantized weight
   ``Q`` with per-block scale ``d`` and offset ``m`` becomes ``W = d·q + m`` in the load dtype.
2. A plain model is rebuilt from the config *without* ``quantization_config`` (on the meta device,
   so no second copy of the weights is allocated) and the dequantised tensors are assigned to it.
   Saving the loaded model directly would carry GGUF loader state into the folder.
3. The folder is written under a temporary name and renamed when complete
   (:func:`emloc_engine.core.atomic.atomic_dir`), with ``emloc_import.json`` recording where it came from.

The source file and its folder are only ever read.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emloc_engine.catalog.model_folders import add_model_folder
from emloc_engine.core.atomic import atomic_dir, write_json_atomic
from emloc_engine.core.errors import ConfigError, ModelNotFound, UnsupportedModel
from emloc_engine.core.progress import NULL_PROGRESS, Progress
from emloc_engine.core.version import __version__

log = logging.getLogger(__name__)

IMPORT_MARKER = "emloc_import.json"
DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class GgufInfo:
    """What the header of a GGUF file says, read without loading any tensor.

    Attributes:
        path: the file.
        architecture: ``general.architecture`` (llama.cpp's name: ``llama``, ``qwen2``, ``gemma3``...).
        name: ``general.name`` if present.
        n_tensors: number of tensors in the file.
        tensor_types: the storage types used (``Q4_1``, ``Q8_0``, ``F32``...), sorted.
        size_bytes: file size.
        supported: whether the installed transformers can dequantise this architecture.
        reason: why not, when ``supported`` is False.
    """

    path: Path
    architecture: str
    name: str | None
    n_tensors: int
    tensor_types: tuple[str, ...]
    size_bytes: int
    supported: bool
    reason: str | None


def supported_gguf_architectures() -> frozenset[str]:
    """GGUF architecture names the installed transformers can read (its legacy and new loaders)."""
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names.update(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:  # pragma: no cover - depends on the transformers version
        pass
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS

        names.update(GGUF_ARCHS)
    except ImportError:  # pragma: no cover - depends on the transformers version
        pass
    return frozenset(names)


def _field_text(reader: Any, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    return value if isinstance(value, str) else str(value)


def inspect_gguf(gguf_path: Path) -> GgufInfo:
    """Read a GGUF header: architecture, name, tensor storage types, and whether we can import it.

    Args:
        gguf_path: a ``.gguf`` file.

    Returns:
        A :class:`GgufInfo`.

    Raises:
        ModelNotFound: the file does not exist.
        UnsupportedModel: the file is not a readable GGUF file.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelNotFound(f"GGUF file {gguf_path} does not exist.", hint="Check the path, or pick another model.")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(gguf_path)
    except Exception as exc:
        raise UnsupportedModel(
            f"{gguf_path.name} is not a readable GGUF file ({type(exc).__name__}: {exc}).",
            hint="Re-download the file; a partial download is the usual cause.",
        ) from exc
    arch = _field_text(reader, "general.architecture") or "?"
    types = tuple(sorted({t.tensor_type.name for t in reader.tensors}))
    supported = arch in supported_gguf_architectures()
    reason = None
    if not supported:
        reason = (f"the GGUF architecture '{arch}' cannot be read by the installed transformers "
                  f"(it reads: {', '.join(sorted(supported_gguf_architectures()))})")
    return GgufInfo(path=gguf_path, architecture=arch, name=_field_text(reader, "general.name"),
                    n_tensors=len(reader.tensors), tensor_types=types, size_bytes=gguf_path.stat().st_size,
                    supported=supported, reason=reason)


def _check_paths(gguf_path: Path, out_dir: Path, dtype: str) -> None:
    if not gguf_path.is_file():
        raise ModelNotFound(f"GGUF file {gguf_path} does not exist.", hint="Check the path, or pick another model.")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)} (got '{dtype}').")
    src = gguf_path.resolve().parent
    out = out_dir.resolve()
    if out == src or src in out.parents:
        raise ConfigError(
            f"The converted model would be written into the GGUF's own folder {src}.",
            hint="Choose an output folder outside the source folder; EMLoC never writes next to your models.",
        )


def _load_dequantised(gguf_path: Path, torch_dtype: Any) -> tuple[Any, Any]:
    """Load tokenizer and dequantised model from the GGUF (``transformers`` + ``gguf``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True,
                                              trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch_dtype, local_files_only=True, trust_remote_code=False,
        quantization_config=GgufConfig(dequantize=True),
    )
    return tokenizer, model


def _rebuild_plain(loaded: Any, torch_dtype: Any) -> Any:
    """A fresh model of the same class, config without ``quantization_config``, sharing the tensors.

    Built on the meta device and filled with ``load_state_dict(assign=True)``, so the weights are
    not copied. Non-persistent buffers (rotary ``inv_freq``) are taken over from the loaded model;
    tied embeddings are tied again (``lm_head.weight`` is ``embed_tokens.weight``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    cfg_dict = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    config = type(loaded.config).from_dict(cfg_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=False)
    state = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in loaded.state_dict().items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise UnsupportedModel(
            f"The dequantised GGUF does not fit a plain {type(model).__name__}: "
            f"missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}.",
            hint="This GGUF layout is not supported; convert the original Hugging Face model instead.",
        )
    for name, buf in loaded.named_buffers():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buf
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise UnsupportedModel(f"The GGUF has no weights for {still_meta[:5]}.",
                               hint="Convert the original Hugging Face model instead.")
    model.generation_config = loaded.generation_config
    model.eval()
    return model


def _save_folder(model: Any, tokenizer: Any, tmp: Path, info: GgufInfo, dtype: str) -> None:
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if getattr(tokenizer, "chat_template", None) and not any(tmp.glob("chat_template.*")):
        (tmp / "chat_template.jinja").write_text(str(tokenizer.chat_template), encoding="utf-8")
    write_json_atomic(tmp / IMPORT_MARKER, {
        "source": str(info.path), "source_size_bytes": info.size_bytes,
        "source_mtime_ns": os.stat(info.path).st_mtime_ns, "architecture": info.architecture,
        "gguf_name": info.name, "tensor_types": list(info.tensor_types), "dtype": dtype,
        "emloc_version": __version__,
    })


def convert_gguf_to_safetensors(gguf_path: Path, out_dir: Path, dtype: str = "bfloat16",
                                progress: Progress = NULL_PROGRESS, *, overwrite: bool = False) -> Path:
    """Dequantise a GGUF model into a Hugging Face folder of safetensors weights.

    Each quantized block stores integers ``q`` with a scale ``d`` (and for ``Q4_1``/``Q5_1`` an
    offset ``m``); the weight is recovered as ``W = d·q (+ m)`` in fp32 by ``gguf`` and then cast
    to ``dtype``. Rounding error of the quantization is kept, not undone: the folder reproduces
    the GGUF's own outputs, which is what the user chats with. Tied embeddings stay tied
    (``lm_head`` is not stored separately).

    Args:
        gguf_path: the ``.gguf`` file (only read).
        out_dir: the folder to create; must not be inside the GGUF's folder.
        dtype: ``bfloat16`` (default), ``float16`` or ``float32`` for the saved weights.
        progress: reports each step; cancel is honoured between steps.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir``, complete (``config.json``, ``model.safetensors``, tokenizer files, chat
        template, ``generation_config.json`` and ``emloc_import.json``).

    Raises:
        ModelNotFound: ``gguf_path`` does not exist.
        UnsupportedModel: not a GGUF file, or an architecture the installed transformers cannot read.
        ConfigError: bad ``dtype``, ``out_dir`` inside the source folder, or ``out_dir`` not empty.
        Cancelled: the user stopped it; nothing is left at ``out_dir``.
    """
    import torch

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    _check_paths(gguf_path, out_dir, dtype)
    progress.update(0.0, f"Reading {gguf_path.name}")
    info = inspect_gguf(gguf_path)
    if not info.supported:
        raise UnsupportedModel(f"Cannot convert {gguf_path.name}: {info.reason}.",
                               hint="Use the original Hugging Face model of this GGUF instead.")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"{out_dir} exists and is not empty.",
                          hint="Choose an empty folder, or allow overwriting it.")
    progress.check_cancelled()
    torch_dtype = getattr(torch, dtype)
    loaded = model = None
    try:
        progress.update(0.05, f"Dequantising {gguf_path.name} ({', '.join(info.tensor_types)})")
        try:
            tokenizer, loaded = _load_dequantised(gguf_path, torch_dtype)
        except ValueError as exc:
            raise UnsupportedModel(f"transformers cannot read {gguf_path.name}: {exc}",
                                   hint="Use the original Hugging Face model of this GGUF instead.") from exc
        progress.check_cancelled()
        progress.update(0.7, "Rebuilding a plain model")
        model = _rebuild_plain(loaded, torch_dtype)
        progress.check_cancelled()
        progress.update(0.8, f"Writing {out_dir.name} ({dtype} safetensors)")
        with atomic_dir(out_dir, overwrite=True) as tmp:
            _save_folder(model, tokenizer, tmp, info, dtype)
            progress.check_cancelled()
    finally:
        del loaded, model
        gc.collect()
    log.info("converted %s -> %s (%s)", gguf_path, out_dir, dtype)
    progress.update(1.0, f"Converted {gguf_path.name}")
    return out_dir


def converted_dir_for(gguf_path: Path) -> Path:
    """Where the catalog keeps the conversion of ``gguf_path``: never beside the GGUF (it may be in
    LM Studio's or Ollama's store), always under the app's data folder, one folder per source file."""
    import hashlib

    from emloc_engine.core.paths import app_data_dir

    src = Path(gguf_path).expanduser().resolve()
    tag = hashlib.sha256(str(src).encode()).hexdigest()[:8]
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in src.stem)[:60] or "model"
    return app_data_dir() / "converted" / f"{stem}-{tag}"


def convert_for_catalog(gguf_path: Path, progress: Progress = NULL_PROGRESS) -> Path:
    """Convert a GGUF the user chats with into a trainable bf16 folder, once, and list it in the catalog.

    The result is ``converted_dir_for(gguf_path)``; a finished conversion (it has the
    ``emloc_import.json`` marker) is reused, an unfinished one is redone. The folder is added to the
    catalog's model folders, so ``emloc models`` and the app list it like any other model.

    Returns:
        The converted model folder.

    Raises:
        ModelNotFound, UnsupportedModel: as :func:`convert_gguf_to_safetensors`.
    """
    out = converted_dir_for(gguf_path)
    if not (out / IMPORT_MARKER).exists():
        convert_gguf_to_safetensors(Path(gguf_path), out, progress=progress, overwrite=True)
    add_model_folder(out)
    progress.update(1.0, f"Converted: {out}")
    return out
