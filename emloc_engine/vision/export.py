"""Stage 4 for vision-language models: the merged folder, the adapter, and GGUF of the language model.

:func:`export_vlm` is what the run orchestrator calls for a VLM's export stage. Every export is
checked before the stage is recorded as done.

* ``merged``: :func:`~emloc_engine.vision.finetune.merge_vlm` (``RUN_DIR/merged``: the source's
  shards with ``W + s·B·A``, its processor files and chat template; loads with
  ``AutoModelForImageTextToText``). Verified: its logits on up to :data:`VERIFY_SAMPLES` of the run's
  own image samples against the original + the corrected adapter through peft.
* ``adapter``: ``RUN_DIR/adapter-corrected`` (a peft adapter; it loads with ``PeftModel``).
* ``gguf``: llama.cpp splits a VLM into two files, the language model and the vision encoder with
  its projector (``mmproj``). Decision:

  - the **language model** is written to ``RUN_DIR/model.gguf`` through the text GGUF exporter
    (:mod:`emloc_engine.stages.export.gguf_export`) when its family is one that exporter writes:
    LLaVA 1.5/NeXT and Idefics3/SmolVLM (Llama), LLaVA-OneVision and InternVL (Qwen2), Gemma 3
    (``gemma3``), the architectures llama.cpp's ``convert_hf_to_gguf.py`` gives these language
    models. Its tensors are read back and compared with the merged language model's.
    Qwen2-VL / Qwen2.5-VL are refused: their language model uses M-RoPE (llama.cpp's ``qwen2vl``
    architecture with rope sections), which the exporter does not write.
  - the **mmproj** file is not written, for any family: llama.cpp's ``clip`` loader expects tensor
    names and ``clip.*`` metadata that differ per projector type and change between llama.cpp
    releases, and nothing here can run llama.cpp to show a file we wrote is read faithfully. The
    export says so (:data:`MMPROJ_NOTE`) and gives the fix: llama.cpp's
    ``convert_hf_to_gguf.py RUN_DIR/merged --mmproj``, from the merged folder, which carries the
    fine-tuned vision tower.
  - ``adapter-gguf``, ``ollama`` and ``lmstudio`` are refused for a VLM (:func:`vlm_export_problem`):
    they would hand a runtime the language model without its vision part.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emloc_engine.core.atomic import atomic_dir
from emloc_engine.core.errors import MergeError, UnsupportedModel
from emloc_engine.core.layout import RunLayout
from emloc_engine.core.progress import NULL_PROGRESS, Progress, sub
from emloc_engine.data.config import DataConfig
from emloc_engine.weights.headers import load_config

VERIFY_SAMPLES = 2
VLM_EXPORTS = ("merged", "adapter", "gguf")
"""The exports a vision-language run can have (see the module docstring)."""
MMPROJ_NOTE = (
    "The vision part of the GGUF (llama.cpp's mmproj file) is not written; make it from the merged "
    "folder with llama.cpp: python convert_hf_to_gguf.py {merged} --mmproj"
)
# Checkpoint prefix of the language model -> the text model's prefix, first match wins (hub layout, then
# transformers >= 5's own names). Tensors that match none (vision tower, projector) are not the LM's.
_LM_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
    ("model.text_model.", "model."),
    ("lm_head.", "lm_head."),
)
# Tensor read-back tolerance relative to the tensor's largest value, per GGUF type (its rounding).
_READBACK_TOL = {"f32": 1e-6, "f16": 1e-3, "bf16": 8e-3, "q8_0": 1.5e-2}
_READBACK_TOL_DEFAULT = 0.25  # 4-6 bit types: one quantisation step of a block's largest value


@dataclass(frozen=True)
class VlmExportConfig:
    """What to export from a VLM run."""

    run_dir: Path = field(metadata={"help": "The run folder (exports are written inside it)."})
    model_dir: Path = field(metadata={"help": "The original VLM folder."})
    data: DataConfig = field(metadata={"help": "The run's image data (samples for the verification)."})
    formats: tuple[str, ...] = field(default=VLM_EXPORTS, metadata={"help": "Any of merged, adapter, gguf."})
    gguf_type: str = field(default="f16", metadata={"help": "GGUF weight type of the language model."})
    verify: bool = field(default=True, metadata={"help": "Load every export back and compare it."})
    device: str = field(default="cpu", metadata={"help": "Device for the verification."})

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        problem = vlm_export_problem(self.formats, self.model_dir)
        if problem:
            raise UnsupportedModel(problem, hint="Choose exports from merged, adapter, gguf.")


@dataclass(frozen=True)
class VlmExportResult:
    """What was written and how it checked out (``verification``: ``(export, max |Δ|)``: logits for the merged
    folder, tensors relative to their largest value for the GGUF; ``tolerances`` in the same order)."""

    merged_dir: Path | None
    adapter_dir: Path | None
    gguf_path: Path | None
    verification: tuple[tuple[str, float], ...]
    tolerances: tuple[tuple[str, float], ...]
    mmproj_note: str
    wall_s: float
    peak_rss_gib: float = 0.0
    # Never written for a VLM (see the module docstring); named as the text export names them, so the
    # CLI summary, the manifest record and the app read both results alike.
    adapter_gguf_path: Path | None = None
    modelfile_path: Path | None = None
    lmstudio_path: Path | None = None
    ollama_command: tuple[str, ...] | None = None


def language_model_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's own ``config.json`` (the VLM's ``text_config`` and its head tying)."""
    text = dict(config.get("text_config") or {})
    tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings"))
    if tie is not None:
        text["tie_word_embeddings"] = bool(tie)
    return text


