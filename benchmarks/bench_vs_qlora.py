"""EMLoC against QLoRA at the same GPU memory, over seeds (issue 20).

What a person with too little GPU memory picks instead of EMLoC is QLoRA (Unsloth, LLaMA-Factory): LoRA on a
4-bit NF4 copy of the model. This benchmark trains it through the real libraries (transformers'
``BitsAndBytesConfig`` + peft + bitsandbytes, the QLoRA paper's recipe: NF4, double quantization, bf16 compute on
CUDA, ``prepare_model_for_kbit_training``, paged 8-bit AdamW on CUDA) on the same tasks, data order, steps, rank,
learning rate and seeds as the quality benchmark (:mod:`benchmarks.bench_quality`), and scores it both ways a
QLoRA user runs the result: the adapter on the 4-bit base, and the adapter on the bf16 original ("merged": peft
applies it unmerged, which is the same function as merging without the rounding of a merged copy).

Per seed it also runs, through :func:`benchmarks.bench_quality.run_benchmark` (the engine's own stages):
zero-shot, LoRA on the full model (the upper bound), EMLoC at the planner's ρ (activation-aware emulator, the
engine's default block anchors, λ auto) and, on CUDA, EMLoC at *QLoRA's memory*: the ρ the planner picks when
the budget is QLoRA's measured training peak (the planner is within ±10% of measured peaks; the EMLoC row
records its own measured peak beside it, so the match can be checked).

Decisions where the issue is silent:

* On a CPU the 4-bit layers run through bitsandbytes' CPU kernels (0.50 has them) with fp32 compute and
  torch's AdamW (paged optimizers need CUDA); peaks are not measured there, so the "same memory" row needs CUDA.
* The training loop is the engine's (same micro-batch order :func:`micro_batch_indices`, same loss
  :func:`lm_loss_sum`, same warmup + cosine schedule, same gradient clipping), so the only difference between
  the rows is the model the LoRA is trained on.
* Targets: every decoder linear, as the engine's LoRA.

Usage (writes ``benchmarks/results/vs-qlora-<date>.json`` and the section "EMLoC vs QLoRA" at the top of
RESULTS.md)::

    python benchmarks/bench_vs_qlora.py --device cuda --seeds 0,1,2
    python benchmarks/bench_vs_qlora.py --render benchmarks/results/vs-qlora-2026-12-04.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_quality as bq
from benchmarks.tasks import Task, demo_shakespeare_task, formats_task
from emloc_engine.data import load_tokenizer, prepare_dataset
from emloc_engine.run.planning import PlanConfig, model_facts, plan_memory
from emloc_engine.stages.training.batches import collate, label_tokens, micro_batch_indices
from emloc_engine.stages.training.trainer import lm_loss_sum, make_scheduler, pad_token_id

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## EMLoC vs QLoRA at the same GPU memory"
EMLOC_VARIANT = "activation-aware-anchor"
"""The engine's default recipe: activation-aware emulator, LoRA anchored at every block, λ auto."""
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def qlora_recipe(device: torch.device) -> dict[str, Any]:
    """The QLoRA settings used (recorded in the JSON and the table)."""
    cuda = device.type == "cuda"
    return {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16" if cuda else "float32",
            "optimizer": "paged_adamw_8bit" if cuda else "adamw (torch)",
            "prepare_model_for_kbit_training": True, "targets": list(TARGETS)}


def _load_4bit(model_dir: Path, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    where = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map=where,
                                                dtype=compute)


