"""The emulator's compressed layer and how an emulator folder becomes a model.

A compressed linear layer ``W`` (out × in) is stored as two factors, ``u`` (out × k) and
``v`` (k × in), and computes ``y = u (v x) + b``. :class:`LowRankLinear` keeps them as two
``nn.Linear`` children named ``v`` and ``u`` so the state-dict keys are exactly the emulator
file format: ``M.v.weight``, ``M.u.weight``, ``M.u.bias``.

The emulator folder (``RUN_DIR/emulator/``) holds ``config.json`` of the source model, the
tokenizer, safetensors shards and ``emloc.json``; see :func:`read_emulator_meta`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emloc_engine.core.dtypes import FLOAT_CODES
from emloc_engine.core.errors import ModelNotFound
from emloc_engine.weights.checkpoint import Checkpoint

EMULATOR_META = "emloc.json"
EMULATOR_FORMAT = "emloc-emulator"
EMULATOR_FORMAT_VERSION = 1


class LowRankLinear(nn.Module):
    """``y = u(v(x))``: a linear layer stored as the product of two thin ones.

    Args:
        in_features: input width of the original layer.
        out_features: output width of the original layer.
        rank: inner width ``k``.
        bias: whether the original layer had a bias (it stays dense, on ``u``).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.v = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.u = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent ``u @ v`` (for inspection and tests; not used in forward)."""
        return self.u.weight @ self.v.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def read_emulator_meta(emulator_dir: Path) -> dict[str, Any]:
    """The parsed ``emloc.json`` of an emulator folder.

    Its ``modules`` maps each compressed module's full name to
    ``{"ratio", "rank", "in_features", "out_features", "bias"}``.

    Raises:
        ModelNotFound: the folder is not a complete emulator.
    """
    path = Path(emulator_dir) / EMULATOR_META
    if not path.exists():
        raise ModelNotFound(f"{emulator_dir} is not an emulator folder (no {EMULATOR_META}).",
                            hint="Build it first: emloc build MODEL DATA --out RUN_DIR.")
    meta: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != EMULATOR_FORMAT:
        raise ModelNotFound(f"{path} is not an EMLoC emulator description.")
    return meta


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def replace_with_low_rank(model: nn.Module, modules: dict[str, dict[str, Any]],
                          dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
    """Swap each named ``nn.Linear`` of ``model`` for an (uninitialised) :class:`LowRankLinear`."""
    for name, spec in modules.items():
        _set_submodule(model, name, LowRankLinear(int(spec["in_features"]), int(spec["out_features"]),
                                                  int(spec["rank"]), bool(spec.get("bias", False)),
                                                  device=device, dtype=dtype))


def pad_rank(model: nn.Module, multiple: int) -> int:
    """Zero-pad every :class:`LowRankLinear`'s inner width ``k`` up to a multiple of ``multiple``.

    ``u(v x)`` is unchanged: the extra rows of ``v`` and columns of ``u`` are zero. It exists for
    speed: bf16 GEMMs whose inner dimension is not a multiple of 8 (k = 819 at ρ = 0.4 on a
    4096-wide layer) miss the tensor-core fast path; on the H200 the emulator then trained slower at
    batch 8 than LoRA on the full model (benchmarks/RESULTS.md). The stored factors keep the exact
    ``k`` of the file format; only the in-memory copy is padded. Returns the number of padded modules.
    """
    if multiple <= 1:
        return 0
    count = 0
    for module in model.modules():
        if not isinstance(module, LowRankLinear) or module.rank % multiple == 0:
            continue
        extra = multiple - module.rank % multiple
        v, u = module.v.weight, module.u.weight
        with torch.no_grad():
            module.v.weight = nn.Parameter(torch.cat([v, v.new_zeros(extra, v.shape[1])], 0),
                                           requires_grad=v.requires_grad)
            module.u.weight = nn.Parameter(torch.cat([u, u.new_zeros(u.shape[0], extra)], 1),
                                           requires_grad=u.requires_grad)
        module.v.out_features = module.u.in_features = module.rank + extra
        module.rank += extra
        count += 1
    return count


def load_emulator(emulator_dir: Path, *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu", rank_multiple: int = 1) -> Any:
    """Load an emulator folder as a ``transformers`` causal LM whose compressed modules are low-rank.

    Module names are the original model's, so a LoRA adapter trained on it loads onto the original.

    Args:
        emulator_dir: ``RUN_DIR/emulator``.
        dtype: dtype of every floating tensor after loading (bf16 on GPUs that have it, fp32 on CPU).
        device: where the model lives.
        rank_multiple: zero-pad each inner rank to a multiple of this in memory (:func:`pad_rank`);
            8 on GPUs, 1 (exact stored shapes) elsewhere.

    Returns:
        A ``PreTrainedModel`` in eval mode.

    Raises:
        ModelNotFound: the folder is incomplete (missing tensors are named).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    emulator_dir = Path(emulator_dir)
    meta = read_emulator_meta(emulator_dir)
    config = AutoConfig.from_pretrained(emulator_dir, trust_remote_code=False)
    # Parameters on the meta device (no memory), buffers (rotary inv_freq, embed scales) real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        replace_with_low_rank(model, meta["modules"], dtype=dtype)
    ckpt = Checkpoint(emulator_dir)
    state = {n: ckpt.get(n, dtype=dtype if ckpt.info(n).dtype in FLOAT_CODES else None)
             for n in ckpt.names()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set()
    if getattr(config, "tie_word_embeddings", False) or getattr(getattr(config, "text_config", None),
                                                                 "tie_word_embeddings", False):
        tied = {"lm_head.weight"}
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise ModelNotFound(
            f"Emulator {emulator_dir} does not match its config.",
            problems=[f"missing tensor {m}" for m in missing[:20]] + [f"unexpected tensor {u}" for u in unexpected[:20]],
            hint="Rebuild the emulator (emloc build).",
        )
    if tied:
        model.tie_weights()
    pad_rank(model, rank_multiple)
    model.to(device=device)
    model.eval()
    return model
