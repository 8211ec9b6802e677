"""A GGUF file's header, read fast: its scalar metadata and its tensor table, without the big arrays.

``gguf.GGUFReader`` builds a numpy view for every element of every metadata array. A Llama-3 GGUF carries
128k tokens, 128k token types and 280k BPE merges, so each reader takes 10–25 s before the first tensor can be
found (measured on this project's CPU: 12 s for a 128k-token file with 128k merges). The engine opens the same
file several times (the Model page's listing, the import check, the tensor index of every streamed stage), so
those seconds added up to most of the 92 s the GGUF view took on an H100 host (benchmarks/RESULTS.md, "GGUF in,
streamed"). This reader keeps scalars and string values, records each array's type and length only, and skips
the array bodies with ``struct`` over the file's bytes: well under a second for the same file.

Only little-endian files of GGUF versions 2 and 3 are read here (what llama.cpp has written since 2023); anything
else raises :class:`GgufHeaderError` and callers fall back to ``gguf.GGUFReader``, which also knows big-endian
files. The tensor byte sizes come from the ``gguf`` package's own table of block sizes.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emloc_engine.core.errors import UnsupportedModel

_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GgufHeaderError(ValueError):
    """The file is not a little-endian GGUF v2/v3 this reader handles (or is truncated)."""


@dataclass(frozen=True)
class HeaderTensor:
    """One tensor as the file lists it: ``shape`` in ggml order (fastest dimension first), ``offset`` absolute."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class GgufHeader:
    """Scalar metadata (``fields``), array metadata as ``(item type, length)`` (``arrays``) and the tensor table."""

    version: int
    fields: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, tuple[int, int]] = field(default_factory=dict)
    tensors: tuple[HeaderTensor, ...] = ()

    def text(self, key: str) -> str | None:
        value = self.fields.get(key)
        return None if value is None else str(value)


class _Cursor:
    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error as exc:
            raise GgufHeaderError("the header is truncated") from exc
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise GgufHeaderError("the header is truncated")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        buf, pos, unpack = self.buf, self.pos, struct.Struct("<Q").unpack_from
        end = len(buf)
        for _ in range(count):
            if pos + 8 > end:
                raise GgufHeaderError("the header is truncated")
            pos += 8 + unpack(buf, pos)[0]
        if pos > end:
            raise GgufHeaderError("the header is truncated")
        self.pos = pos

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise GgufHeaderError(f"unknown metadata value type {vtype}")
        return self.take(fmt)


def _type_name_and_size(code: int) -> tuple[str, int, int]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(code)
    except ValueError as exc:
        raise GgufHeaderError(f"unknown tensor type {code}") from exc
    block, size = GGML_QUANT_SIZES[qtype]
    return qtype.name, block, size


def read_gguf_header(path: Path) -> GgufHeader:
    """The header of ``path``; raises :class:`GgufHeaderError` for what this reader does not handle."""
    with open(path, "rb") as fh:
        try:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # an empty file
            raise GgufHeaderError("the file is empty") from exc
    try:
        return _parse(mm)
    finally:
        mm.close()


def _parse(buf: Any) -> GgufHeader:
    cur = _Cursor(buf)
    if bytes(buf[:4]) != _MAGIC:
        raise GgufHeaderError("no GGUF magic at the start")
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise GgufHeaderError(f"GGUF version {version} (or a big-endian file)")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    fields: dict[str, Any] = {}
    arrays: dict[str, tuple[int, int]] = {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.take("<I")
        if vtype != _ARRAY:
            fields[key] = cur.value(vtype)
            continue
        item, count = cur.take("<I"), cur.take("<Q")
        arrays[key] = (item, count)
        if item == _STRING:
            cur.skip_strings(count)
        elif item in _SCALARS:
            cur.pos += struct.calcsize(_SCALARS[item]) * count
        else:  # arrays of arrays: no writer produces them for models; let gguf's reader deal with it
            raise GgufHeaderError(f"metadata array {key!r} holds items of type {item}")
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("<I")
        shape = tuple(cur.take("<Q") for _ in range(n_dims))
        code, rel = cur.take("<I"), cur.take("<Q")
        infos.append((name, shape, code, rel))
    alignment = int(fields.get("general.alignment", 32))
    start = (cur.pos + alignment - 1) // alignment * alignment
    tensors = []
    for name, shape, code, rel in infos:
        type_name, block, size = _type_name_and_size(code)
        nbytes = math.prod(shape) // block * size
        if start + rel + nbytes > len(buf):
            raise GgufHeaderError(f"tensor {name!r} runs past the end of the file (truncated download?)")
        tensors.append(HeaderTensor(name, type_name, shape, start + rel, nbytes))
    return GgufHeader(version, fields, arrays, tuple(tensors))


def gguf_header_of(gguf_path: Path) -> GgufHeader:
    """The file's header by the fast reader; files it does not handle (big-endian, unusual arrays) through
    ``gguf.GGUFReader``, whose result is put in the same shape.

    Raises:
        UnsupportedModel: not a readable GGUF file (named, with the usual cause).
    """
    try:
        return read_gguf_header(gguf_path)
    except GgufHeaderError:
        pass
    except OSError as exc:
        raise UnsupportedModel(f"{gguf_path.name} could not be read ({exc}).",
                               hint="Check that the file exists and is readable.") from exc
    try:
        from gguf import GGUFReader

        reader = GGUFReader(gguf_path)
        fields = {}
        for key in ("general.architecture", "general.name", "general.alignment"):
            if key in reader.fields:
                fields[key] = reader.fields[key].contents()
        tensors = tuple(HeaderTensor(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape),
                                     int(t.data_offset), int(t.n_bytes)) for t in reader.tensors)
        return GgufHeader(0, fields, {}, tensors)
    except Exception as exc:
        raise UnsupportedModel(
            f"{gguf_path.name} is not a readable GGUF file ({type(exc).__name__}: {exc}).",
            hint="Re-download the file; a partial download is the usual cause.",
        ) from exc
