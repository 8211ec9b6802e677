"""What a model folder says about itself, read without torch and without any weight.

:func:`load_config` reads ``config.json``; :func:`read_safetensors_header` reads the header of one
safetensors file: tensor names, dtypes, shapes and byte offsets. A safetensors file is an 8-byte little-endian length ``N``, ``N`` bytes of JSON (one entry per
tensor: ``dtype``, ``shape``, ``data_offsets`` relative to the data, plus optional
``__metadata__``), then the data. This is the engine's only reader of that header.

It reads the bytes itself instead of asking ``safetensors.safe_open``, for three reasons:

* ``safe_open(framework="pt")`` imports torch, and the planner and the model catalog describe models
  from their headers without it (``emloc models`` and ``emloc plan`` stay fast).
* ``safe_open`` refuses a file whose data does not cover every offset, so a truncated download could
  not even be listed; here the header is read on its own, and the tensor whose bytes are missing is
  named when it is read (:meth:`~emloc_engine.weights.checkpoint.Checkpoint.get`) or validated
  (:func:`~emloc_engine.stages.export.merge.read_shard_index`).
* The merge streams tensors by their absolute byte offsets with plain reads (the page cache of an
  mmap would count as our memory), and ``safe_open`` does not expose offsets.

Files the engine wrote itself and reads back (the emulator's shards) are opened with ``safe_open``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emloc_engine.core.errors import ModelNotFound
from emloc_engine.core.trust import refuse_remote_code

MAX_HEADER_BYTES = 100_000_000
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")
"""Suffixes of weight files in a model folder: what is never copied along as a config or tokenizer file."""
_FIX = "Download the model again."


@dataclass(frozen=True)
class SafetensorsHeader:
    """What the header of one safetensors file says.

    Attributes:
        path: the file.
        tensors: tensor name -> its raw entry (``dtype``, ``shape``, ``data_offsets``), in header order.
        metadata: the ``__metadata__`` strings (empty when absent).
        data_start: absolute byte offset where the data section starts (``8 + N``).
        file_bytes: size of the file; the data of a complete file ends at or before it.
    """

    path: Path
    tensors: dict[str, Any]
    metadata: dict[str, str]
    data_start: int
    file_bytes: int


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Read and parse the header of a safetensors file (no tensor data is read).

    Raises:
        ModelNotFound: the file is unreadable, shorter than its header says, or its header is not a
            JSON object (the message names the file).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ModelNotFound(f"{path} is truncated (no safetensors header).", hint=_FIX)
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES:
                raise ModelNotFound(f"{path} has an implausible header length {n}.", hint=_FIX)
            if 8 + n > size:
                raise ModelNotFound(f"{path} is truncated inside its header (the header says {8 + n} bytes, "
                                    f"the file has {size}).", hint=_FIX)
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelNotFound(f"Cannot read the safetensors header of {path}: {exc}", hint=_FIX) from exc
    if not isinstance(header, dict):
        raise ModelNotFound(f"{path} has a corrupt safetensors header (not a JSON object).", hint=_FIX)
    metadata = header.pop("__metadata__", None) or {}
    return SafetensorsHeader(path, header, {str(k): str(v) for k, v in metadata.items()}, 8 + n, size)


def read_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` of a model folder as a dict, for describing the model (the catalog, the planner).

    Nothing is loaded, so a folder that would need its own code is read too (the catalog lists it
    with the reason); a stage that goes on to load the model calls :func:`load_config` instead.

    Raises:
        ModelNotFound: missing, unreadable or not a JSON object.
    """
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelNotFound(f"{model_dir} has no config.json.", hint="Pick the snapshot folder that holds config.json.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelNotFound(f"{path} is not valid JSON ({exc}).", hint=_FIX) from exc
    if not isinstance(data, dict):
        raise ModelNotFound(f"{path} is not a JSON object.", hint=_FIX)
    return data


def load_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` of a model folder that a stage is about to load.

    Every stage reads the config through here first, so a folder that would need its own Python code
    (:func:`emloc_engine.core.trust.refuse_remote_code`) is refused before anything loads.

    Raises:
        ModelNotFound: missing, unreadable or not a JSON object.
        UntrustedCode: the folder would need its own Python code to load (``auto_map``).
    """
    config = read_config(model_dir)
    refuse_remote_code(Path(model_dir))
    return config


__all__ = ["MAX_HEADER_BYTES", "WEIGHT_SUFFIXES", "SafetensorsHeader", "load_config", "read_config",
           "read_safetensors_header"]
