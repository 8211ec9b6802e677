"""Stage 4: merge the (corrected) LoRA adapter into the original model and export it.

Three exports, each optional (``formats``):

* ``merged`` -> ``RUN_DIR/merged/``: a Hugging Face folder. Every original shard is streamed tensor by
  tensor: read, ``W + s·B·A`` added in fp32 where the adapter has a module (:func:`merge_weight`,
  checked for NaN/Inf before anything is written), written in the source dtype into a shard of the
  same name and split, then ``model.safetensors.index.json``, config, generation config, tokenizer,
  chat template, licence files and a model card (never the source's ``*.py`` code, and configs
  without ``auto_map``). Peak CPU memory is about one tensor (plus an fp32
  copy of the largest adapted weight), never a shard or the model.
* ``adapter`` -> the portable peft adapter. The run layout already holds it
  (``RUN_DIR/adapter-corrected/``), so it is not copied: it is loaded with
  ``PeftModel.from_pretrained(original, path)``, checked, and given a model card (``README.md``,
  replacing peft's template). An adapter given from outside the run folder is copied into
  ``RUN_DIR/adapter-export/`` instead, so nothing outside the run is written.
* ``gguf`` -> ``RUN_DIR/model.gguf`` streamed from the merged folder (:mod:`emloc_engine.stages.export.gguf_export`);
  it implies ``merged`` when no merged folder exists yet. 4/5/8-bit types are written here, K-quants
  through llama.cpp's ``llama-quantize`` (:mod:`~emloc_engine.stages.export.gguf_quantize`).
* ``adapter-gguf`` -> ``RUN_DIR/adapter.gguf``: the corrected adapter as a llama.cpp LoRA adapter
  (:mod:`~emloc_engine.stages.export.adapter_gguf`), for the user's unchanged base GGUF.
* ``ollama`` -> ``RUN_DIR/Modelfile`` (:mod:`~emloc_engine.stages.export.modelfile`): ``FROM`` the user's
  base GGUF + ``ADAPTER ./adapter.gguf`` when the run started from a GGUF (it implies ``adapter-gguf``),
  else ``FROM ./model.gguf`` (it implies ``gguf``). The ``ollama create`` command is returned, never run.
* ``lmstudio`` -> the verified GGUF linked or copied into LM Studio's models folder
  (:mod:`~emloc_engine.stages.export.lmstudio`); it implies ``gguf``.

Every export is written under a temporary name and renamed when complete; a non-empty target is
refused unless ``overwrite``; nothing is ever written inside the source model folder or the Hugging
Face cache. With ``verify`` each export is loaded back (transformers, peft, transformers' GGUF reader)
and its logits on a few prompts are compared with the original model + adapter through peft; the
largest absolute difference per export is reported, and one beyond its tolerance raises.

**Tolerances.** :data:`TOLERANCES` gives each storage type a difference relative to the largest
logit. A GGUF stores weights in its own type (f16 by default, also for an fp32 model: what llama.cpp's
converter writes too, half the size of f32), and how much that rounding moves the logits depends on
the model (sharp attention and large activations amplify it), not only on the type: the default
f16 export of an fp32 model failed at ``0.018 > 0.01``. So the GGUF is also measured against its
*rounding floor*: the merged model with every weight rounded exactly as the GGUF stores it (f16,
bf16 or Q8_0 blocks; 1-D tensors stay f32), whose logits differ from the reference by pure rounding.
The GGUF's tolerance is ``max(relative tolerance, 1.5 × floor)``: a faithful file lands on the floor
(same weights, same arithmetic), while a wrong tensor layout or a lost adapter differs by the size of
the logits. ``--gguf-type f32`` stays exact (1e-4 relative).
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emloc_engine.catalog.locations import inside, protected_place
from emloc_engine.core.atomic import atomic_dir, write_json_atomic, write_text_atomic
from emloc_engine.core.errors import MergeError, ModelNotFound
from emloc_engine.core.layout import RunLayout
from emloc_engine.core.progress import NULL_PROGRESS, Progress, sub
from emloc_engine.machine.devices import resolve_device
from emloc_engine.machine.process_memory import GpuPeak, RssSampler
from emloc_engine.stages.export.merge import (
    SAFETENSORS_DTYPES,
    LoraDelta,
    ShardWriter,
    merge_state_dict,
    merge_weight,
    read_lora_deltas,
    read_shard_index,
    read_tensor,
)
from emloc_engine.stages.export.model_card import RunFacts, collect_facts, render_card
from emloc_engine.stages.export.options import DEFAULT_PROMPTS, EXPORT_FORMATS, K_QUANT_TYPES, ExportOptions
from emloc_engine.stages.export.verify_budget import verify_placement
from emloc_engine.weights.checkpoint import Checkpoint
from emloc_engine.weights.gguf_source import GGUF_VIEW_MARKER, is_gguf_view
from emloc_engine.weights.headers import WEIGHT_SUFFIXES, load_config
from emloc_engine.weights.loading import ADAPTER_NAME, load_causal_lm

log = logging.getLogger(__name__)

# Largest allowed |logit difference| as a fraction of max(1, max |reference logit|), by the storage
# type of the export: fp32 is exact up to summation order; fp16/bf16 round every weight (2^-11 / 2^-8
# relative); Q8_0 rounds to 8 bits per block of 32. Wrong tensor layouts give differences of order 1.
# Rounded exports may also reach 1.5 × their measured rounding floor (module docstring, "Tolerances").
TOLERANCES = {"float64": 1e-4, "float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2, "f32": 1e-4, "f16": 1e-2, "bf16": 3e-2,
              "q8_0": 1e-1, "q5_1": 0.2, "q5_0": 0.2, "q4_1": 0.3, "q4_0": 0.3,
              **{k: 0.3 for k in K_QUANT_TYPES}}
# K-quants are written by llama-quantize, whose rounding gguf.quants cannot reproduce: their rounding floor
# is measured with the block type of the same width that gguf.quants writes, twice over (docstring).
K_QUANT_FLOOR_PROXY = {"q6_k": "q8_0", "q5_k_m": "q5_1", "q5_k_s": "q5_1", "q4_k_m": "q4_1", "q4_k_s": "q4_1",
                       "q3_k_m": "q4_0", "q3_k_s": "q4_0", "q3_k_l": "q4_0", "q2_k": "q4_0"}
_NON_WEIGHT_SKIP = {"model.safetensors.index.json", "README.md", ".gitattributes", GGUF_VIEW_MARKER}
_CODE_SUFFIXES = (".py", ".pyc", ".so")


@dataclass(frozen=True)
class ExportConfig(ExportOptions):
    """What to export from a run, and how: the options plus the run, the original model and the device."""

    run_dir: Path = field(metadata={"help": "The run folder (exports are written inside it)."})
    model_dir: Path = field(metadata={"help": "The original model folder the adapter was trained for."})
    adapter_dir: Path | None = field(default=None, metadata={
        "help": "The peft adapter to merge; default RUN_DIR/adapter-corrected, else RUN_DIR/adapter."})
    overwrite: bool = field(default=False, metadata={"help": "Replace exports that already exist."})
    device: str = field(default="cpu", metadata={"help": "Device for verification: cpu, cuda or auto."})
    memory_budget_bytes: int | None = field(default=None, metadata={
        "help": "GPU memory the verification may use (the run's budget): fp32 on the GPU when a copy fits it, "
                "else the storage dtype, else the CPU (emloc_engine.stages.export.verify_budget); None = the "
                "GPU's free memory."})
    stream_original: bool = field(default=False, metadata={
        "help": "Verify with every model streamed block by block from its shards (the original need not fit "
                "the device; one pass per model for all prompts and comparisons); off: load each whole."})
    run_facts: RunFacts = field(default_factory=RunFacts, metadata={
        "help": "What the run recorded (data, ρ, steps, eval loss), for the model card."})

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if not self.formats:
            problems.append(f"formats []: choose one or more of {', '.join(EXPORT_FORMATS)}")
        if self.device not in ("cpu", "cuda", "auto") and not str(self.device).startswith("cuda:"):
            problems.append(f"device {self.device!r}: choose cpu, cuda or auto")
        return problems


@dataclass(frozen=True)
class ExportResult:
    """What was written, how it checked out, and what it cost.

    Attributes:
        verification: ``(export, max |logit − reference logit|)`` per verified export.
        tolerances: ``(export, allowed difference)`` in the same order.
        adapter_effect: max |logit change| the adapter causes on the original (0 means it does nothing).
        peak_rss_gib: the process's peak resident memory while exporting (sampled), verification included;
            file-backed pages (memory-mapped shards read for the verification) count.
        merge_peak_rss_gib: the same during the streaming merge alone (about one tensor).
        peak_anon_rss_gib: ``peak_rss_gib`` without file-backed pages (anonymous + shared memory,
            :func:`~emloc_engine.machine.process_memory.resident_memory`): what the run's RAM plan counts.
        peak_vram_gib: the peak GPU memory torch allocated while exporting (the verification's; the merge
            and the GGUF run on the CPU); 0.0 when nothing ran on a GPU.
    """

    merged_dir: Path | None
    adapter_dir: Path | None
    gguf_path: Path | None
    verification: tuple[tuple[str, float], ...]
    peak_rss_gib: float
    tolerances: tuple[tuple[str, float], ...] = ()
    adapter_effect: float | None = None
    merged_modules: int = 0
    merge_s: float = 0.0
    gguf_s: float = 0.0
    verify_s: float = 0.0
    wall_s: float = 0.0
    merge_peak_rss_gib: float = 0.0
    adapter_gguf_path: Path | None = None
    modelfile_path: Path | None = None
    lmstudio_path: Path | None = None
    ollama_command: tuple[str, ...] | None = None
    peak_vram_gib: float = 0.0
    peak_anon_rss_gib: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary for the manifest and the CLI."""
        return {
            "merged_dir": str(self.merged_dir) if self.merged_dir else None,
            "adapter_dir": str(self.adapter_dir) if self.adapter_dir else None,
            "gguf_path": str(self.gguf_path) if self.gguf_path else None,
            "verification": [[n, d] for n, d in self.verification],
            "tolerances": [[n, d] for n, d in self.tolerances],
            "adapter_effect": self.adapter_effect, "merged_modules": self.merged_modules,
            "peak_rss_gib": round(self.peak_rss_gib, 3), "merge_s": round(self.merge_s, 2),
            "gguf_s": round(self.gguf_s, 2), "verify_s": round(self.verify_s, 2), "wall_s": round(self.wall_s, 2),
            "merge_peak_rss_gib": round(self.merge_peak_rss_gib, 3), "peak_vram_gib": round(self.peak_vram_gib, 3),
            "peak_anon_rss_gib": round(self.peak_anon_rss_gib, 3),
            "adapter_gguf_path": str(self.adapter_gguf_path) if self.adapter_gguf_path else None,
            "modelfile_path": str(self.modelfile_path) if self.modelfile_path else None,
            "lmstudio_path": str(self.lmstudio_path) if self.lmstudio_path else None,
            "ollama_command": list(self.ollama_command) if self.ollama_command else None,
        }


