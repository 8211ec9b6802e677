"""Read the weights of a GGUF file (llama.cpp, Ollama, LM Studio) tensor by tensor, under Hugging Face names.

A GGUF model is used for training *in place*: nothing is converted and nothing is written next to
the file. The app keeps a small **model view** folder in its data folder (``config.json``, tokenizer,
chat template, ``generation_config.json`` and :data:`GGUF_VIEW_MARKER`, no weights; made by
:mod:`emloc_engine.catalog.gguf_import`), and every stage that reads the original's weights asks
:class:`~emloc_engine.weights.checkpoint.Checkpoint` for them as for any model folder; for a view,
the checkpoint reads them from the GGUF through :class:`GgufTensors`.

One tensor at a time:

1. its bytes are read with ``os.pread`` at the offset ``gguf.GGUFReader`` found in the header (the
   header itself is parsed once per file and cached). Plain reads, not the reader's memory map:
   mapped pages of a 5-20 GB file would count as this process's memory (RSS) once touched;
2. ``gguf.quants.dequantize`` turns them into fp32 values (exact for every type: F16/BF16 widen, a
   quantized block ``q`` with scale ``d`` (and offset ``m``) becomes ``d·q (+ m)`` as llama.cpp computes it);
3. llama.cpp's layout changes are undone with transformers' own tensor processors
   (``transformers.modeling_gguf_pytorch_utils.TENSOR_PROCESSORS``: the Llama family's q/k rotary row
   permutation, Gemma-2/3's ``norm + 1``), and the GGUF name is mapped back to the Hugging Face name
   with transformers' ``get_gguf_hf_weights_map`` (the inverse of ``gguf.get_tensor_name_map``);
4. it is cast to the dtype asked for, or to its *view dtype*: F32/F16/BF16 tensors keep their type,
   quantized ones take the view's dtype (bf16 by default, recorded in the marker). Asking for
   ``torch.float32`` (the correction does) gives the exact dequantized values, never rounded through bf16.

So "the original" of a run from a GGUF is the dequantized file: the adapter is corrected for exactly
the weights the user runs. :data:`MATERIALISED` counts the bytes this module hands out, so tests
can check that a streamed stage never holds more than a few blocks of them.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emloc_engine.core.errors import ModelNotFound, UnsupportedModel
from emloc_engine.weights.gguf_header import gguf_header_of
from emloc_engine.weights.gguf_view import GGUF_VIEW_MARKER, VIEW_DTYPES, is_gguf_view, read_view_marker

log = logging.getLogger(__name__)

_PLAIN = {"F32": "F32", "F16": "F16", "BF16": "BF16"}  # GGUF types stored as plain values
_SAFETENSORS_CODE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
# GGUF tensors with no Hugging Face counterpart: transformers recomputes them from the config.
_DERIVED = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


class MaterialisedBytes:
    """Bytes of tensors the GGUF source has handed out and that are still alive, and their peak.

    Each returned tensor is counted until it is garbage (``weakref.finalize``); the fp32 buffer a
    dequantisation needs is counted while it exists. Thread-safe (the emulator build reads on a
    reader thread and writes on a writer thread).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.live = 0
        self.peak = 0
        self.total = 0

    def reset(self) -> None:
        with self._lock:
            self.peak = self.live
            self.total = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.live += n
            self.total += n
            self.peak = max(self.peak, self.live)

    def sub(self, n: int) -> None:
        with self._lock:
            self.live -= n

    def track(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        self.add(n)
        weakref.finalize(t, self.sub, n)
        return t


MATERIALISED = MaterialisedBytes()
"""Process-wide counter of the GGUF source's live tensors (what a streamed stage holds of the model)."""


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of the file under its Hugging Face name; ``shape`` in torch order."""

    hf_name: str
    gguf_name: str
    ggml_type: str
    shape: tuple[int, ...]
    offset: int  # absolute, in the file
    nbytes: int  # in the file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)




def _hf_name_map(arch: str, config: dict[str, Any]) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face name, from transformers' mapping over a meta-device model."""
    from accelerate import init_empty_weights
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    hf_config = CONFIG_MAPPING[str(config["model_type"])].from_dict(config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=False)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
    try:
        return dict(get_gguf_hf_weights_map(model, processor))
    except NotImplementedError as exc:
        raise UnsupportedModel(f"gguf has no tensor names for {config.get('model_type')!r}: {exc}") from exc


@functools.lru_cache(maxsize=8)
def _index(path: str, size: int, mtime_ns: int, config_json: str) -> tuple[str, dict[str, GgufTensor]]:
    """The file's architecture and ``{hf_name: GgufTensor}`` (cached per file version and config)."""
    header = gguf_header_of(Path(path))
    arch = header.text("general.architecture") or "?"
    config = json.loads(config_json)
    names = _hf_name_map(arch, config)
    out: dict[str, GgufTensor] = {}
    unknown = []
    for t in header.tensors:
        hf = names.get(t.name)
        if hf is None:
            if t.name not in _DERIVED:
                unknown.append(t.name)
            continue
        out[hf] = GgufTensor(hf, t.name, t.type_name, tuple(reversed(t.shape)), t.offset, t.nbytes)
    if unknown:
        log.warning("%s: %d GGUF tensors have no Hugging Face counterpart and are not read: %s",
                    Path(path).name, len(unknown), ", ".join(unknown[:5]))
    return arch, out


_PIECE_ELEMENTS = 1 << 22  # weights dequantized at once by one thread: 16 MB of fp32 scratch
_POOL: Any = None


def _pool() -> Any:
    """Threads that dequantize pieces of one tensor. Rows are independent blocks and numpy releases the
    GIL inside its array operations, so they run in parallel: gguf's numpy dequantizer does 20-60 M
    weights/s on one core, which alone would make reading an 8B model take minutes.
    ``EMLOC_DEQUANT_THREADS`` sets the count (default: the CPU count, at most 8)."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        workers = int(os.environ.get("EMLOC_DEQUANT_THREADS") or min(8, os.cpu_count() or 1))
        _POOL = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="emloc-dequant")
    return _POOL


def _pieces(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, _PIECE_ELEMENTS // max(1, cols))
    return [(a, min(rows, a + step)) for a in range(0, rows, step)]


class GgufTensors:
    """The tensors of one GGUF file under Hugging Face names, read one at a time.

    Args:
        gguf_path: the file (only read).
        config: the model's ``config.json`` dict (the view's), for the name map and the q/k permutation.
        view_dtype: dtype that quantized tensors are handed out in when no dtype is asked for.
    """

    def __init__(self, gguf_path: Path, config: dict[str, Any], view_dtype: str = "bfloat16") -> None:
        self.path = Path(gguf_path)
        if view_dtype not in VIEW_DTYPES:
            raise UnsupportedModel(f"View dtype must be one of {', '.join(VIEW_DTYPES)} (got {view_dtype!r}).")
        self.view_dtype = view_dtype
        st = self.path.stat()
        cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "transformers_version")}
        self.arch, self.tensors = _index(str(self.path), st.st_size, st.st_mtime_ns, json.dumps(cfg, sort_keys=True))
        self._config = cfg
        self._fd: int | None = None
        self._processor: Any = None

    def storage_dtype(self, name: str) -> str:
        """safetensors code of the dtype ``get(name)`` returns: the file's for F32/F16/BF16, else the view's."""
        t = self.tensors[name]
        return _PLAIN.get(t.ggml_type, _SAFETENSORS_CODE[self.view_dtype])

    def _read(self, t: GgufTensor) -> np.ndarray:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        buf = bytearray(t.nbytes)
        if hasattr(os, "preadv"):
            got = os.preadv(self._fd, [buf], t.offset)
        else:  # Windows: no positional reads; this instance's descriptor is used by one thread at a time
            os.lseek(self._fd, t.offset, os.SEEK_SET)
            got = 0
            view = memoryview(buf)
            while got < t.nbytes:
                chunk = os.read(self._fd, min(t.nbytes - got, 1 << 30))
                if not chunk:
                    break
                view[got:got + len(chunk)] = chunk
                got += len(chunk)
        if got != t.nbytes:
            raise ModelNotFound(f"Tensor {t.gguf_name!r} in {self.path.name} is truncated ({got} of {t.nbytes} bytes).",
                                hint="The file is truncated or corrupt: download it again.")
        return np.frombuffer(buf, dtype=np.uint8)

    def _processor_for(self) -> Any:
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        if self._processor is None:
            self._processor = TENSOR_PROCESSORS.get(self.arch, TensorProcessor)(config=self._config)
        return self._processor

    def _rewritten(self, t: GgufTensor) -> bool:
        """Whether transformers' processor of this architecture changes this tensor's values or order (the
        Llama family's q/k rows, Gemma-2/3's norms): then it is dequantized whole and processed; every
        other tensor is dequantized piece by piece straight into its output."""
        from transformers.modeling_gguf_pytorch_utils import TensorProcessor

        proc = self._processor_for()
        kind = type(proc).__name__
        if type(proc) is TensorProcessor:
            return False
        if kind == "LlamaTensorProcessor":
            return ".attn_q." in t.gguf_name or ".attn_k." in t.gguf_name
        if kind == "Gemma2TensorProcessor":
            return "norm.weight" in t.gguf_name
        return True

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, dequantized, on the CPU, in ``dtype`` (default: its storage dtype).

        Memory: the output, plus fp32 scratch of a few pieces of 4 M weights (a tensor that the
        architecture's processor rewrites, the q/k projections of the Llama family, is dequantized whole).

        Raises:
            ModelNotFound: unknown name, or the file is shorter than its header says.
            UnsupportedModel: a storage type the gguf package cannot dequantize.
        """
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self.tensors.get(name)
        if t is None:
            raise ModelNotFound(f"Tensor {name!r} is not in {self.path.name}.")
        qtype = GGMLQuantizationType[t.ggml_type]
        want = dtype or _TORCH[self.storage_dtype(name)]
        raw = self._read(t)
        rows = t.numel // t.shape[-1] if t.shape else 1
        blocks = raw.reshape(rows, -1)
        try:
            if self._rewritten(t):
                MATERIALISED.add(t.numel * 4)  # the fp32 values exist until cast below
                try:
                    values = np.asarray(dequantize(blocks, qtype), dtype=np.float32).reshape(t.shape)
                    values = self._processor_for().process(weights=values, name=t.gguf_name).weights
                    out = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(want)
                    del values
                finally:
                    MATERIALISED.sub(t.numel * 4)
            else:
                out = torch.empty(t.shape, dtype=want)
                flat = out.view(rows, -1) if t.shape else out.view(1, 1)

                def piece(a: int, b: int) -> None:
                    n = (b - a) * flat.shape[1] * 4
                    MATERIALISED.add(n)
                    try:
                        flat[a:b].copy_(torch.from_numpy(np.asarray(dequantize(blocks[a:b], qtype), np.float32)))
                    finally:
                        MATERIALISED.sub(n)

                spans = _pieces(rows, flat.shape[1])
                if len(spans) == 1:
                    piece(*spans[0])
                else:
                    for fut in [_pool().submit(piece, a, b) for a, b in spans]:
                        fut.result()
        except NotImplementedError as exc:
            raise UnsupportedModel(f"{self.path.name} stores {t.gguf_name} as {t.ggml_type}, which the gguf "
                                   "package cannot dequantize.", hint="Use a GGUF of another type.") from exc
        return MATERIALISED.track(out)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


def tied_parameters(model: Any) -> set[str]:
    """Parameter names a model ties to another one (``lm_head.weight`` when embeddings are tied):
    a GGUF stores them once, so they are not read but tied after loading."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys)


def open_view_tensors(model_dir: Path) -> GgufTensors:
    """The :class:`GgufTensors` of a model view (marker and GGUF checked).

    Raises:
        ModelNotFound: as :func:`read_view_marker`, or the view has no ``config.json``.
    """
    from emloc_engine.weights.headers import read_config

    marker = read_view_marker(model_dir)
    return GgufTensors(Path(marker["source"]), read_config(model_dir), str(marker.get("view_dtype", "bfloat16")))


__all__ = ["GGUF_VIEW_MARKER", "MATERIALISED", "VIEW_DTYPES", "GgufTensor", "GgufTensors", "MaterialisedBytes",
           "is_gguf_view", "open_view_tensors", "read_view_marker", "tied_parameters"]
