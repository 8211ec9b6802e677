"""A plain-SVD emulator writer for tests of the stages that consume emulators.

It writes the emulator folder format (see ``emloc_engine.weights.lowrank``) without calibration: each
compressed module is the truncated SVD of its weight. Tests of training, correction and export
use it so they do not depend on the activation-aware builder; the builder's own tests check that
its output loads the same way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from emloc_engine.core.architectures import arch_spec, num_blocks
from emloc_engine.core.ranks import rank_for_ratio
from emloc_engine.weights.checkpoint import Checkpoint
from emloc_engine.weights.headers import load_config
from emloc_engine.weights.lowrank import EMULATOR_FORMAT, EMULATOR_FORMAT_VERSION, EMULATOR_META


def write_svd_emulator(model_dir: Path, out_dir: Path, ratio: float = 0.5,
                       rank_override: dict[str, int] | None = None) -> Path:
    """Write a plain truncated-SVD emulator of ``model_dir`` into ``out_dir``; returns ``out_dir``."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = load_config(model_dir)
    spec = arch_spec(config)
    ckpt = Checkpoint(model_dir)
    compressed: dict[str, dict[str, object]] = {}
    tensors: dict[str, torch.Tensor] = {}
    names = {spec.module_name(b, m) for b in range(num_blocks(config)) for m in spec.linear_modules}
    for name in ckpt.names():
        module = name.rsplit(".", 1)[0]
        if module in names and name.endswith(".weight"):
            w = ckpt.get(name).double()
            out_f, in_f = w.shape
            k = min((rank_override or {}).get(module, rank_for_ratio(ratio, out_f, in_f)), min(out_f, in_f))
            u_, s, vh = torch.linalg.svd(w, full_matrices=False)
            root = s[:k].sqrt()
            dtype = ckpt.get(name).dtype
            tensors[f"{module}.u.weight"] = (u_[:, :k] * root).to(dtype).contiguous()
            tensors[f"{module}.v.weight"] = (root[:, None] * vh[:k]).to(dtype).contiguous()
            has_bias = f"{module}.bias" in ckpt
            if has_bias:
                tensors[f"{module}.u.bias"] = ckpt.get(f"{module}.bias")
            compressed[module] = {"ratio": ratio, "rank": k, "in_features": in_f, "out_features": out_f,
                                  "bias": has_bias}
        elif module in names and name.endswith(".bias"):
            continue
        else:
            tensors[name] = ckpt.get(name)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for f in model_dir.iterdir():
        if f.suffix != ".safetensors" and f.is_file() and not f.name.endswith(".index.json"):
            shutil.copy(f, out_dir / f.name)
    meta = {
        "format": EMULATOR_FORMAT,
        "format_version": EMULATOR_FORMAT_VERSION,
        "engine_version": "test",
        "source_model": {"path": str(model_dir), "revision": model_dir.name, "fingerprint": "test"},
        "method": "plain-svd (test factory)",
        "calibration": {"samples": 0, "tokens": 0, "fingerprint": None},
        "modules": compressed,
    }
    (out_dir / EMULATOR_META).write_text(json.dumps(meta, indent=2))
    return out_dir
