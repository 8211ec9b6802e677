"""Train the GGUF file people chat with (llama.cpp, LM Studio, Ollama) in place, through a small model view.

People try to fine-tune the model they chat with, and that model is often only on disk as a
quantized GGUF. Nothing is converted: :func:`make_gguf_view` writes a **model view** folder in the
app's data folder with what the file's *metadata* says (``config.json``, the tokenizer and chat
template, ``generation_config.json``, all built by transformers from the GGUF header:
``AutoConfig/AutoTokenizer.from_pretrained(folder, gguf_file=name)``) and the marker
:data:`~emloc_engine.weights.gguf_source.GGUF_VIEW_MARKER` naming the file. It holds no weights: every
stage reads them from the GGUF, one tensor at a time, dequantized on the fly
(:mod:`emloc_engine.weights.gguf_source`). A 19 GB Q4_K_M file therefore needs neither 64 GB of RAM
nor a 64 GB copy on disk before training starts.

Making a view takes seconds. The GGUF and its folder (an LM Studio folder, Ollama's blob store) are
only ever read. A view remembers the file's size and modification time: if the file changes, the
view is remade and runs started from the old file refuse to go on (their fingerprint changes).

Supported: the GGUF architectures whose config transformers can read and whose Hugging Face family
the engine trains (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma-2, Gemma-3). Other files are listed
with the reason.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emloc_engine.catalog.model_folders import add_model_folder
from emloc_engine.core.atomic import atomic_dir, write_json_atomic
from emloc_engine.core.errors import ConfigError, EngineError, ModelNotFound, UnsupportedModel
from emloc_engine.core.progress import NULL_PROGRESS, Progress
from emloc_engine.core.version import __version__
from emloc_engine.weights.gguf_header import gguf_header_of
from emloc_engine.weights.gguf_view import GGUF_VIEW_MARKER, VIEW_DTYPES

log = logging.getLogger(__name__)

IMPORT_MARKER = GGUF_VIEW_MARKER
"""The file that says a folder was made from a GGUF (kept under its old name for callers)."""
DTYPES = VIEW_DTYPES


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
        n_params: weights in the file (every tensor's elements).
    """

    path: Path
    architecture: str
    name: str | None
    n_tensors: int
    tensor_types: tuple[str, ...]
    size_bytes: int
    supported: bool
    reason: str | None
    n_params: int = 0


