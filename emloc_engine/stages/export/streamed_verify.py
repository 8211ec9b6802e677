"""Export verification with the models streamed block by block (``ExportConfig.stream_original``).

The same numbers as the resident verification (:func:`emloc_engine.stages.export.exporter._verify`),
with never more than one decoder block of any model on the device
(:class:`~emloc_engine.weights.streamed.StreamedModel`), in as few passes over the weights as there are
models to read:

1. the original, ONE pass for every prompt and four variants: original + adapter (the reference,
   unmerged as peft runs it), the original alone (the adapter's effect), the adapter merged as
   peft's ``merge_adapter`` does (what a merged file can reproduce) and, in reduced precision, that
   merge rounded to the storage dtype (the rounding floor);
2. the merged folder, one pass: as stored, and rounded as the GGUF stores it (the GGUF's floor);
3. the GGUF file: transformers' GGUF reader dequantises it into CPU memory (it never goes to the
   device whole), and its blocks stream from there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from emloc_engine.core.errors import MergeError
from emloc_engine.core.progress import Progress
from emloc_engine.weights.checkpoint import Checkpoint
from emloc_engine.weights.streamed import StreamedModel, Variant, adapter_weights

if TYPE_CHECKING:
    from emloc_engine.stages.export.exporter import ExportConfig, _Verification


def _passes(
    model: StreamedModel, prompts: list[torch.Tensor], variants: list[Variant], progress: Progress
) -> list[list[torch.Tensor]]:
    """Logits ``[variant][prompt]`` (fp32, CPU, ``(1, T, vocab)``) from one pass over ``model``'s weights."""
    out: list[list[torch.Tensor]] = [[torch.empty(0)] * len(prompts) for _ in variants]

    def finish(v: int, c: int, hidden: torch.Tensor) -> None:
        out[v][c] = model.logits(hidden).float().cpu()

    try:
        model.run(
            [[p[0].tolist()] for p in prompts],
            variants,
            finish,
            on_block=lambda _b: progress.check_cancelled(),
        )
    finally:
        model.close()
    return out


def gguf_rounding(gguf_type: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A 2-D weight rounded as the GGUF stores it (:func:`~emloc_engine.stages.export.exporter._gguf_round`)."""
    from emloc_engine.stages.export.exporter import _gguf_round

    return lambda w: _gguf_round(w, gguf_type)


def verify_streamed(
    cfg: ExportConfig,
    adapter_dir: Path,
    n_modules: int,
    merged: Path | None,
    gguf: Path | None,
    gguf_source: Path | None,
    progress: Progress,
    dev: torch.device,
    dtype: torch.dtype,
) -> _Verification:
    """:func:`~emloc_engine.stages.export.exporter._verify`, streamed (see the module docstring)."""
    from emloc_engine.stages.export.exporter import (
        _max_diff,
        _prompt_ids,
        _storage_dtype,
        _tol,
        _Verification,
    )

    ids = _prompt_ids(cfg.model_dir, cfg.prompts)
    ver = _Verification()
    lora = adapter_weights(adapter_dir)
    ckpt = Checkpoint(cfg.model_dir)
    attached = sum(1 for name in lora if f"{name}.weight" in ckpt)
    ckpt.close()
    if attached != n_modules or len(lora) != n_modules:
        raise MergeError(
            f"The adapter fits {attached} modules of the model, but it has {n_modules}.",
            hint="The adapter's module names do not match this model; pass the right --model.",
        )
    store = _storage_dtype(cfg.model_dir)
    reduced = store if store in (torch.bfloat16, torch.float16) else dtype
    merge = "adapter" in cfg.formats or reduced != torch.float32
    variants = [Variant(lora=lora), Variant()]
    if merge:
        variants.append(Variant(lora=lora, merge=True))
    if reduced != torch.float32:
        variants.append(Variant(lora=lora, merge=True, round_weight=lambda w: w.to(reduced).to(w.dtype)))
    progress.update(0.0, f"Verifying, streamed: original + adapter ({len(variants)} variants in one pass)")
    logits = _passes(StreamedModel(cfg.model_dir, device=dev, dtype=dtype), ids, variants, progress)
    ref = logits[0]
    ver.effect = _max_diff(ref, logits[1])
    if merge:
        merged_diff = _max_diff(ref, logits[2])
        if reduced != torch.float32:
            ver.floor = max(merged_diff, _max_diff(ref, logits[3]))
        if "adapter" in cfg.formats:
            ver.add("adapter", merged_diff, max(_tol(str(dtype).split(".")[-1], ref), 1.5 * ver.floor))
    gguf_floor = 0.0
    rounds = gguf is not None and cfg.gguf_type != "f32"
    source = merged if merged is not None else (gguf_source if rounds else None)
    if source is not None:
        progress.update(0.4, "Verifying, streamed: merged folder")
        mvariants = [Variant()]
        if rounds:
            mvariants.append(
                Variant(
                    round_weight=gguf_rounding(cfg.gguf_type),
                    round_filter=lambda _n, _t: True,
                    round_outside=True,
                )
            )
        mlogits = _passes(StreamedModel(source, device=dev, dtype=dtype), ids, mvariants, progress)
        if merged is not None:
            ver.add(
                "merged",
                _max_diff(ref, mlogits[0]),
                max(_tol(str(store).split(".")[-1], ref), 1.5 * ver.floor),
            )
        if rounds:
            gguf_floor = _max_diff(ref, mlogits[1])
    if gguf is not None:
        progress.update(0.7, "Verifying, streamed: GGUF (transformers' GGUF reader, in CPU memory)")
        ver.add(
            "gguf",
            _max_diff(ref, _gguf_logits(gguf, ids, dev, dtype, progress)),
            max(_tol(cfg.gguf_type, ref), 1.5 * ver.floor, 1.5 * gguf_floor),
        )
        ver.gguf_floor = gguf_floor
    progress.update(1.0, "Verified")
    return ver


def _gguf_logits(
    gguf: Path, ids: list[torch.Tensor], dev: torch.device, dtype: torch.dtype, progress: Progress
) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    g = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=dtype, trust_remote_code=False, local_files_only=True
    )
    tensors = dict(g.state_dict())
    config = g.config
    del g
    return _passes(
        StreamedModel(gguf.parent, device=dev, dtype=dtype, tensors=tensors, config=config),
        ids,
        [Variant()],
        progress,
    )[0]


__all__ = ["gguf_rounding", "verify_streamed"]