def _optimizer(params: list[torch.nn.Parameter], lr: float, device: torch.device) -> torch.optim.Optimizer:
    if device.type == "cuda":
        import bitsandbytes as bnb

        opt: torch.optim.Optimizer = bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=0.0)
        return opt
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def train_qlora(model_dir: Path, task: Task, settings: bq.BenchSettings, out_dir: Path,
                log: Callable[[str], None] = print) -> tuple[Any, dict[str, Any]]:
    """Train QLoRA on ``task``; returns (the peft model on its 4-bit base, facts of the run).

    The adapter is saved to ``out_dir`` (peft's format) so it can be applied to the bf16 original.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    device = torch.device(settings.device)
    tokenizer = load_tokenizer(model_dir)
    data = prepare_dataset(task.data, tokenizer)
    pad = pad_token_id(tokenizer)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t_load = time.monotonic()
    model = _load_4bit(model_dir, device)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.grad_checkpointing)
    torch.manual_seed(settings.seed)
    model = get_peft_model(model, LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                                             lora_dropout=settings.dropout, target_modules=list(TARGETS),
                                             bias="none", task_type="CAUSAL_LM"))
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, settings.lr, device)
    scheduler = make_scheduler(optimizer, "cosine", min(settings.warmup_steps, settings.steps - 1), settings.steps)
    load_s = time.monotonic() - t_load
    model.train()
    losses: list[float] = []
    tokens, t0 = 0, time.monotonic()
    for step in range(1, settings.steps + 1):
        batch = collate([data.train[i] for i in micro_batch_indices(len(data.train), settings.batch_size,
                                                                     settings.seed, step - 1)], pad)
        n_labels = max(1, label_tokens(batch))
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss_sum = lm_loss_sum(model.get_base_model(), batch)
        (loss_sum / n_labels).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss = float(loss_sum.detach()) / n_labels
        if not math.isfinite(loss):
            raise RuntimeError(f"QLoRA loss became {loss} at step {step}")
        losses.append(loss)
        tokens += int(batch["attention_mask"].sum())
    train_s = time.monotonic() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    model.save_pretrained(out_dir)
    log(f"QLoRA {task.name}: loss {losses[0]:.3f} → {losses[-1]:.3f} in {train_s:.0f} s")
    return model, {"first_train_loss": losses[0], "final_train_loss": losses[-1], "train_s": train_s,
                   "load_s": load_s, "tokens_per_s": tokens / max(train_s, 1e-9), "peak_vram_gib": peak,
                   "adapter_dir": str(out_dir)}


def score_merged(model_dir: Path, adapter_dir: Path, scorer: bq.Scorer) -> dict[str, float]:
    """The QLoRA adapter applied to the original in its compute dtype (what "merge into the original" runs)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from emloc_engine.machine.devices import compute_dtype

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=compute_dtype(scorer.device)).to(scorer.device)
    model = PeftModel.from_pretrained(base, adapter_dir)
    try:
        return scorer.score(model)
    finally:
        del model, base
        bq._free(scorer.device)