def vlm_gguf_problem(model_dir: Path) -> str | None:
    """Why the language model of this VLM cannot be written as GGUF (None when it can)."""
    from emloc_engine.stages.export.gguf_export import gguf_support_problem, gguf_tokenizer_problem

    config = load_config(Path(model_dir))
    if config.get("model_type") in ("qwen2_vl", "qwen2_5_vl"):
        return (
            f"the {config['model_type']} language model uses M-RoPE (llama.cpp's qwen2vl architecture), "
            "which this GGUF exporter does not write; convert RUN_DIR/merged with llama.cpp's "
            "convert_hf_to_gguf.py (and --mmproj for the vision part)"
        )
    problem = gguf_support_problem(language_model_config(config)) or gguf_tokenizer_problem(Path(model_dir))
    return f"its language model: {problem}" if problem else None


def vlm_export_problem(formats: tuple[str, ...] | list[str], model_dir: Path) -> str | None:
    """Why these exports cannot be made for this VLM (None when they can); checked before any work."""
    other = [f for f in formats if f not in VLM_EXPORTS]
    if other:
        return (
            f"{', '.join(other)} export of a vision-language model is not supported: it would give the "
            "runtime the language model without its vision part"
        )
    if "gguf" in formats:
        problem = vlm_gguf_problem(model_dir)
        if problem:
            return f"Cannot export GGUF of {Path(model_dir).name}: {problem}"
    return None


def write_language_model(merged_dir: Path, out_dir: Path) -> Path:
    """The merged VLM's language model as a text model folder (config, renamed shards, tokenizer files).

    Streams one shard at a time. ``out_dir`` is written through a ``.partial`` folder.

    Raises:
        MergeError: the merged folder has no language-model tensors.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    merged_dir = Path(merged_dir)
    n = 0
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        for shard in sorted(merged_dir.glob("*.safetensors")):
            out: dict[str, torch.Tensor] = {}
            with safe_open(str(shard), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    new = next((to + name[len(fr) :] for fr, to in _LM_PREFIXES if name.startswith(fr)), None)
                    if new is not None:
                        out[new] = fh.get_tensor(name).contiguous()
            if out:
                save_file(out, str(tmp / shard.name), metadata={"format": "pt"})
                n += len(out)
        if n == 0:
            raise MergeError(f"{merged_dir} has no language-model tensors to write as GGUF.")
        (tmp / "config.json").write_text(
            json.dumps(language_model_config(load_config(merged_dir)), indent=2), encoding="utf-8"
        )
        for f in merged_dir.iterdir():
            if (
                f.is_file()
                and f.suffix not in (".safetensors", ".py")
                and f.name not in ("config.json", "model.safetensors.index.json")
            ):
                shutil.copyfile(f, tmp / f.name)
    return Path(out_dir)


def _gguf_readback(gguf_path: Path, lm_dir: Path, gguf_type: str) -> tuple[float, float]:
    """``(max relative |Δ|, tolerance)`` of the GGUF's tensors against the language model folder's."""
    from safetensors import safe_open

    from emloc_engine.stages.export.gguf_readback import gguf_state_dict

    read = gguf_state_dict(gguf_path, lm_dir)
    worst = 0.0
    for shard in sorted(lm_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118
                if name not in read:
                    continue
                ref = fh.get_tensor(name).float()
                scale = float(ref.abs().max()) or 1.0
                worst = max(worst, float((read[name] - ref).abs().max()) / scale)
    return worst, _READBACK_TOL.get(gguf_type, _READBACK_TOL_DEFAULT)


def _verify_merged(cfg: VlmExportConfig, adapter_dir: Path, merged: Path) -> tuple[float, float]:
    """``(max |Δlogit|, tolerance)``: merged vs original + adapter (peft) on the run's first samples."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from emloc_engine.data.vision_pipeline import prepare_vision_dataset
    from emloc_engine.machine import devices
    from emloc_engine.vision.finetune import example_batch
    from emloc_engine.vision.processor import load_processor

    dev = devices.resolve_device(cfg.device)
    processor = load_processor(cfg.model_dir)
    prepared = prepare_vision_dataset(cfg.data, processor)
    examples = (prepared.eval + prepared.train)[:VERIFY_SAMPLES]
    kw: dict[str, Any] = dict(dtype=torch.float32, local_files_only=True)

    def logits(model: Any) -> list[torch.Tensor]:
        out = []
        with torch.no_grad():
            for ex in examples:
                batch = example_batch(processor, ex, dev, torch.float32)
                batch.pop("labels")
                out.append(model(**batch, use_cache=False).logits.float().cpu())
        return out

    base: Any = AutoModelForImageTextToText.from_pretrained(cfg.model_dir, trust_remote_code=False, **kw)
    ref = logits(PeftModel.from_pretrained(base.to(dev), str(adapter_dir), is_trainable=False).eval())
    del base
    merged_model: Any = AutoModelForImageTextToText.from_pretrained(merged, trust_remote_code=False, **kw)
    got = logits(merged_model.to(dev).eval())
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, got, strict=True))
    scale = max(float(r.abs().max()) for r in ref)
    # The merged shards keep the source's dtype: a bf16/f16 model rounds W + ΔW once more than peft does.
    stored = {torch.float32: 1e-4}.get(_storage_dtype(cfg.model_dir), 2e-2)
    return diff, stored * max(1.0, scale)