# -- where we may write --------------------------------------------------------------------------------
def check_output_location(out: Path, model_dir: Path) -> None:
    """Refuse to write ``out`` inside the source model folder, a HF cache or a runtime's model store.

    Raises:
        MergeError: naming the protected folder and what to do instead.
    """
    why = protected_place(out, model_dir)
    if why is not None:
        raise MergeError(f"Refusing to write {out}: {why}.",
                         hint="Put the run folder somewhere else (the source model is never modified).")


def resolve_adapter_dir(run_dir: Path, adapter_dir: Path | None) -> Path:
    """The adapter to export: the one given, else ``adapter-corrected/``, else ``adapter/``.

    Raises:
        ModelNotFound: none exists.
    """
    if adapter_dir is not None:
        return Path(adapter_dir)
    layout = RunLayout(Path(run_dir))
    for cand in (layout.adapter_corrected, layout.adapter):
        if (cand / "adapter_config.json").is_file():
            return cand
    raise ModelNotFound(f"No adapter in {run_dir} (neither adapter-corrected/ nor adapter/).",
                        hint="Run `emloc train` and `emloc correct` first, or pass --adapter DIR.")


def _tied(config: dict[str, Any]) -> bool:
    default = str(config.get("model_type", "")).startswith("gemma")
    return bool(config.get("tie_word_embeddings", default))


