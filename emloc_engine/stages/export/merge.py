"""Merge a LoRA adapter into a model's weights: a pure function over state dicts, plus streaming shard IO.

The maths, per adapted linear module with weight ``W`` (out × in, stored in bf16/fp16/fp32)::

    W' = W + s · B A        A: r × in,  B: out × r,  s = alpha / r  (alpha / √r with rsLoRA)

computed in fp32 on the CPU (bf16/fp16 inputs are upcast, the product and the sum are fp32), checked
with ``isfinite`` *before* anything is committed (peft's ``safe_merge``), and cast back to the
storage dtype of ``W`` (checked again: fp16 can overflow on the way back).

:func:`merge_state_dict` is that and only that (torchtune's ``get_merged_lora_ckpt``). The rest of
this module reads a peft adapter folder into ``{module: LoraDelta}`` and streams safetensors shards
tensor by tensor (:func:`iter_shard_tensors`, :class:`ShardWriter`), so merging a 16 GB model holds one
tensor in memory, not one shard and never the model.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from emloc_engine.core.dtypes import SAFETENSORS_NAMES, element_bytes
from emloc_engine.core.errors import MergeError, ModelNotFound
from emloc_engine.weights.headers import read_safetensors_header

if TYPE_CHECKING:
    from emloc_engine.weights.adapters import LoraAdapter

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {code: getattr(torch, name) for code, name in SAFETENSORS_NAMES.items()}
"""safetensors dtype code -> torch dtype."""
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class LoraDelta:
    """One adapted module: ``ΔW = scale · B A`` (A: r × in, B: out × r, both as stored, usually fp32)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


# -- the pure merge -------------------------------------------------------------------------------
def merge_state_dict(
    tensors: Mapping[str, torch.Tensor],
    lora: Mapping[str, LoraDelta | tuple[torch.Tensor, torch.Tensor, float]],
) -> dict[str, torch.Tensor]:
    """Add every LoRA delta to its weight: ``W' = W + s · B A`` in fp32, returned in ``W``'s dtype.

    Args:
        tensors: a state dict (or one shard of it); ``{module}.weight`` is the weight of ``module``.
            Not modified.
        lora: module name -> :class:`LoraDelta` or ``(A, B, scale)``. Modules whose weight is not in
            ``tensors`` are skipped, so a caller can pass the whole adapter with each shard.

    Returns:
        A new dict with the same keys; merged weights are new tensors in the storage dtype of the
        original, every other tensor is the same object.

    Raises:
        MergeError: a shape mismatch, or a non-finite result (NaN/Inf), naming the module and the
            likely cause; nothing is returned, so nothing half-merged can be written.
    """
    out = dict(tensors)
    for module, entry in lora.items():
        name = f"{module}.weight"
        if name not in tensors:
            continue
        lm = entry if isinstance(entry, LoraDelta) else LoraDelta(*entry)
        out[name] = merge_weight(name, tensors[name], lm)
    return out


def merge_weight(name: str, weight: torch.Tensor, lm: LoraDelta) -> torch.Tensor:
    """``weight + scale · B A`` computed in fp32, checked, cast back to ``weight.dtype``.

    Raises:
        MergeError: shapes disagree or the result is not finite (the message says why).
    """
    a, b = lm.A, lm.B
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(weight.shape):
        raise MergeError(
            f"LoRA shapes do not fit {name}: weight {tuple(weight.shape)}, A {tuple(a.shape)}, B {tuple(b.shape)}.",
            hint="The adapter was trained for a different model; pass the base model it was trained on.",
        )
    if not weight.is_floating_point():
        raise MergeError(f"{name} is stored as {weight.dtype}; LoRA can only be merged into floating weights.",
                         hint="Quantized checkpoints cannot be merged; use the bf16/fp16/fp32 original.")
    w32 = weight.to(torch.float32, copy=True)
    w32.addmm_(b.to(torch.float32), a.to(torch.float32), alpha=float(lm.scale))
    if not bool(torch.isfinite(w32).all()):
        raise MergeError(f"Merging the LoRA delta into {name} gives NaN/Inf ({_cause(weight, lm)}).",
                         hint="Nothing was written. Fix the cause above and export again.")
    merged = w32.to(weight.dtype)
    if not bool(torch.isfinite(merged).all()):
        raise MergeError(
            f"Merging the LoRA delta into {name} overflows {weight.dtype} when cast back "
            f"(largest |value| {float(w32.abs().max()):.4g}).",
            hint="The adapter pushes weights out of the storage range; export from a bf16 or fp32 original.",
        )
    return merged


def _cause(weight: torch.Tensor, lm: LoraDelta) -> str:
    if not bool(torch.isfinite(weight).all()):
        return "the base weight itself holds NaN/Inf: the model shard is corrupt; download it again"
    if not (bool(torch.isfinite(lm.A).all()) and bool(torch.isfinite(lm.B).all())):
        return "the adapter holds NaN/Inf: training diverged; lower the learning rate or use an earlier checkpoint"
    if not math.isfinite(lm.scale):
        return f"the LoRA scale {lm.scale} is not finite; check lora_alpha and r in adapter_config.json"
    return "the product s·B·A overflows fp32: the adapter weights are absurdly large"