def supported_gguf_architectures() -> frozenset[str]:
    """GGUF architecture names whose config the installed transformers reads and whose family the engine trains."""
    from emloc_engine.core.architectures import SUPPORTED_MODEL_TYPES

    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names.update(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:  # pragma: no cover - depends on the transformers version
        pass
    # llama.cpp writes Mistral as "llama"; Gemma-3's text model is "gemma3_text" in transformers
    trainable = set(SUPPORTED_MODEL_TYPES) | {"gemma3"}
    return frozenset(n for n in names if n in trainable)


def inspect_gguf(gguf_path: Path) -> GgufInfo:
    """Read a GGUF header: architecture, name, tensor storage types, and whether we can train it.

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
    header = gguf_header_of(gguf_path)
    arch = header.text("general.architecture") or "?"
    types = tuple(sorted({t.type_name for t in header.tensors}))
    supported = arch in supported_gguf_architectures()
    reason = None
    if not supported:
        reason = (f"the GGUF architecture '{arch}' cannot be trained "
                  f"(supported: {', '.join(sorted(supported_gguf_architectures()))})")
    return GgufInfo(path=gguf_path, architecture=arch, name=header.text("general.name"),
                    n_tensors=len(header.tensors), tensor_types=types, size_bytes=gguf_path.stat().st_size,
                    supported=supported, reason=reason, n_params=sum(t.n_elements for t in header.tensors))


def _check_paths(gguf_path: Path, out_dir: Path, dtype: str) -> None:
    if not gguf_path.is_file():
        raise ModelNotFound(f"GGUF file {gguf_path} does not exist.", hint="Check the path, or pick another model.")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)} (got '{dtype}').")
    src = gguf_path.resolve().parent
    out = out_dir.resolve()
    if out == src or src in out.parents:
        raise ConfigError(
            f"The model view would be written into the GGUF's own folder {src}.",
            hint="Choose an output folder outside the source folder; EMLoC never writes next to your models.",
        )


def _read_metadata(gguf_path: Path) -> tuple[Any, Any]:
    """Config and tokenizer from the GGUF's metadata (transformers reads no tensor for these)."""
    from transformers import AutoConfig, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True,
                                                  trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        raise UnsupportedModel(f"transformers cannot read the metadata of {gguf_path.name}: {exc}",
                               hint="Use the original Hugging Face model of this GGUF instead.") from exc
    return config, tokenizer


def _write_view(tmp: Path, config: Any, tokenizer: Any, info: GgufInfo, dtype: str) -> None:
    from transformers import GenerationConfig

    config_dict = {k: v for k, v in config.to_dict().items() if k != "quantization_config"}
    config_dict["dtype"] = dtype
    write_json_atomic(tmp / "config.json", config_dict)
    tokenizer.save_pretrained(tmp)
    if getattr(tokenizer, "chat_template", None) and not any(tmp.glob("chat_template.*")):
        (tmp / "chat_template.jinja").write_text(str(tokenizer.chat_template), encoding="utf-8")
    GenerationConfig.from_model_config(config).save_pretrained(tmp)
    st = os.stat(info.path)
    write_json_atomic(tmp / GGUF_VIEW_MARKER, {
        "source": str(info.path.resolve()), "source_size_bytes": st.st_size, "source_mtime_ns": st.st_mtime_ns,
        "architecture": info.architecture, "gguf_name": info.name, "tensor_types": list(info.tensor_types),
        "view_dtype": dtype, "emloc_version": __version__,
    })


def _check_weights(gguf_path: Path, config_dict: dict[str, Any], dtype: str) -> None:
    """Every parameter of the model has a tensor in the file (tied heads excepted).

    Raises:
        UnsupportedModel: naming the parameters the file lacks.
    """
    from accelerate import init_empty_weights
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from emloc_engine.core.architectures import arch_spec

    arch_spec(config_dict)  # the engine trains this family
    from emloc_engine.weights.gguf_source import GgufTensors, tied_parameters

    tensors = GgufTensors(gguf_path, config_dict, dtype)
    config = CONFIG_MAPPING[str(config_dict["model_type"])].from_dict(config_dict)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    tied = tied_parameters(model)
    missing = [n for n, _ in model.named_parameters() if n not in tensors.tensors and n not in tied]
    if missing:
        raise UnsupportedModel(f"{gguf_path.name} has no tensor for {len(missing)} weight(s) of the model: "
                               f"{', '.join(missing[:5])}.",
                               hint="This GGUF layout is not supported; use the original Hugging Face model.")


def make_gguf_view(gguf_path: Path, out_dir: Path, dtype: str = "bfloat16",
                   progress: Progress = NULL_PROGRESS, *, overwrite: bool = False) -> Path:
    """Write the model view of a GGUF file: config, tokenizer, chat template and marker; no weights.

    Args:
        gguf_path: the ``.gguf`` file (only read).
        out_dir: the folder to create; must not be inside the GGUF's folder.
        dtype: the view dtype of quantized tensors (``bfloat16`` default, ``float16``, ``float32``): what
            the emulator and the merged export store them in. The correction always reads exact fp32.
        progress: reports each step; cancel is honoured between steps.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir``, complete.

    Raises:
        ModelNotFound: ``gguf_path`` does not exist.
        UnsupportedModel: not a GGUF file, an architecture that cannot be trained, or a file that
            lacks some of the model's weights.
        ConfigError: bad ``dtype``, ``out_dir`` inside the source folder, or ``out_dir`` not empty.
        Cancelled: the user stopped it; nothing is left at ``out_dir``.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    _check_paths(gguf_path, out_dir, dtype)
    progress.update(0.0, f"Reading {gguf_path.name}")
    info = inspect_gguf(gguf_path)
    if not info.supported:
        raise UnsupportedModel(f"Cannot train {gguf_path.name}: {info.reason}.",
                               hint="Use the original Hugging Face model of this GGUF instead.")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"{out_dir} exists and is not empty.",
                          hint="Choose an empty folder, or allow overwriting it.")
    progress.check_cancelled()
    progress.update(0.2, f"Reading the metadata of {gguf_path.name} ({', '.join(info.tensor_types)})")
    config, tokenizer = _read_metadata(gguf_path)
    progress.check_cancelled()
    with atomic_dir(out_dir, overwrite=True) as tmp:
        _write_view(tmp, config, tokenizer, info, dtype)
        progress.update(0.6, "Mapping the GGUF's tensors to the model's weights")
        _check_weights(gguf_path, json.loads((tmp / "config.json").read_text(encoding="utf-8")), dtype)
        progress.check_cancelled()
    log.info("model view of %s -> %s (quantized tensors as %s)", gguf_path, out_dir, dtype)
    progress.update(1.0, f"Ready: {gguf_path.name}")
    return out_dir


def gguf_view_dir_for(gguf_path: Path) -> Path:
    """Where the catalog keeps the model view of ``gguf_path``: never beside the GGUF (it may be in
    LM Studio's or Ollama's store), always under the app's data folder, one folder per source file."""
    import hashlib

    from emloc_engine.core.paths import app_data_dir

    src = Path(gguf_path).expanduser().resolve()
    tag = hashlib.sha256(str(src).encode()).hexdigest()[:8]
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in src.stem)[:60] or "model"
    return app_data_dir() / "gguf-views" / f"{stem}-{tag}"


def view_is_current(view: Path) -> bool:
    """Whether ``view`` is a complete model view of its GGUF as the file is now."""
    from emloc_engine.weights.gguf_source import read_view_marker

    if not (view / GGUF_VIEW_MARKER).is_file() or not (view / "config.json").is_file():
        return False
    try:
        read_view_marker(view)
    except EngineError:
        return False
    return True


def convert_for_catalog(gguf_path: Path, progress: Progress = NULL_PROGRESS) -> Path:
    """Make (once) the model view of a GGUF the user chats with, and list it in the catalog.

    The result is ``gguf_view_dir_for(gguf_path)``; a view of the same file (size and mtime) is
    reused, one of an older file is remade. The view is added to the catalog's model folders, so
    ``emloc models`` and the app list it like any other model. (The name is historical: nothing is
    converted any more.)

    Returns:
        The model view folder.

    Raises:
        ModelNotFound, UnsupportedModel: as :func:`make_gguf_view`.
    """
    out = gguf_view_dir_for(gguf_path)
    if not view_is_current(out):
        make_gguf_view(Path(gguf_path), out, progress=progress, overwrite=True)
    add_model_folder(out)
    progress.update(1.0, f"Ready: {out}")
    return out


__all__ = ["DTYPES", "IMPORT_MARKER", "GgufInfo", "convert_for_catalog", "gguf_view_dir_for", "inspect_gguf",
           "make_gguf_view", "supported_gguf_architectures", "view_is_current"]