def _check_adapter_fits(model_dir: Path, deltas: dict[str, LoraDelta], names: set[str]) -> None:
    missing = [m for m in deltas if f"{m}.weight" not in names]
    if missing:
        raise MergeError(f"The adapter adapts {len(missing)} module(s) that {model_dir} does not have:",
                         problems=missing[:10], hint="Pass the base model the adapter was trained on (--model).")


def _check_tied_head(config: dict[str, Any], adapter_dir: Path) -> None:
    """Refuse an adapter on lm_head when the model ties lm_head to the input embeddings.

    A merged tied model has one matrix for both; adding ``s·B·A`` to it would also change the input
    embeddings, which the adapter never did. (peft also saves the tied base matrix in such adapters.)
    """
    if not _tied(config):
        return
    weights = adapter_dir / "adapter_model.safetensors"
    names = [e.name for e in read_shard_index(weights)[0]] if weights.is_file() else []
    if any(".lm_head.lora_" in n or ".embed_tokens.lora_" in n for n in names):
        raise MergeError("The adapter adapts lm_head, but this model ties lm_head to the input embeddings: "
                         "merging would change both.",
                         hint="Train without lm_head in target_modules (the default), or use the adapter unmerged.")


# -- merged folder -------------------------------------------------------------------------------------
def _copy_side_files(model_dir: Path, out: Path) -> None:
    """Config, generation config, tokenizer, chat template, licence... everything but weights and README.

    Never code: ``*.py`` files are left out and ``auto_map`` is removed from the configs
    (:data:`~emloc_engine.core.trust.AUTO_MAP_FILES`), so the merged folder loads with transformers'
    own implementation everywhere and cannot make anyone else's loader run the source's code.
    """
    from emloc_engine.core.trust import AUTO_MAP_FILES

    for p in sorted(Path(model_dir).iterdir()):
        if p.name in _NON_WEIGHT_SKIP or p.name.endswith(WEIGHT_SUFFIXES) or p.name.startswith("."):
            continue
        if p.suffix in _CODE_SUFFIXES:
            log.info("Not copying %s into the export: a model folder's code is never carried along.", p.name)
        elif p.is_file() and p.name in AUTO_MAP_FILES:
            _copy_without_auto_map(p, out / p.name)
        elif p.is_file():
            shutil.copy2(p, out / p.name)  # follows the HF cache's symlinks into blobs
        elif p.is_dir() and p.name == "additional_chat_templates":
            shutil.copytree(p, out / p.name)


def _copy_without_auto_map(src: Path, dst: Path) -> None:
    """Copy a JSON config, dropping its ``auto_map`` (the pointer to the source folder's own code)."""
    try:
        data = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        data = None
    if not isinstance(data, dict) or "auto_map" not in data:
        shutil.copy2(src, dst)
        return
    del data["auto_map"]
    dst.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_merged_shards(model_dir: Path, deltas: dict[str, LoraDelta], out: Path,
                        progress: Progress = NULL_PROGRESS) -> int:
    """Stream every shard of ``model_dir`` into ``out`` with the LoRA deltas added; returns modules merged.

    Shard names, split and tensor order are the source's; each merged weight is computed in fp32 and
    stored in its source dtype. Writes ``model.safetensors.index.json`` too.

    Raises:
        MergeError: a corrupt/truncated shard or a non-finite merge (names the tensor).
        OSError: the disk is full (the caller's :func:`~emloc_engine.core.atomic.atomic_dir` removes its
            temporary folder and raises :class:`~emloc_engine.core.errors.DiskFull`).
    """
    if is_gguf_view(Path(model_dir)):  # no shards to copy: the weights stream out of the GGUF
        from emloc_engine.stages.export.merge_stream import write_merged_from_checkpoint

        return write_merged_from_checkpoint(Path(model_dir), deltas, out, progress)
    files = sorted(Path(model_dir).glob("*.safetensors"))
    indexes = [read_shard_index(f) for f in files]  # validates every header before writing anything
    total = sum(e.nbytes for entries, _ in indexes for e in entries) or 1
    done, merged, weight_map = 0, 0, {}
    for f, (entries, meta) in zip(files, indexes):
        specs = [(e.name, SAFETENSORS_DTYPES[e.dtype], e.shape) for e in entries]
        with open(f, "rb") as src, ShardWriter(out / f.name, specs, {"format": "pt", **meta}) as dst:
            for e in entries:
                progress.check_cancelled()
                t = read_tensor(src, e, f.name)
                module = e.name[: -len(".weight")] if e.name.endswith(".weight") else None
                if module in deltas:
                    t = merge_weight(e.name, t, deltas[module])
                    merged += 1
                dst.write(e.name, t)
                weight_map[e.name] = f.name
                done += e.nbytes
                progress.update(done / total, f"Merging {f.name}")
                del t
    write_json_atomic(out / "model.safetensors.index.json",
                      {"metadata": {"total_size": total if weight_map else 0}, "weight_map": weight_map})
    return merged


