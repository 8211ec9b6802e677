"""peft LoRA adapter folders as plain state dicts: read, inspect, write.

A peft adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys
look like ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. Stripping the
``base_model.model.`` prefix and the ``.lora_A.weight`` suffix gives the module name of the
original model (``model.layers.0.self_attn.q_proj``), whose weight is ``<module>.weight`` in the
original checkpoint.

Each module's forward is ``y = W x + s · B (A x)`` with ``A``: r × in, ``B``: out × r and
``s = alpha / r`` (``alpha / √r`` with rsLoRA), where ``r`` and ``alpha`` honour peft's
``rank_pattern`` / ``alpha_pattern`` (keys matched as ``(.*\\.)?(KEY)$`` against the module name,
first match wins, exactly as ``peft.utils.other.get_pattern_key``).

Only plain LoRA on linear layers is understood: DoRA, embedding LoRA and other peft types are
refused with :class:`~emloc_engine.core.errors.UnsupportedModel` because the correction identities do
not hold for them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from emloc_engine.core.errors import ModelNotFound, UnsupportedModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CORRECTION_META = "emloc_correction.json"
KEY_PREFIX = "base_model.model."
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-carrying module of an adapter.

    Attributes:
        name: the original model's module name (``model.layers.0.self_attn.q_proj``).
        a_key: the adapter key of ``A`` (r × in).
        b_key: the adapter key of ``B`` (out × r).
        rank: ``r`` from the config (rank_pattern honoured); equals ``A.shape[0]``.
        alpha: ``lora_alpha`` (alpha_pattern honoured).
        scale: ``s = alpha / r``, or ``alpha / √r`` with rsLoRA.
    """

    name: str
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scale: float