# -- peft adapters -------------------------------------------------------------------------------------
def read_lora_deltas(adapter_dir: Path) -> tuple[LoraAdapter, dict[str, LoraDelta]]:
    """Read a peft LoRA adapter folder as ``{module: LoraDelta}`` (original model's module names).

    Reading and scale rules (rank/alpha patterns, rsLoRA) are :func:`emloc_engine.weights.adapters.read_adapter`'s;
    this adds the refusals that only matter for merging.

    Raises:
        ModelNotFound, UnsupportedModel: from :func:`~emloc_engine.weights.adapters.read_adapter`.
        MergeError: ``modules_to_save`` or a trained LoRA bias, which ``W + s·B·A`` does not cover.
    """
    from emloc_engine.weights.adapters import read_adapter

    adapter = read_adapter(Path(adapter_dir))
    problems = []
    if adapter.config.get("modules_to_save"):
        problems.append(f"modules_to_save={adapter.config['modules_to_save']} (fully trained modules)")
    if adapter.config.get("lora_bias"):
        problems.append("a trained LoRA bias (lora_bias=true)")
    extra = [k for k in adapter.tensors if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if extra:
        problems.append(f"tensors that are not LoRA factors: {', '.join(extra[:5])}")
    if problems:
        raise MergeError(f"Cannot merge the adapter {adapter.path}: it carries", problems=problems,
                         hint="Export a plain LoRA adapter (what `emloc train` writes).")
    deltas = {name: LoraDelta(adapter.A(name), adapter.B(name), m.scale) for name, m in adapter.modules.items()}
    return adapter, deltas


# -- streaming safetensors IO --------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardEntry:
    """One tensor of a safetensors file, from the header: where its bytes are."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_shard_index(path: Path) -> tuple[list[ShardEntry], dict[str, str]]:
    """Header of a safetensors file, validated against the file size; entries in file order.

    Raises:
        MergeError: unreadable/corrupt header (names the file) or a tensor whose bytes lie past the
            end of the file or disagree with its shape (names the tensor): the shard is truncated/corrupt.
    """
    path = Path(path)
    fix = "The shard is truncated or corrupt: download the model again (or verify it with `emloc models`)."
    try:
        header = read_safetensors_header(path)
    except ModelNotFound as exc:
        raise MergeError(exc.summary, hint=fix) from exc
    base, size = header.data_start, header.file_bytes
    entries = []
    for name, e in header.tensors.items():
        try:
            dtype, shape, (b, en) = e["dtype"], tuple(int(x) for x in e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise MergeError(f"Tensor {name!r} in {path.name} has a corrupt header entry.", hint=fix) from exc
        if dtype not in SAFETENSORS_DTYPES:
            raise MergeError(f"Tensor {name!r} in {path.name} has unsupported dtype {dtype}.")
        numel = math.prod(shape)
        expected = numel * element_bytes(dtype)
        if en - b != expected or b < 0:
            raise MergeError(f"Tensor {name!r} in {path.name} is corrupt: {en - b} bytes for shape {list(shape)} "
                             f"{dtype} (expected {expected}).", hint=fix)
        if base + en > size:
            raise MergeError(f"Tensor {name!r} in {path.name} is truncated: its data ends at byte {base + en} "
                             f"but the file has {size} bytes.", hint=fix)
        entries.append(ShardEntry(name, dtype, shape, base + int(b), base + int(en)))
    entries.sort(key=lambda x: x.begin)
    return entries, header.metadata


def read_tensor(fh: io.BufferedReader, entry: ShardEntry, file_name: str = "") -> torch.Tensor:
    """Read one tensor's bytes with a plain ``read`` (no mmap: the page cache is not our RSS).

    Raises:
        MergeError: fewer bytes than the header promises (names the tensor).
    """
    dtype = SAFETENSORS_DTYPES[entry.dtype]
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype)
    buf = bytearray(entry.nbytes)
    fh.seek(entry.begin)
    got = fh.readinto(memoryview(buf))
    if got != entry.nbytes:
        raise MergeError(f"Tensor {entry.name!r} in {file_name} is truncated ({got} of {entry.nbytes} bytes).",
                         hint="The shard is truncated or corrupt: download the model again.")
    return torch.frombuffer(buf, dtype=dtype).reshape(entry.shape)


def iter_shard_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor of a safetensors file, one at a time, in file order."""
    entries, _ = read_shard_index(path)
    with open(path, "rb") as fh:
        for e in entries:
            yield e.name, read_tensor(fh, e, Path(path).name)


def _write_tensor_bytes(fh: IO[bytes], tensor: torch.Tensor) -> None:
    """Append a tensor's raw bytes (a seam for tests that simulate a full disk)."""
    if tensor.numel():
        fh.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


class ShardWriter:
    """Write a safetensors file whose header is known up front, then its tensors one at a time.

    The header (names, dtypes, shapes, offsets) is written first, so no tensor has to wait in memory
    for the others; tensors must then be given in the declared order with the declared shape/dtype.
    """

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._order: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for name, dtype, shape in specs:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            self._order.append((name, dtype, shape))
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * ((8 - (8 + len(raw)) % 8) % 8)  # data starts 8-byte aligned, like safetensors
        self._fh: IO[bytes] | None = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._next = 0
        self.nbytes = offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        assert self._fh is not None
        exp_name, exp_dtype, exp_shape = self._order[self._next]
        if name != exp_name or tensor.dtype != exp_dtype or tuple(tensor.shape) != exp_shape:
            raise MergeError(f"Internal error writing {self.path.name}: got {name} {tensor.dtype} "
                             f"{tuple(tensor.shape)}, expected {exp_name} {exp_dtype} {exp_shape}.")
        _write_tensor_bytes(self._fh, tensor)
        self._next += 1

    def close(self, *, sync: bool = True) -> None:
        """Finish the file (fsync'd); raises if tensors are missing."""
        if self._fh is None:
            return
        fh, self._fh = self._fh, None
        try:
            if self._next != len(self._order):
                raise MergeError(f"Internal error: {self.path.name} got {self._next} of {len(self._order)} tensors.")
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
        finally:
            fh.close()

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
