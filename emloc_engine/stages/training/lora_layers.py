"""peft LoRA on the emulator: one adapter per targeted module, over the WHOLE composite ``u·v``.

A compressed module of the emulator is a :class:`~emloc_engine.weights.lowrank.LowRankLinear`
(``y = u(v x) + b``). EMLoC trains a standard LoRA of the ORIGINAL layer's shape on top of it:

.. math::

    y = u(v x) + b + s \\, B (A \\, \\mathrm{dropout}(x)), \\qquad
    A \\in \\mathbb{R}^{r \\times in}, \\; B \\in \\mathbb{R}^{out \\times r}, \\;
    s = \\alpha / r \\;(\\text{or } \\alpha / \\sqrt{r} \\text{ with rsLoRA}).

The adapter never sees the factors ``u`` and ``v``; it reads the layer's input and adds to its
output, exactly as it would on the dense ``nn.Linear``. So the adapter of module
``model.layers.3.self_attn.q_proj`` has the same keys and shapes as a LoRA of the original model
(``...q_proj.lora_A.weight``: r × in, ``...q_proj.lora_B.weight``: out × r) and loads with
``PeftModel.from_pretrained(original_model, adapter_dir)``.

We plug :class:`LowRankLoraLinear` into peft with its custom-module mechanism
(``LoraConfig._register_custom_module``, see peft's ``developer_guides/custom_models``); modules
the emulator kept dense (plain ``nn.Linear``) get peft's ordinary LoRA layer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from emloc_engine.core.errors import ConfigError
from emloc_engine.weights.lowrank import LowRankLinear

log = logging.getLogger(__name__)


class LowRankLoraLinear(PeftLoraLinear):
    """peft's LoRA ``Linear`` whose base layer is a :class:`LowRankLinear`.

    Forward (inherited from peft): ``base_layer(x) + s · lora_B(lora_A(dropout(x)))`` where
    ``base_layer(x) = u(v x) + b``. Only ``in_features``/``out_features`` and the base layer's
    device/dtype are looked up differently: the composite has no dense ``weight`` tensor (its
    ``weight`` property materialises ``u @ v``, which we never want to do just to learn a dtype).

    Merging is refused: the adapter belongs on the ORIGINAL model (``emloc export``), and adding
    ``s·B·A`` to a rank-k product cannot be stored in the factors anyway.
    """

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        if not isinstance(module, LowRankLinear):  # pragma: no cover - peft only dispatches LowRankLinear here
            raise TypeError(f"LowRankLoraLinear wraps LowRankLinear, got {type(module).__name__}")
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        weight: torch.Tensor = base_layer.get_submodule("u").weight  # type: ignore[assignment]
        return weight.device, weight.dtype

    @property
    def lora_variants(self) -> dict[tuple[str, ...], Any]:
        # Plain LoRA only: DoRA and the other variants read the dense base weight.
        return {(): None}

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "A LoRA on an emulator's low-rank module cannot be merged into it; merge the adapter into "
            "the ORIGINAL model instead (emloc export)."
        )

    def __repr__(self) -> str:
        return "emloc." + super().__repr__()


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module a LoRA may target: ``nn.Linear`` and :class:`LowRankLinear`, by full name.

    The factors ``u``/``v`` inside a :class:`LowRankLinear` are excluded: they do not exist in the
    original model, so an adapter on them could never be moved back onto it.
    """
    out: dict[str, nn.Module] = {}
    low_rank = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in low_rank):
            continue
        if isinstance(module, (nn.Linear, LowRankLinear)):
            out[name] = module
    return out


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of targets: the full name, or its ending after a dot."""
    return name == target or name.endswith("." + target)


def resolve_targets(model: nn.Module, targets: Sequence[str], default: Sequence[str]) -> tuple[str, ...]:
    """Check the LoRA target names against the model and return the ones to pass to peft.

    Args:
        model: the emulator (before peft touches it).
        targets: leaf names (``q_proj``) or full names (``model.layers.0.mlp.down_proj``) chosen by
            the user; empty means ``default``.
        default: the architecture's block linear modules (leaf names).

    Returns:
        The target names, unchanged, in a stable order (these go into ``adapter_config.json``).

    Raises:
        ConfigError: a name matches no linear module, or matches something that is not one
            (e.g. the ``u``/``v`` factor of a compressed module); all bad names are listed.
    """
    chosen = tuple(dict.fromkeys(targets or default))
    candidates = candidate_modules(model)
    all_names = [n for n, _ in model.named_modules()]
    problems: list[str] = []
    for t in chosen:
        if not t or any(c in t for c in "*?[]"):
            problems.append(f"{t!r}: give a module name (e.g. q_proj), not a pattern or an empty string")
            continue
        hits = [n for n in all_names if _matches(n, t)]
        bad = [n for n in hits if n not in candidates]
        if not hits:
            problems.append(f"{t!r} matches no module of this model")
        elif bad:
            problems.append(f"{t!r} also matches {bad[0]}, which is not a linear layer of the original model")
    if problems:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise ConfigError("Some LoRA target modules cannot be used.", problems=problems,
                          hint=f"Choose among: {', '.join(leaves)}.")
    return chosen


def lora_config(rank: int, alpha: float, dropout: float, targets: Sequence[str], use_rslora: bool,
                base_model_path: str = "") -> LoraConfig:
    """The peft ``LoraConfig`` of an EMLoC adapter, with :class:`LowRankLoraLinear` registered.

    ``base_model_path`` is the ORIGINAL model's folder: it is what ``adapter_config.json`` records.
    """
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int; floats work (scale = alpha / r)
        lora_dropout=dropout,
        target_modules=list(targets),
        use_rslora=use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_path or None,
    )
    config._register_custom_module({LowRankLinear: LowRankLoraLinear})
    return config


def attach_lora(model: Any, config: LoraConfig) -> PeftModel:
    """Wrap ``model`` (the emulator) with a trainable LoRA; everything else is frozen.

    Adapter weights are fp32 even when the base is bf16/fp16 (peft's ``autocast_adapter_dtype``):
    AdamW updates of tiny numbers need fp32.
    """
    if config.base_model_name_or_path:
        # peft records the wrapped model's ``name_or_path`` as the adapter's base model; the
        # adapter belongs to the ORIGINAL model, so the emulator answers to that name.
        model.name_or_path = config.base_model_name_or_path
    with _weight_is_device_probe():
        return get_peft_model(model, config, autocast_adapter_dtype=True)


@contextlib.contextmanager
def _weight_is_device_probe() -> Iterator[None]:
    """While peft wraps the model, ``LowRankLinear.weight`` returns ``u.weight`` instead of ``u @ v``.

    peft's ``LoraModel._replace_module`` reads ``child.weight`` (twice for each of ~9 submodule
    names of every new LoRA layer) only to learn the device to move the adapter to. On an 8B
    emulator that would be ~4000 products ``u @ v`` (out × in each, ~2 s on an H200, far longer on
    small GPUs). Only the device and dtype are read there, and ``u.weight`` has the same ones.
    """
    original = LowRankLinear.weight
    LowRankLinear.weight = property(lambda self: self.u.weight)  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        LowRankLinear.weight = original  # type: ignore[method-assign]


def lora_modules(peft_model: nn.Module) -> dict[str, Any]:
    """LoRA-carrying modules by their ORIGINAL full name (peft's ``base_model.model.`` prefix removed)."""
    from peft.tuners.lora.layer import LoraLayer

    prefix = "base_model.model."
    return {n[len(prefix):] if n.startswith(prefix) else n: m
            for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
