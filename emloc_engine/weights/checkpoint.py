"""Read tensors from a model's safetensors shards one at a time, never the whole model.

``Checkpoint`` indexes the shards from their headers only
(:mod:`emloc_engine.weights.safetensors_header`) and opens a shard with ``safe_open`` when one of its
tensors is asked for. Peak memory is the tensors the caller holds, not the checkpoint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from emloc_engine.core.dtypes import element_bytes
from emloc_engine.core.errors import ModelNotFound, UnsupportedModel
from emloc_engine.weights.headers import read_safetensors_header


@dataclass(frozen=True)
class TensorInfo:
    """Header facts of one stored tensor (no data read)."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * element_bytes(self.dtype)


class Checkpoint:
    """A read-only view of the safetensors shards in a model folder."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise ModelNotFound(f"Model folder {self.model_dir} does not exist.")
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            if any(self.model_dir.glob("*.bin")) or any(self.model_dir.glob("*.pt")):
                raise UnsupportedModel(
                    f"{self.model_dir} holds only pickle (.bin) weights.",
                    hint="Convert it to safetensors (transformers: model.save_pretrained(dir, safe_serialization=True)).",
                )
            raise ModelNotFound(f"No *.safetensors files in {self.model_dir}.")
        self._infos: dict[str, TensorInfo] = {}
        for f in files:
            for name, entry in read_safetensors_header(f).tensors.items():
                self._infos[name] = TensorInfo(name, f, entry["dtype"], tuple(entry["shape"]))
        self._handles: dict[Path, Any] = {}

    # -- headers -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise ModelNotFound(f"Tensor {name!r} is not in the checkpoint {self.model_dir}.") from None

    def infos(self) -> Iterable[TensorInfo]:
        return self._infos.values()

    def num_parameters(self) -> int:
        return sum(i.numel for i in self._infos.values())

    def dominant_dtype(self) -> str:
        """The storage dtype holding most parameters (``"BF16"``, ``"F16"``, ``"F32"``...)."""
        count: dict[str, int] = {}
        for i in self._infos.values():
            count[i.dtype] = count.get(i.dtype, 0) + i.numel
        return max(count, key=lambda k: count[k])

    # -- data ----------------------------------------------------------------------------------
    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        return self._handles[file]

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Load one tensor (from disk, on the CPU, then moved/cast).

        Raises:
            ModelNotFound: unknown tensor name, or the shard is truncated or corrupt (names the tensor).
        """
        info = self.info(name)
        try:
            t = self._handle(info.file).get_tensor(name)
        except Exception as exc:
            raise ModelNotFound(
                f"Cannot read tensor {name!r} from {info.file.name}: {exc}",
                hint="The shard is truncated or corrupt; download the model again.",
            ) from exc
        if dtype is not None or str(device) != "cpu":
            t = t.to(device=device, dtype=dtype or t.dtype)
        return t

    def with_prefix(self, prefix: str) -> Iterator[str]:
        """Tensor names starting with ``prefix`` (e.g. ``"model.layers.3."``)."""
        return (n for n in self._infos if n.startswith(prefix))

    def read_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with ``prefix`` (one decoder block), keyed by the rest of its
        name, on the CPU in its stored dtype."""
        return {n[len(prefix):]: self.get(n) for n in self.with_prefix(prefix)}

    def close(self) -> None:
        self._handles.clear()


def fingerprint_files(paths: Iterable[Path], *, head_bytes: int = 1 << 20) -> str:
    """A cheap content fingerprint: sha256 over names, sizes and the first/last MiB of each file.

    Reading whole multi-GB shards would take minutes; headers + size + both ends change whenever
    the content of a safetensors file does in practice (the header lists every tensor's offsets).
    """
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        st = p.stat()
        h.update(p.name.encode())
        h.update(str(st.st_size).encode())
        with open(p, "rb") as fh:
            h.update(fh.read(head_bytes))
            if st.st_size > 2 * head_bytes:
                fh.seek(-head_bytes, 2)
                h.update(fh.read(head_bytes))
    return h.hexdigest()[:16]


def fingerprint_model(model_dir: Path) -> str:
    """Fingerprint of a model folder's config and weights (see :func:`fingerprint_files`)."""
    d = Path(model_dir)
    files = [*d.glob("*.safetensors"), *d.glob("config.json")]
    return fingerprint_files(files)