def run_qlora_task(model_dir: Path, task: Task, settings: bq.BenchSettings, work_dir: Path,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """QLoRA on one task: train, score on the 4-bit base and on the original."""
    device = torch.device(settings.device)
    scorer = bq.Scorer(task, load_tokenizer(model_dir), device, settings.eval_batch_size,
                       settings.max_test_examples)
    out = work_dir / task.name / "qlora"
    model, facts = train_qlora(model_dir, task, settings, out, log)
    try:
        on_4bit = scorer.score(model)
    finally:
        del model
        bq._free(device)
    return {"train": facts, "on_4bit": on_4bit, "merged": score_merged(model_dir, out, scorer)}


def matched_ratio(model_dir: Path, settings: bq.BenchSettings, peak_gib: float | None) -> float | None:
    """The planner's ρ when the budget is QLoRA's measured training peak (None without a measured peak)."""
    if peak_gib is None:
        return None
    base = PlanConfig(context_length=settings.max_length, batch_size=1, lora_rank=settings.rank, device="cuda",
                      calibration_samples=settings.calib_samples, train_steps=settings.steps)
    plan = plan_memory(model_facts(model_dir), replace(base, budget_bytes=int(peak_gib * 2**30)))
    return plan.ratio if plan.fits else None


def run(settings: bq.BenchSettings, seeds: Sequence[int], model_dir: Path, task_names: Sequence[str],
        work_dir: Path, json_path: Path, command: str, log: Callable[[str], None] = print,
        make_tasks: Callable[[int], list[Task]] | None = None, ratio: float | None = None) -> dict[str, Any]:
    """Every seed: QLoRA per task, then the quality benchmark's zero-shot, full LoRA and EMLoC rows.

    ``ratio`` None = the planner's ρ for the model's inference peak (the engine's default); a value replaces it
    (the row is then labelled with that ρ).
    """
    device = torch.device(settings.device)
    data: dict[str, Any] = {"date": dt.date.today().isoformat(), "command": command,
                            "device": bq.device_name(device), "device_type": device.type,
                            "versions": bq.versions(), "model_name": model_dir.name,
                            "qlora_recipe": qlora_recipe(device), "seeds": {}}

    def tasks_for(seed: int) -> list[Task]:
        if make_tasks is not None:
            return make_tasks(seed)
        out = []
        for name in task_names:
            if name == "shakespeare":
                out.append(demo_shakespeare_task(max_length=settings.max_length, seed=seed))
            elif name == "formats":
                out.append(formats_task(work_dir / f"data-{seed}", n_train=settings.n_train_formats,
                                        n_test=settings.n_test_formats, max_length=settings.max_length, seed=seed))
            else:
                raise SystemExit(f"unknown task {name!r}: use shakespeare, formats")
        return out

    for seed in seeds:
        s = replace(settings, seed=seed)
        tasks = tasks_for(seed)
        qlora = {t.name: run_qlora_task(model_dir, t, s, work_dir / f"seed-{seed}", log) for t in tasks}
        peaks = [q["train"]["peak_vram_gib"] for q in qlora.values() if q["train"]["peak_vram_gib"] is not None]
        matched = matched_ratio(model_dir, s, max(peaks) if peaks else None)
        units: list[tuple[str, float | None]] = [(EMLOC_VARIANT, ratio)]
        if matched is not None and matched != ratio:
            units.append((EMLOC_VARIANT, matched))
        emloc = bq.run_benchmark(replace(s, units=tuple(units)), model_dir, tasks, work_dir / f"seed-{seed}",
                                 json_path.with_name(json_path.stem + f"-emloc-seed{seed}.json"), command, log=log)
        chosen = ratio if ratio is not None else emloc["planner"].get("ratio")
        data["seeds"][str(seed)] = {"qlora": qlora, "emloc": emloc, "matched_ratio": matched,
                                    "matched_by_task": {t.name: matched for t in tasks},
                                    "emloc_ratio": chosen, "emloc_ratio_from": "planner" if ratio is None else "given"}
        _save(data, json_path)
    return data


def merge(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One result from runs that split the seeds and tasks between processes (e.g. one per GPU process).

    Each seed's tasks are united; every part must come from the same model, device type and QLoRA recipe, and a
    (seed, task) pair may appear once. The merged ``command`` lists every part's command.
    """
    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]
    out: dict[str, Any] = {k: v for k, v in first.items() if k not in ("seeds", "command")}
    out["command"] = " ; ".join(dict.fromkeys(str(p["command"]) for p in parts))
    out["seeds"] = {}
    for part in parts:
        for key in ("model_name", "device_type", "qlora_recipe"):
            if part.get(key) != first.get(key):
                raise ValueError(f"cannot merge runs with different {key}: {part.get(key)!r} vs {first.get(key)!r}")
        for seed, sd in part["seeds"].items():
            into = out["seeds"].get(seed)
            if into is None:
                out["seeds"][seed] = json.loads(json.dumps(sd))
                out["seeds"][seed].setdefault("matched_by_task",
                                              {t: sd.get("matched_ratio") for t in sd["emloc"]["tasks"]})
                continue
            for task, rec in sd["emloc"]["tasks"].items():
                if task in into["emloc"]["tasks"]:
                    raise ValueError(f"seed {seed}, task {task} appears in two runs")
                if sd.get("emloc_ratio") != into.get("emloc_ratio"):
                    raise ValueError(f"seed {seed}: the runs used different EMLoC ratios")
                into["emloc"]["tasks"][task] = rec
                into["qlora"][task] = sd["qlora"][task]
                into["matched_by_task"][task] = sd.get("matched_by_task", {}).get(task, sd.get("matched_ratio"))
    out["seeds"] = dict(sorted(out["seeds"].items(), key=lambda kv: int(kv[0])))
    return out


def _save(data: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------
# summary (from the JSON only)

def _spread(values: Sequence[float]) -> tuple[float, float, int]:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


MEASURED_ROW = "EMLoC, ρ measured at QLoRA's memory"


def _add(task_rows: dict[str, dict[str, list[float]]], method: str, rec: Mapping[str, Any],
         scores: Mapping[str, Any], peak: float | None, ratio: float | None = None) -> None:
    """One seed's cell of row ``method``: its fraction of ``rec``'s full-LoRA gain, metric, peak and ρ."""
    row = task_rows.setdefault(method, {"recovered": [], "metric": [], "peak": [], "ratio": []})
    row["recovered"].append(bq.recovered(rec, scores))
    row["metric"].append(bq.primary(rec, scores))
    row["peak"].append(math.nan if peak is None else peak)
    row["ratio"].append(math.nan if ratio is None else ratio)


def summary(data: Mapping[str, Any], measured: Sequence[Mapping[str, Any]] = ()) -> dict[str, dict[str, dict[str, Any]]]:
    """Per task and method: the fraction of the full-LoRA gain (mean, sd, n) and the peaks, over seeds.

    ``measured``: runs of ``bench_quality.py`` (one JSON per seed) at a ρ chosen so that EMLoC's *measured*
    training peak is at QLoRA's, added as the row :data:`MEASURED_ROW` of each task they ran; each seed's
    fraction is taken against that run's own zero-shot and full-LoRA scores.
    """
    rows: dict[str, dict[str, dict[str, list[float]]]] = {}
    for seed_data in data["seeds"].values():
        emloc = seed_data["emloc"]
        chosen = seed_data.get("emloc_ratio")
        label = "EMLoC, planner's ρ" if seed_data.get("emloc_ratio_from") == "planner" else "EMLoC, given ρ"
        for name, rec in emloc["tasks"].items():
            task_rows = rows.setdefault(name, {})
            matched = seed_data.get("matched_by_task", {}).get(name, seed_data.get("matched_ratio"))
            _add(task_rows, "full LoRA", rec, rec["full_lora"], rec["full_lora"]["train"].get("peak_vram_gib"))
            for unit in rec["units"]:
                peak = unit["train"].get("peak_vram_gib")
                if unit["ratio"] == chosen:
                    _add(task_rows, label, rec, unit["auto"], peak, unit["ratio"])
                if matched is not None and unit["ratio"] == matched:
                    _add(task_rows, "EMLoC, planner's ρ for QLoRA's peak", rec, unit["auto"], peak, unit["ratio"])
            q = seed_data["qlora"][name]
            _add(task_rows, "QLoRA, adapter on 4-bit base", rec, q["on_4bit"], q["train"]["peak_vram_gib"])
            _add(task_rows, "QLoRA, adapter on bf16 original", rec, q["merged"], q["train"]["peak_vram_gib"])
    for run in measured:
        for name, rec in run["tasks"].items():
            for unit in rec["units"]:
                _add(rows.setdefault(name, {}), MEASURED_ROW, rec, unit["auto"], unit["train"].get("peak_vram_gib"),
                     unit["ratio"])
    return {task: {method: {k: _spread(v) for k, v in row.items()} for method, row in methods.items()}
            for task, methods in rows.items()}


def _pct(stat: tuple[float, float, int]) -> str:
    mean, sd, n = stat
    if n == 0:
        return "n/a"
    return f"{100 * mean:.0f}% ± {100 * sd:.0f}" if n > 1 else f"{100 * mean:.0f}%"


def _gib(stat: tuple[float, float, int]) -> str:
    return "n/a (no GPU)" if stat[2] == 0 else f"{stat[0]:.2f} GiB"


def _emloc_row_for(methods: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    """The EMLoC row to compare with QLoRA, and how to say where it stands.

    Where both peaks are measured, the EMLoC row that used the most memory without exceeding QLoRA's measured peak
    (5% tolerance): the planner sizes for full-length sequences, so its "QLoRA's memory" ρ can land well below
    QLoRA's real peak on a task with short sequences, and then the planner's own ρ may be the closer match.
    Without measured peaks (CPU): the planner's ρ.
    """
    q_peak = methods.get("QLoRA, adapter on 4-bit base", {}).get("peak", (math.nan, 0.0, 0))
    emloc = {k: v for k, v in methods.items() if k.startswith("EMLoC")}
    measured = {k: v["peak"][0] for k, v in emloc.items() if v["peak"][2] > 0}
    if q_peak[2] > 0 and measured:
        fitting = {k: m for k, m in measured.items() if m <= 1.05 * q_peak[0]}
        if fitting:
            key = max(fitting, key=lambda k: fitting[k])
            where = ("at the same GPU memory" if fitting[key] >= 0.9 * q_peak[0] else "at less GPU memory")
            return key, f"{where} (EMLoC {fitting[key]:.2f} GiB at ρ {emloc[key]['ratio'][0]:.2f}, QLoRA {q_peak[0]:.2f} GiB)"
    key = "EMLoC, planner's ρ" if "EMLoC, planner's ρ" in emloc else next(iter(emloc), "EMLoC, planner's ρ")
    return key, f"at the {key.split(', ')[1]} (QLoRA's peak not measured here)"


def headline(summ: Mapping[str, Mapping[str, Mapping[str, Any]]], notes: Mapping[str, str] | None = None) -> str:
    """The one sentence up front, from the numbers: per task, EMLoC at no more than QLoRA's measured memory.

    ``notes``: said after the memory comparison when that row is the one compared (where it was measured).
    """
    parts = []
    for task, methods in summ.items():
        emloc_key, where = _emloc_row_for(methods)
        if notes and emloc_key in notes:
            where = f"{where}, {notes[emloc_key]}"
        e = methods.get(emloc_key, {}).get("recovered", (math.nan, 0.0, 0))
        q = methods.get("QLoRA, adapter on 4-bit base", {}).get("recovered", (math.nan, 0.0, 0))
        m = methods.get("QLoRA, adapter on bf16 original", {}).get("recovered", (math.nan, 0.0, 0))
        verdict = "EMLoC ahead" if e[0] > max(q[0], m[0]) else "QLoRA ahead"
        parts.append(f"**{task}**, {where}: EMLoC keeps {_pct(e)} of what full LoRA gains; QLoRA keeps {_pct(q)} "
                     f"on its 4-bit base and {_pct(m)} applied to the original ({verdict}).")
    return " ".join(parts)


def render(data: Mapping[str, Any], measured: Sequence[Mapping[str, Any]] = (),
           measured_paths: Sequence[str] = ()) -> str:
    summ = summary(data, measured)
    seeds = ", ".join(data["seeds"])
    notes: dict[str, str] = {}
    lines: list[str] = []
    if measured:
        devices = sorted({str(m["device"]) for m in measured})
        dates = sorted({str(m["date"]) for m in measured})
        if devices != [str(data["device"])]:
            notes[MEASURED_ROW] = f"EMLoC's row measured on {' and '.join(devices)}, QLoRA's on {data['device']}"
        lines.append(f"Row \"{MEASURED_ROW}\": {', '.join(dates)} · {', '.join(devices)} · seeds "
                     f"{', '.join(str(m['settings'].get('seed', '?')) for m in measured)}, each against its own "
                     "zero-shot and full-LoRA runs · commands: "
                     + " ; ".join(f"`{m['command']}`" for m in measured) + "  ")
        if measured_paths:
            lines.append("Files: " + ", ".join(f"`{p}`" for p in measured_paths) + "  ")
    out = [SECTION, "", headline(summ, notes), "",
           f"{data['date']} · {data['device']} · seeds {seeds} · model `{data['model_name']}`  ",
           f"Command: `{data['command']}`  ",
           *lines,
           "QLoRA recipe: " + ", ".join(f"{k} {v}" for k, v in data["qlora_recipe"].items() if k != "targets")
           + "; every decoder linear; same data order, steps, rank, lr and schedule as the EMLoC rows.  ",
           "Cells: fraction of the full-LoRA gain, mean ± sd over seeds (`(metric − zero-shot) / (full LoRA − "
           "zero-shot)`); peak = measured training `max_memory_allocated`.", ""]
    for task, methods in summ.items():
        out += [f"| {task} | gain kept | ρ | training peak |", "|---|---|---|---|"]
        for method, stats in methods.items():
            ratio = stats["ratio"]
            out.append(f"| {method} | {_pct(stats['recovered'])} | "
                       f"{'—' if ratio[2] == 0 else f'{ratio[0]:.2f}'} | {_gib(stats['peak'])} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_section(path: Path, text: str) -> None:
    """Put (or replace) this section right after the title of RESULTS.md: it is the table a user reads first."""
    body = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(body):
        body = pattern.sub(lambda _: text.rstrip() + "\n\n", body, count=1)
    else:
        first, _, rest = body.partition("\n")
        body = first + "\n\n" + text.rstrip() + "\n\n" + rest.lstrip("\n")
    path.write_text(body.rstrip() + "\n", encoding="utf-8")


def _measured_run(path: Path) -> dict[str, Any]:
    """A ``--measured`` file: a JSON ``bench_quality.py --json`` wrote, or SystemExit naming the file and the fix."""
    fix = "give the JSON that `benchmarks/bench_quality.py --json` wrote for one seed"
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--measured {path}: cannot be read as JSON ({exc}); {fix}") from None
    ok = isinstance(run, dict) and {"device", "date", "command", "settings"} <= run.keys() and all(
        isinstance(rec, dict) and {"zero_shot", "full_lora", "units"} <= rec.keys()
        and all({"auto", "train", "ratio"} <= u.keys() for u in rec["units"])
        for rec in (run.get("tasks") or {None: None}).values())
    if not ok:
        raise SystemExit(f"--measured {path}: not a bench_quality.py result (no tasks with zero-shot, full-LoRA "
                         f"and EMLoC rows); {fix}")
    return run


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (at least three for a headline)")
    p.add_argument("--tasks", default="shakespeare,formats")
    p.add_argument("--steps", type=int, default=bq.BenchSettings.steps)
    p.add_argument("--ratio", type=float, default=None, help="EMLoC's ρ (default: the planner's)")
    p.add_argument("--model-dir", type=Path, default=None, help="converted model (default: the demo model)")
    p.add_argument("--work-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "emloc-bench-qlora")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--results-md", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--no-md", action="store_true")
    p.add_argument("--render", type=Path, default=None, help="only render this JSON into RESULTS.md")
    p.add_argument("--measured", type=Path, nargs="+", default=[],
                   help="bench_quality.py JSONs (one per seed) at the ρ whose measured training peak is QLoRA's: "
                        f"the row \"{MEASURED_ROW}\"")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="merge these result JSONs (runs split by seed/task) into --json, then render")
    args = p.parse_args(argv)
    if args.merge:
        data = merge([json.loads(f.read_text(encoding="utf-8")) for f in args.merge])
        if args.json:
            _save(data, args.json)
    elif args.render:
        data = json.loads(args.render.read_text(encoding="utf-8"))
    else:
        settings = bq.BenchSettings(device=args.device, steps=args.steps)
        if args.model_dir is None:
            from emloc_engine.catalog.demo import ensure_demo_model

            model_dir = Path(ensure_demo_model())
        else:
            model_dir = args.model_dir
        model_dir = bq.plain_model_dir(model_dir, args.work_dir)
        json_path = args.json or ROOT / "benchmarks" / "results" / f"vs-qlora-{dt.date.today().isoformat()}.json"
        command = "python benchmarks/bench_vs_qlora.py " + " ".join(sys.argv[1:] if argv is None else argv)
        data = run(settings, [int(x) for x in args.seeds.split(",") if x.strip()], model_dir,
                   [t for t in args.tasks.split(",") if t], args.work_dir, json_path, command.strip(),
                   ratio=args.ratio)
    measured = [_measured_run(f) for f in args.measured]
    shown = [f.resolve().relative_to(ROOT).as_posix() if f.resolve().is_relative_to(ROOT) else str(f)
             for f in args.measured]
    text = render(data, measured, shown)
    if not args.no_md:
        write_section(args.results_md, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