@dataclass(frozen=True)
class LoraAdapter:
    """A peft LoRA adapter read into memory (it is small: rank × (in + out) per module).

    Attributes:
        path: the adapter folder.
        config: the parsed ``adapter_config.json``.
        tensors: every tensor of ``adapter_model.safetensors`` (keys as stored, stored dtype, CPU).
        modules: the LoRA modules by original module name, in file order.
    """

    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    modules: dict[str, LoraModule]

    def A(self, module: str) -> torch.Tensor:
        """``A`` (r × in) of a module, in its stored dtype."""
        return self.tensors[self.modules[module].a_key]

    def B(self, module: str) -> torch.Tensor:
        """``B`` (out × r) of a module, in its stored dtype."""
        return self.tensors[self.modules[module].b_key]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the LoRA factors (the dtype corrected factors are written in)."""
        first = next(iter(self.modules.values()))
        return self.tensors[first.a_key].dtype


def pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The first key of ``patterns`` matching ``module`` the way peft matches it, or ``None``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def lora_scale(config: dict[str, Any], module: str) -> tuple[int, float, float]:
    """``(r, alpha, s)`` of one module under a peft LoRA config.

    Args:
        config: parsed ``adapter_config.json``.
        module: original module name.

    Returns:
        The rank, alpha and scale ``s = alpha / r`` (``alpha / √r`` when ``use_rslora``).
    """
    rank_pattern: dict[str, Any] = config.get("rank_pattern") or {}
    alpha_pattern: dict[str, Any] = config.get("alpha_pattern") or {}
    rk, ak = pattern_key(rank_pattern, module), pattern_key(alpha_pattern, module)
    r = int(rank_pattern[rk]) if rk is not None else int(config["r"])
    alpha = float(alpha_pattern[ak]) if ak is not None else float(config["lora_alpha"])
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, alpha, scale


def module_of_key(key: str) -> tuple[str, str] | None:
    """``(module, "A"|"B")`` for a LoRA factor key, ``None`` for any other key."""
    for suffix, which in ((_A_SUFFIX, "A"), (_B_SUFFIX, "B")):
        if key.endswith(suffix):
            name = key[: -len(suffix)]
            return (name[len(KEY_PREFIX):] if name.startswith(KEY_PREFIX) else name), which
    return None


def _check_supported(path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    problems = []
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not LORA")
    if config.get("use_dora"):
        problems.append("it uses DoRA (use_dora=true)")
    if config.get("fan_in_fan_out"):
        problems.append("it uses fan_in_fan_out (Conv1D layers)")
    if any("lora_embedding_" in k or "lora_magnitude_vector" in k for k in tensors):
        problems.append("it carries embedding LoRA or DoRA magnitudes")
    if problems:
        raise UnsupportedModel(f"The adapter {path} is not a plain LoRA adapter on linear layers.",
                               problems=problems, hint="Train a plain LoRA adapter (emloc train).")


def read_adapter(path: Path) -> LoraAdapter:
    """Read a peft LoRA adapter folder.

    Args:
        path: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
        The adapter with its modules resolved (rank, alpha and scale per module).

    Raises:
        ModelNotFound: files missing or unreadable, or a module lacks its A or B.
        UnsupportedModel: not plain LoRA, or a factor's shape contradicts the config's rank.
    """
    path = Path(path)
    cfg_path, w_path = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise ModelNotFound(f"{path} is not a LoRA adapter folder (no {ADAPTER_CONFIG}).",
                            hint="Point to the folder that training wrote (RUN_DIR/adapter).")
    if not w_path.is_file():
        hint = ("Save it with safetensors (peft: save_pretrained(..., safe_serialization=True))."
                if (path / "adapter_model.bin").exists() else "Train the adapter again.")
        raise ModelNotFound(f"{path} has no {ADAPTER_WEIGHTS}.", hint=hint)
    try:
        config: dict[str, Any] = json.loads(cfg_path.read_text(encoding="utf-8"))
        tensors = load_file(str(w_path))
    except Exception as exc:
        raise ModelNotFound(f"Cannot read the adapter in {path}: {exc}", hint="Train the adapter again.") from exc
    _check_supported(path, config, tensors)
    halves: dict[str, dict[str, str]] = {}
    for key in tensors:
        parsed = module_of_key(key)
        if parsed is not None:
            halves.setdefault(parsed[0], {})[parsed[1]] = key
    problems, modules = [], {}
    for name, pair in halves.items():
        if set(pair) != {"A", "B"}:
            problems.append(f"{name} has only lora_{next(iter(pair))}")
            continue
        a, b = tensors[pair["A"]], tensors[pair["B"]]
        r, alpha, scale = lora_scale(config, name)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            problems.append(f"{name}: A {tuple(a.shape)} and B {tuple(b.shape)} do not match rank {r}")
            continue
        modules[name] = LoraModule(name, pair["A"], pair["B"], r, alpha, scale)
    if problems:
        raise UnsupportedModel(f"The adapter {path} is inconsistent.", problems=problems,
                               hint="Train the adapter again.")
    if not modules:
        raise ModelNotFound(f"The adapter {path} holds no LoRA factors.", hint="Train the adapter again.")
    return LoraAdapter(path, config, tensors, modules)


def fingerprint_adapter(path: Path) -> str:
    """sha256 prefix over the adapter's config and weights (the whole files: adapters are small)."""
    h = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        h.update(name.encode())
        with open(Path(path) / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def is_corrected(path: Path) -> bool:
    """Whether an adapter folder is the output of a correction (it has ``emloc_correction.json``)."""
    return (Path(path) / CORRECTION_META).exists()


def write_adapter(out_dir: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                  *, copy_from: Path | None = None) -> None:
    """Write a peft adapter folder (``out_dir`` should be a temporary folder renamed afterwards).

    Args:
        out_dir: the folder to write into (created).
        config: the ``adapter_config.json`` content.
        tensors: the adapter state dict, keys as peft stores them; written contiguous, dtypes kept.
        copy_from: an adapter folder whose other plain files (README.md...) are copied along; its
            config, weights and correction metadata are never copied.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if copy_from is not None:
        for f in Path(copy_from).iterdir():
            if f.is_file() and f.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, CORRECTION_META):
                shutil.copy2(f, out_dir / f.name)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
              str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