def _export_merged(cfg: ExportConfig, deltas: dict[str, LoraDelta], target: Path, card: str,
                   progress: Progress) -> int:
    size = sum(i.nbytes for i in Checkpoint(cfg.model_dir).infos())
    with atomic_dir(target, overwrite=cfg.overwrite, needed_bytes=size) as tmp:
        n = write_merged_shards(cfg.model_dir, deltas, tmp, progress)
        _copy_side_files(cfg.model_dir, tmp)
        write_text_atomic(tmp / "README.md", card)
    return n


# -- verification ----------------------------------------------------------------------------------------
def _prompt_ids(model_dir: Path, prompts: tuple[str, ...]) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    texts = list(prompts)
    if getattr(tok, "chat_template", None):
        texts.append(str(tok.apply_chat_template([{"role": "user", "content": prompts[0]}], tokenize=False,
                                                 add_generation_prompt=True)))
    return [torch.tensor([tok(t, add_special_tokens=True)["input_ids"][:64]]) for t in texts]


@torch.no_grad()
def _logits(model: Any, ids: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    return [model(input_ids=x.to(device)).logits.float().cpu() for x in ids]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _free(*objs: Any) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _verify_dtype(model_dir: Path, dev: torch.device) -> torch.dtype:
    """fp32 when one fp32 copy of the model fits the verification device with room to spare, else
    the storage dtype (then tolerances are widened to the rounding floor, see :func:`_verify`)."""
    import psutil

    store = _storage_dtype(model_dir)
    if not store.is_floating_point:
        return store
    on_gpu = dev.type == "cuda"
    free = int(torch.cuda.mem_get_info(dev)[0]) if on_gpu else int(psutil.virtual_memory().available)
    place = verify_placement(Checkpoint(model_dir).num_parameters(), store.itemsize, on_gpu=on_gpu, free_bytes=free)
    return torch.float32 if place.fp32 else store


def _verify_placement(model_dir: Path, dev: torch.device, budget_bytes: int | None) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of the verification under the run's budget
    (:func:`~emloc_engine.stages.export.verify_budget.verify_placement`: fp32 on the GPU, else the
    storage dtype on the GPU, else the CPU); without a budget (or off the GPU) :func:`_verify_dtype`."""
    import psutil

    store = _storage_dtype(model_dir)
    if budget_bytes is None or dev.type != "cuda" or not store.is_floating_point:
        return dev, _verify_dtype(model_dir, dev)
    free = int(torch.cuda.mem_get_info(dev)[0])
    place = verify_placement(Checkpoint(model_dir).num_parameters(), store.itemsize, on_gpu=True, free_bytes=free,
                             budget_bytes=budget_bytes, ram_free_bytes=int(psutil.virtual_memory().available))
    if place.device == "gpu":
        return dev, torch.float32 if place.fp32 else store
    log.info("Export verification runs on the CPU: the model does not fit the %.2f GiB budget on the GPU.",
             budget_bytes / 2**30)
    cpu = torch.device("cpu")
    return cpu, _verify_dtype(model_dir, cpu)


@dataclass
class _Verification:
    diffs: list[tuple[str, float]] = field(default_factory=list)
    tols: list[tuple[str, float]] = field(default_factory=list)
    effect: float | None = None
    # In reduced precision (bf16/fp16 verification), how far peft's own in-memory merge in that
    # dtype lands from the unmerged reference: pure rounding, the floor any merged export shares.
    floor: float = 0.0
    # How far the merged model lands once its weights are rounded as the GGUF stores them (0 for f32).
    gguf_floor: float = 0.0

    def add(self, name: str, diff: float, tol: float) -> None:
        self.diffs.append((name, diff))
        self.tols.append((name, tol))


def _reference(cfg: ExportConfig, adapter_dir: Path, n_modules: int, dtype: torch.dtype,
               ids: list[torch.Tensor], dev: torch.device, ver: _Verification) -> list[torch.Tensor]:
    """Logits of original + adapter through peft (unmerged); checks peft's own merge on the way."""
    model = load_causal_lm(cfg.model_dir, device=dev, dtype=dtype, adapter_dir=adapter_dir)
    try:
        attached = sum(1 for _, m in model.named_modules() if ADAPTER_NAME in getattr(m, "lora_A", {}))
        if attached != n_modules:
            raise MergeError(f"peft attached the adapter to {attached} modules, but it has {n_modules}.",
                             hint="The adapter's module names do not match this model; pass the right --model.")
        ref = _logits(model, ids, dev)
        with model.disable_adapter():
            ver.effect = _max_diff(ref, _logits(model, ids, dev))
        store = _storage_dtype(cfg.model_dir)
        reduced = store if store in (torch.bfloat16, torch.float16) else dtype
        if "adapter" in cfg.formats or reduced != torch.float32:
            model.merge_adapter(safe_merge=True)
            merged_diff = _max_diff(ref, _logits(model, ids, dev))
            if reduced != torch.float32:
                # What a merged file in the storage dtype can at best reproduce: peft's own merge,
                # each merged weight rounded to that dtype (the "rounding floor" of the export).
                with torch.no_grad():
                    for _, mod in model.named_modules():
                        if ADAPTER_NAME in getattr(mod, "lora_A", {}):
                            w = mod.get_base_layer().weight
                            w.copy_(w.to(reduced).to(w.dtype))
                ver.floor = max(merged_diff, _max_diff(ref, _logits(model, ids, dev)))
            if "adapter" in cfg.formats:
                ver.add("adapter", merged_diff, max(_tol(str(dtype).split(".")[-1], ref), 1.5 * ver.floor))
        return ref
    finally:
        _free(model)


def _tol(kind: str, ref: list[torch.Tensor]) -> float:
    scale = max(1.0, max(float(r.abs().max()) for r in ref))
    return TOLERANCES[kind] * scale


def _load_gguf(gguf: Path, merged: Path, dtype: torch.dtype, dev: torch.device) -> Any:
    """The GGUF as a transformers model: transformers' GGUF reader where it reads the family, else
    :func:`~emloc_engine.stages.export.gguf_readback.load_gguf_as_hf` (dequantized tensors, mapped back)."""
    from transformers import AutoModelForCausalLM

    from emloc_engine.stages.export.gguf_families import family_of
    from emloc_engine.stages.export.gguf_readback import load_gguf_as_hf

    config = load_config(merged)
    fam = family_of(config)
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    # transformers' reader takes head_dim from hidden_size/heads (Qwen3: its config default, 128)
    plain_heads = head_dim == (128 if fam is not None and fam.arch == "qwen3" else int(config["hidden_size"]) // heads)
    if fam is not None and fam.transformers_reads and plain_heads:
        g: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype,
                                                      trust_remote_code=False, local_files_only=True)
    else:
        g = load_gguf_as_hf(gguf, merged, dtype)
    return g.to(dev).eval()


def _verify_adapter_gguf(cfg: ExportConfig, adapter_gguf: Path, dtype: torch.dtype, ids: list[torch.Tensor],
                         dev: torch.device, ref: list[torch.Tensor], ver: _Verification) -> None:
    """Base + adapter.gguf applied as llama.cpp does (alpha/r·B·A on the dequantized base) vs the reference."""
    from emloc_engine.stages.export.adapter_gguf import apply_adapter_gguf

    m = load_causal_lm(cfg.model_dir, device=dev, dtype=dtype)
    apply_adapter_gguf(m, adapter_gguf, load_config(cfg.model_dir))
    ver.add("adapter-gguf", _max_diff(ref, _logits(m, ids, dev)),
            max(_tol(str(dtype).split(".")[-1], ref), 1.5 * ver.floor))
    _free(m)


def _verify_adapter_gguf_tensors(cfg: ExportConfig, adapter_gguf: Path, adapter_dir: Path,
                                 ver: _Verification) -> None:
    """adapter.gguf read back and compared tensor by tensor with the corrected adapter (as the file stores it).

    Used when the original is streamed, where applying the file to a whole base model is what does not fit; the
    application itself (llama.cpp's ``alpha/r·B·A`` with the q/k permutation) is the resident check's.
    """
    import gguf as gguf_pkg
    import numpy as np

    from emloc_engine.stages.export.adapter_gguf import adapter_tensors

    _, expected = adapter_tensors(adapter_dir, load_config(cfg.model_dir))
    reader = gguf_pkg.GGUFReader(str(adapter_gguf))
    found = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    if set(found) != set(expected):
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        raise MergeError(f"adapter.gguf does not hold the adapter's tensors (missing {missing[:3]}, extra {extra[:3]}).",
                         hint="Export it again with --redo-from export.")
    diff = max(float(np.abs(found[k].reshape(v.shape) - v).max()) for k, v in expected.items())
    scale = max(1.0, max(float(np.abs(v).max()) for v in expected.values()))
    ver.add("adapter-gguf", diff, 1e-6 * scale)


def _verify(cfg: ExportConfig, adapter_dir: Path, n_modules: int, merged: Path | None, gguf: Path | None,
            gguf_source: Path | None, progress: Progress, adapter_gguf: Path | None = None) -> _Verification:
    if cfg.stream_original:
        from emloc_engine.stages.export.streamed_verify import verify_streamed

        dev = resolve_device(cfg.device)
        dtype = _verify_dtype(cfg.model_dir, dev)
        if dev.type == "cuda":  # streamed because it does not fit: the storage dtype, judged against its floor
            dtype = _storage_dtype(cfg.model_dir) if _storage_dtype(cfg.model_dir).is_floating_point else dtype
        ver = verify_streamed(cfg, adapter_dir, n_modules, merged, gguf, gguf_source, progress, dev, dtype)
        if adapter_gguf is not None:  # the base does not fit: the file's tensors against the adapter's, exactly
            _verify_adapter_gguf_tensors(cfg, adapter_gguf, adapter_dir, ver)
        return ver
    # Loaded whole: on the GPU only within the run's budget (fp32, else the storage dtype), else on the CPU.
    dev, dtype = _verify_placement(cfg.model_dir, resolve_device(cfg.device), cfg.memory_budget_bytes)
    ids = _prompt_ids(cfg.model_dir, cfg.prompts)
    ver = _Verification()
    progress.update(0.0, "Verifying: original + adapter (peft)")
    ref = _reference(cfg, adapter_dir, n_modules, dtype, ids, dev, ver)
    store = _storage_dtype(cfg.model_dir)
    gguf_floor = 0.0
    rounds = gguf is not None and cfg.gguf_type != "f32"
    source = merged if merged is not None else (gguf_source if rounds else None)
    if source is not None:
        progress.check_cancelled()
        progress.update(0.4, "Verifying: merged folder (transformers)")
        m = load_causal_lm(source, device=dev, dtype=dtype)
        if merged is not None:
            ver.add("merged", _max_diff(ref, _logits(m, ids, dev)),
                    max(_tol(str(store).split(".")[-1], ref), 1.5 * ver.floor))
        if rounds:
            gguf_floor = _gguf_rounding_floor(m, cfg.gguf_type, ids, dev, ref)
        _free(m)
    if gguf is not None:
        progress.check_cancelled()
        progress.update(0.7, "Verifying: GGUF (transformers' GGUF reader)")
        assert gguf_source is not None
        g = _load_gguf(gguf, gguf_source, dtype, dev)
        ver.add("gguf", _max_diff(ref, _logits(g, ids, dev)),
                max(_tol(cfg.gguf_type, ref), 1.5 * ver.floor, 1.5 * gguf_floor))
        ver.gguf_floor = gguf_floor
        if ver.effect and gguf_floor > 0.25 * ver.effect:
            log.warning("Rounding the weights to %s moves this model's logits by %.3g, more than a quarter of "
                        "what the adapter changes (%.3g); --gguf-type f32 keeps them exact.", cfg.gguf_type,
                        gguf_floor, ver.effect)
        _free(g)
    if adapter_gguf is not None:
        progress.check_cancelled()
        progress.update(0.9, "Verifying: adapter.gguf (applied as llama.cpp does)")
        _verify_adapter_gguf(cfg, adapter_gguf, dtype, ids, dev, ref, ver)
    progress.update(1.0, "Verified")
    return ver


@torch.no_grad()
def _gguf_rounding_floor(model: Any, gguf_type: str, ids: list[torch.Tensor], dev: torch.device,
                         ref: list[torch.Tensor]) -> float:
    """max |Δlogit| of the merged model once every weight is rounded as the GGUF stores it (in place).

    2-D tensors take the GGUF type (a block type only where rows are whole blocks of 32, else F16, as
    :func:`~emloc_engine.stages.export.gguf_export._target_type` decides); 1-D tensors stay F32. For a
    K-quant the block type of the same width stands in (:data:`K_QUANT_FLOOR_PROXY`), and the floor is
    doubled, since llama-quantize's rounding is not reproduced here.
    The q/k row permutation of the Llama family moves whole rows, so it changes no rounding.
    """
    for p in model.parameters():  # tied embeddings appear once
        if p.dim() < 2 or not p.is_floating_point():
            continue
        p.copy_(_gguf_round(p, gguf_type))
    return gguf_floor_factor(gguf_type) * _max_diff(ref, _logits(model, ids, dev))


def gguf_floor_factor(gguf_type: str) -> float:
    """2 for a K-quant (its rounding is stood in for by :data:`K_QUANT_FLOOR_PROXY`), else 1."""
    return 2.0 if gguf_type in K_QUANT_FLOOR_PROXY else 1.0


def _gguf_round(p: torch.Tensor, gguf_type: str) -> torch.Tensor:
    """A 2-D weight rounded as the GGUF stores it, in its own dtype and device (see :func:`_gguf_rounding_floor`).

    The tensor's GGUF type is :func:`~emloc_engine.stages.export.gguf_export._target_type`'s (a block type only
    where rows are whole blocks); a K-quant is stood in for by the block type of the same width.
    """
    import gguf
    import numpy as np

    from emloc_engine.stages.export.gguf_export import _target_type

    qt = _target_type(tuple(p.shape), K_QUANT_FLOOR_PROXY.get(gguf_type, gguf_type))
    if qt == gguf.GGMLQuantizationType.F32:
        return p
    if qt == gguf.GGMLQuantizationType.BF16:
        return p.to(torch.bfloat16).to(p.dtype)
    if qt == gguf.GGMLQuantizationType.F16:
        return p.to(torch.float16).to(p.dtype)
    arr = p.detach().float().cpu().numpy()
    back = gguf.quants.dequantize(gguf.quants.quantize(arr, qt), qt)
    return torch.from_numpy(np.asarray(back, dtype=np.float32).reshape(arr.shape)).to(p)


def _storage_dtype(model_dir: Path) -> torch.dtype:
    """The dtype holding most of the model's parameters (fp32 for one torch cannot name)."""
    return SAFETENSORS_DTYPES.get(Checkpoint(model_dir).dominant_dtype(), torch.float32)


# -- the stage -----------------------------------------------------------------------------------------
@contextmanager
def _timer(out: list[float]) -> Iterator[None]:
    t0 = time.monotonic()
    try:
        yield
    finally:
        out.append(time.monotonic() - t0)


def resolve_formats(formats: tuple[str, ...] | set[str], model_dir: Path) -> set[str]:
    """The exports to write for the requested ones: ``ollama`` brings ``adapter-gguf`` (run started from a
    GGUF) or ``gguf``; ``lmstudio`` brings ``gguf``. (``gguf`` also needs the merged folder, see below.)"""
    from emloc_engine.stages.export.modelfile import base_gguf_of

    out = set(formats)
    if "ollama" in out:
        out.add("adapter-gguf" if base_gguf_of(model_dir) is not None else "gguf")
    if "lmstudio" in out:
        out.add("gguf")
    return out


def export_problem(formats: set[str], gguf_type: str, model_dir: Path) -> str | None:
    """Why these exports cannot be written for this model (checked before any training), or ``None``.

    Raises:
        MissingTool: a K-quant ``gguf_type`` without llama.cpp's ``llama-quantize`` (names the type and the fix).
    """
    from emloc_engine.stages.export.gguf_export import gguf_support_problem, gguf_tokenizer_problem

    if "gguf" in formats:
        problem = gguf_support_problem(load_config(model_dir)) or gguf_tokenizer_problem(model_dir)
        if problem:
            return f"Cannot export GGUF: {problem}"
        if gguf_type in K_QUANT_TYPES:
            from emloc_engine.stages.export.gguf_quantize import resolve_llama_quantize

            resolve_llama_quantize(gguf_type)
    if "adapter-gguf" in formats:
        problem = gguf_support_problem(load_config(model_dir))
        if problem:
            return f"Cannot export the adapter as GGUF: {problem}"
    return None


def _preflight(cfg: ExportConfig, layout: RunLayout, formats: set[str], adapter_dir: Path) -> None:
    for target in (layout.merged, layout.gguf, layout.adapter_gguf, layout.root / "adapter-export"):
        check_output_location(target, cfg.model_dir)
    hint = "Pass overwrite (CLI: --overwrite) to replace it, or export into another run folder."
    if "merged" in formats and layout.merged.exists() and any(layout.merged.iterdir()) and not cfg.overwrite:
        raise MergeError(f"{layout.merged} already exists and is not empty.", hint=hint)
    for fmt, path in (("gguf", layout.gguf), ("adapter-gguf", layout.adapter_gguf)):
        if fmt in formats and path.exists() and not cfg.overwrite:
            raise MergeError(f"{path} already exists.", hint=hint)
    problem = export_problem(formats, cfg.gguf_type, cfg.model_dir)
    if problem:
        raise MergeError(f"{problem}.", hint="Export merged (and adapter) only.")
    if not inside(adapter_dir, layout.root):
        check_output_location(layout.root / "adapter-export", adapter_dir)


def merge_and_export(cfg: ExportConfig, progress: Progress = NULL_PROGRESS) -> ExportResult:
    """Merge the adapter into the original model and write the requested exports, verified.

    Args:
        cfg: the run, the original model, the adapter and the formats.
        progress: merge 0–60 %, GGUF 60–80 %, verification 80–100 %; cancel between tensors.

    Returns:
        Paths of the exports, the verification differences, peak RSS and timings.

    Raises:
        ModelNotFound: no model or adapter.
        UnsupportedModel: an adapter feature or model family that cannot be exported.
        MergeError: a refused target (exists, inside the source model or the HF cache), a corrupt
            shard, a non-finite merge, or an export whose logits differ beyond tolerance.
        DiskFull: a full disk (the message names the folder, the space needed and free); nothing that
            looks complete is left behind.
    """
    t0 = time.monotonic()
    layout = RunLayout(Path(cfg.run_dir))
    formats = resolve_formats(cfg.formats, Path(cfg.model_dir))
    if "gguf" in formats and not (layout.merged / "config.json").is_file():
        formats.add("merged")  # the GGUF is streamed from the merged folder
    model_dir = Path(cfg.model_dir)
    config = load_config(model_dir)
    adapter_dir = resolve_adapter_dir(layout.root, cfg.adapter_dir)
    _preflight(cfg, layout, formats, adapter_dir)
    _check_tied_head(config, adapter_dir)
    _, deltas = read_lora_deltas(adapter_dir)
    _check_adapter_fits(model_dir, deltas, set(Checkpoint(model_dir).names()))
    merged_dir = gguf_path = out_adapter = None
    merge_peak = 0.0
    n_merged, t_merge, t_gguf, t_verify = 0, [0.0], [0.0], [0.0]
    # Only the verification computes on a device (resident or streamed); its GPU, if any, is measured throughout.
    with RssSampler() as rss, GpuPeak(resolve_device(cfg.device) if cfg.verify else None) as gpu:
        if "merged" in formats:
            card = render_card(collect_facts(cfg.run_facts, model_dir, adapter_dir, "merged model"))
            with _timer(t_merge), RssSampler() as merge_rss:
                n_merged = _export_merged(cfg, deltas, layout.merged, card, sub(progress, 0.0, 0.6))
            merge_peak = merge_rss.peak_bytes / 2**30
            merged_dir = layout.merged
            log.info("Merged %d modules into %s in %.1f s", n_merged, merged_dir, t_merge[-1])
        if "gguf" in formats:
            from emloc_engine.stages.export.gguf_export import GgufConfig, export_gguf

            with _timer(t_gguf):
                export_gguf(GgufConfig(layout.merged, layout.gguf, cfg.gguf_type,
                                       name=f"{model_dir.name}-emloc", overwrite=cfg.overwrite),
                            sub(progress, 0.6, 0.8))
            gguf_path = layout.gguf
        if "adapter" in formats:
            out_adapter = _export_adapter(cfg, layout, adapter_dir)
        adapter_gguf = None
        if "adapter-gguf" in formats:
            from emloc_engine.stages.export.adapter_gguf import AdapterGgufConfig, export_adapter_gguf

            adapter_gguf = export_adapter_gguf(AdapterGgufConfig(
                adapter_dir, model_dir, layout.adapter_gguf, name=f"{model_dir.name}-emloc-lora",
                overwrite=cfg.overwrite)).path
        ver = _Verification()
        if cfg.verify:
            with _timer(t_verify):
                ver = _verify(cfg, out_adapter or adapter_dir, len(deltas), merged_dir, gguf_path, layout.merged,
                              sub(progress, 0.8, 1.0), adapter_gguf)
            _write_verified_cards(cfg, layout, adapter_dir, merged_dir, out_adapter, ver)
            _raise_if_beyond(ver)
        handoff = _hand_off(cfg, layout, formats, gguf_path, adapter_gguf)
    progress.update(1.0, "Export done")
    return ExportResult(merged_dir, out_adapter, gguf_path, tuple(ver.diffs), rss.peak_bytes / 2**30,
                        tuple(ver.tols), ver.effect, n_merged, t_merge[-1], t_gguf[-1], t_verify[-1],
                        time.monotonic() - t0, merge_peak, adapter_gguf, *handoff, peak_vram_gib=gpu.gib,
                        peak_anon_rss_gib=rss.peak_anon_bytes / 2**30)


def _hand_off(cfg: ExportConfig, layout: RunLayout, formats: set[str], gguf_path: Path | None,
              adapter_gguf: Path | None) -> tuple[Path | None, Path | None, tuple[str, ...] | None]:
    """After verification: the Modelfile and the ``ollama create`` command, and the LM Studio copy."""
    from emloc_engine.stages.export.model_card import base_model_name
    from emloc_engine.stages.export.modelfile import ollama_command, ollama_name, write_modelfile

    name = ollama_name(base_model_name(cfg.model_dir).rsplit("/", 1)[-1], cfg.ollama_name)
    modelfile = command = lmstudio = None
    if "ollama" in formats:
        modelfile = write_modelfile(layout.root, cfg.model_dir, merged_gguf=gguf_path, adapter_gguf=adapter_gguf,
                                    name=name)
        command = ollama_command(modelfile, name)
    if "lmstudio" in formats and gguf_path is not None:
        from emloc_engine.stages.export.lmstudio import install_in_lmstudio

        lmstudio = install_in_lmstudio(gguf_path, name, cfg.gguf_type, overwrite=cfg.overwrite)
    return modelfile, lmstudio, command


def _export_adapter(cfg: ExportConfig, layout: RunLayout, adapter_dir: Path) -> Path:
    """The adapter inside the run keeps its place; one from outside is copied to ``adapter-export/``."""
    card = render_card(collect_facts(cfg.run_facts, cfg.model_dir, adapter_dir, "LoRA adapter"))
    if inside(adapter_dir, layout.root):
        write_text_atomic(adapter_dir / "README.md", card)
        return adapter_dir
    target = layout.root / "adapter-export"
    with atomic_dir(target, overwrite=cfg.overwrite) as tmp:
        for p in adapter_dir.iterdir():
            if p.is_file() and p.name != "README.md":
                shutil.copy2(p, tmp / p.name)
        write_text_atomic(tmp / "README.md", card)
    return target


def _write_verified_cards(cfg: ExportConfig, layout: RunLayout, adapter_dir: Path, merged: Path | None,
                          out_adapter: Path | None, ver: _Verification) -> None:
    """Rewrite the cards with the verification table (small files, atomic)."""
    v = tuple(ver.diffs)
    if merged is not None:
        write_text_atomic(merged / "README.md",
                          render_card(collect_facts(cfg.run_facts, cfg.model_dir, adapter_dir, "merged model", v)))
    if out_adapter is not None:
        write_text_atomic(out_adapter / "README.md",
                          render_card(collect_facts(cfg.run_facts, cfg.model_dir, adapter_dir, "LoRA adapter", v)))
    write_json_atomic(layout.root / "export_verification.json",
                      {"verification": [[n, d] for n, d in ver.diffs], "tolerances": [[n, t] for n, t in ver.tols],
                       "adapter_effect": ver.effect, "reduced_precision_floor": ver.floor,
                       "gguf_rounding_floor": ver.gguf_floor})


def _raise_if_beyond(ver: _Verification) -> None:
    bad = [f"{n}: max |Δlogit| {d:.4g} > tolerance {t:.4g}" for (n, d), (_, t) in zip(ver.diffs, ver.tols)
           if not d <= t]
    if bad:
        raise MergeError("Export verification failed: the export does not reproduce original + adapter.",
                         problems=bad, hint="The files are kept for inspection; do not use them. "
                                            "Report this with RUN_DIR/logs/emloc.log.")


def export_summary(result: ExportResult) -> str:
    """A few human-readable lines for the CLI."""
    lines = []
    for label, p in (("merged", result.merged_dir), ("adapter", result.adapter_dir), ("gguf", result.gguf_path),
                     ("adapter-gguf", result.adapter_gguf_path), ("Modelfile", result.modelfile_path),
                     ("LM Studio", result.lmstudio_path)):
        if p is not None:
            lines.append(f"{label:8s} {p}")
    for (n, d), (_, t) in zip(result.verification, result.tolerances):
        lines.append(f"verified {n}: max |Δlogit| = {d:.3g} (tolerance {t:.3g})")
    gpu = getattr(result, "peak_vram_gib", 0.0)  # a VLM's export result has neither
    anon = getattr(result, "peak_anon_rss_gib", 0.0)
    lines.append(f"peak RSS {result.peak_rss_gib:.2f} GiB"
                 + (f" ({anon:.2f} GiB without memory-mapped files)" if anon else "")
                 + (f", peak GPU {gpu:.2f} GiB" if gpu else "") + f", {result.wall_s:.1f} s")
    if result.ollama_command:
        from emloc_engine.stages.export.modelfile import command_text

        lines.append(f"Add it to Ollama: {command_text(result.ollama_command)}")
    elif result.modelfile_path is not None:
        lines.append("Ollama was not found on PATH; once it is installed: "
                     f"ollama create NAME -f {result.modelfile_path}")
    return "\n".join(lines)


__all__ = ["DEFAULT_PROMPTS", "EXPORT_FORMATS", "TOLERANCES", "ExportConfig", "ExportResult", "RssSampler",
           "check_output_location", "export_problem", "export_summary", "merge_and_export", "merge_state_dict",
           "resolve_adapter_dir", "resolve_formats", "write_merged_shards"]