def _storage_dtype(model_dir: Path) -> torch.dtype:
    name = str(load_config(model_dir).get("dtype") or load_config(model_dir).get("torch_dtype") or "float32")
    return getattr(torch, name, torch.float32)


def export_vlm(cfg: VlmExportConfig, progress: Progress = NULL_PROGRESS) -> VlmExportResult:
    """Write and check the requested exports of a VLM run (see the module docstring).

    Raises:
        UnsupportedModel: an export this VLM cannot have (refused before anything is written).
        MergeError: a merge or read-back failed, or an export does not reproduce original + adapter
            (the files are kept for inspection; the stage is not recorded as done).
    """
    from emloc_engine.vision.finetune import merge_vlm

    t0 = time.monotonic()
    lay = RunLayout(cfg.run_dir)
    adapter = (
        lay.adapter_corrected if (lay.adapter_corrected / "adapter_config.json").is_file() else lay.adapter
    )
    merged = gguf = None
    checks: list[tuple[str, float]] = []
    tols: list[tuple[str, float]] = []
    if "merged" in cfg.formats or "gguf" in cfg.formats:  # the GGUF is made from the merged weights
        merged = merge_vlm(cfg.model_dir, adapter, lay.merged, lay.emulator, sub(progress, 0.0, 0.4))
        if cfg.verify:
            diff, tol = _verify_merged(cfg, adapter, merged)
            checks.append(("merged", diff))
            tols.append(("merged", tol))
    progress.update(0.6, "merged")
    if "gguf" in cfg.formats:
        assert merged is not None
        gguf = _write_lm_gguf(cfg, lay, merged, checks, tols, sub(progress, 0.6, 1.0))
    bad = [
        f"{n}: max |Δ| {d:.4g} > tolerance {t:.4g}"
        for (n, d), (_, t) in zip(checks, tols, strict=True)
        if not d <= t
    ]
    if bad:
        raise MergeError(
            "Export verification failed: the export does not reproduce original + adapter.",
            problems=bad,
            hint="The files are kept for inspection; do not use them.",
        )
    progress.update(1.0, "exported")
    return VlmExportResult(
        merged_dir=merged if "merged" in cfg.formats else None,
        adapter_dir=adapter if "adapter" in cfg.formats else None,
        gguf_path=gguf,
        verification=tuple(checks),
        tolerances=tuple(tols),
        mmproj_note=MMPROJ_NOTE.format(merged=lay.merged) if gguf is not None else "",
        wall_s=time.monotonic() - t0,
    )


def _write_lm_gguf(
    cfg: VlmExportConfig,
    lay: RunLayout,
    merged: Path,
    checks: list[tuple[str, float]],
    tols: list[tuple[str, float]],
    progress: Progress,
) -> Path:
    """The language model of ``merged`` as ``RUN_DIR/model.gguf`` (the temporary text folder is removed)."""
    from emloc_engine.stages.export.gguf_export import GgufConfig, export_gguf

    lm_dir = lay.root / "language-model.partial"  # a killed export's leftover is removed on resume
    try:
        write_language_model(merged, lm_dir)
        result = export_gguf(
            GgufConfig(lm_dir, lay.gguf, cfg.gguf_type, name=f"{cfg.model_dir.name}-emloc", overwrite=True),
            sub(progress, 0.0, 0.8),
        )
        if cfg.verify:
            diff, tol = _gguf_readback(result.path, lm_dir, cfg.gguf_type)
            checks.append(("gguf", diff))
            tols.append(("gguf", tol))
    finally:
        shutil.rmtree(lm_dir, ignore_errors=True)
    return result.path


__all__ = [
    "MMPROJ_NOTE",
    "VLM_EXPORTS",
    "VlmExportConfig",
    "VlmExportResult",
    "export_vlm",
    "language_model_config",
    "vlm_export_problem",
    "vlm_gguf_problem",
    "write_language_model",
]
