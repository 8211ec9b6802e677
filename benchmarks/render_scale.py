"""Render the GPU scale results (``benchmarks/results/*.json``) into ``benchmarks/RESULTS.md``.

Numbers come from the JSON files the benchmark commands printed on the device; the planner's
predictions are recomputed here from the same settings (pure arithmetic, ``emloc_engine.run.planning``).
Only the part of RESULTS.md between the ``scale`` markers is rewritten.

    python benchmarks/render_scale.py
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_md import write_section

from emloc_engine.catalog.model_facts import reference_facts
from emloc_engine.run.planning import (
    DEFAULT_CONSTANTS,
    PlanConfig,
    correction_peak,
    emulator_build_peak,
    inference_peak,
    training_peak,
)

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- scale:begin -->", "<!-- scale:end -->"
GIB = 2**30
DATE = "2026-11-29"
# The 8B runs predate anchored training and the 64 MiB loss chunks: predict what ran then (1024-token chunks).
BEFORE: dict[str, Any] = {"anchored": False,
                          "constants": replace(DEFAULT_CONSTANTS, loss_chunk_bytes=1024 * 128_256 * 14)}


def _load(name: str) -> dict[str, Any]:
    return json.loads((HERE / "results" / name).read_text())


def _err(pred: float, meas: float) -> str:
    return f"{100 * (pred - meas) / meas:+.1f}%"


def _planner_rows(probe: dict[str, Any], training: dict[str, Any], scale: dict[str, Any]) -> list[str]:
    facts = reference_facts("Llama-3-8B")
    rows = ["| what | settings | measured GiB | predicted GiB | error |", "|---|---|---:|---:|---:|"]
    for ctx in (512, 1024, 2048, 4096):
        meas = probe[f"infer_ctx{ctx}"]
        pred = inference_peak(facts, PlanConfig(context_length=ctx)).allocated_bytes / GIB
        rows.append(f"| inference (original) | ctx {ctx}, batch 1 | {meas:.2f} | {pred:.2f} | {_err(pred, meas)} |")
    for key, run in training["summary"].items():
        name, b = key.rsplit(" ", 1)
        batch = int(b[1:])
        cfg = PlanConfig(context_length=1024, batch_size=batch, lora_rank=16, **BEFORE)
        if name == "full":
            pred_b = training_peak(facts, cfg, 1.0, name="full_lora", chunked_loss=True).allocated_bytes
            label = "LoRA, full model (engine trainer)"
        else:
            ratio = float(name.split("=")[1])
            pred_b = training_peak(facts, cfg, ratio).allocated_bytes
            label = f"LoRA on emulator ρ={ratio}"
        meas = run["peak_gib"]
        rows.append(f"| {label} | ctx 1024, batch {batch}, r 16 | {meas:.2f} | {pred_b / GIB:.2f} | "
                    f"{_err(pred_b / GIB, meas)} |")
    st = scale["stages"]
    cfg = PlanConfig(context_length=1024, batch_size=1, lora_rank=16, **BEFORE)
    budget = int(0.5 * scale["inference_peak_gib"] * GIB)
    for stage, pred_b in (("emulator", emulator_build_peak(facts, cfg, 0.4, budget).allocated_bytes),
                          ("correct", correction_peak(facts, cfg, 0.4).allocated_bytes)):
        meas = st[stage]["measured_peak_gib"]
        rows.append(f"| {stage} stage (pipeline) | ρ 0.4, 64×1024 calib | {meas:.2f} | {pred_b / GIB:.2f} | "
                    f"{_err(pred_b / GIB, meas)} |")
    return rows


def _emulator_section(inference_gib: float) -> list[str]:
    one = _load("emulator-llama3-8b-1gpu-2026-11-29.json")
    two = _load("emulator-llama3-8b-2gpu-2026-11-29.json")
    out = ["### Stage 1 alone: emulator construction on one and on two GPUs (issues 3 and 10)", "",
           f"Commands: `{one['command']}` (one GPU) and `{two['command']}` (GPU 0 runs the calibration forward of "
           "block b+1 while GPU 1 factorises block b), both on the `nvidia-h200-x2` host, "
           f"{one['date'][:10]}, torch {one['torch']}; {one['samples']} calibration samples × {one['length']} "
           f"tokens, ρ {one['ratio']}, {one['modules']} modules, TF32 statistics GEMMs for bf16 activations.", "",
           "| GPUs | wall s | forward s | factorise s (on GPU 0) | waiting for factor GPU s | peak GPU GiB | "
           "× inference peak | peak CPU RSS GiB |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    inf = one.get("inference_peak_gib") or inference_gib
    for n, r in ((1, one), (2, two)):
        t = r["timings_s"]
        out.append(f"| {n} | {r['wall_s']:.1f} | {t['forward']:.1f} | {t['factorize']:.1f} | "
                   f"{t['factorize_wait']:.1f} | {r['peak_gpu_gib']:.2f} | {r['peak_gpu_gib'] / inf:.2f} | "
                   f"{r['peak_cpu_rss_gib']:.2f} |")
    out += ["", f"Issue 3's targets (≤ 60 s, ≤ ½ the inference peak of {inf:.2f} GiB, RSS ≤ 8 GiB) hold on one GPU: "
            f"{one['wall_s']:.1f} s, {one['peak_gpu_gib'] / inf:.2f}×, {one['peak_cpu_rss_gib']:.1f} GiB. "
            f"Two GPUs: {one['wall_s'] / two['wall_s']:.2f}× faster. The factorisation moves off GPU 0 entirely; "
            f"GPU 1's share ({one['timings_s']['factorize']:.0f} s of work on one GPU) is now the longer one, so GPU 0 "
            f"waits {two['timings_s']['factorize_wait']:.0f} s for it (a third GPU would take part of it: "
            "`factor_devices` takes any number). Both builds wrote the same per-module errors (mean relative "
            f"whitened error {one['rel_error_mean']:.4f} vs {two['rel_error_mean']:.4f}). The earlier pipeline run "
            "above (63.3 s) predates the TF32 statistics GEMMs.", ""]
    spec = _load("emulator-llama3-8b-spectral-2026-11-29.json")
    out += [f"Opt-in per-module ranks (`--allocation spectral`, same settings, one GPU; command `{spec['command']}`): "
            f"**{spec['wall_s']:.1f} s** in all, of which the first streaming pass that measures every module's "
            f"whitened spectrum took {spec['spectra_wall_s']:.1f} s (one more calibration forward plus an fp64 "
            f"eigendecomposition per module) and the build's forward and factorisation "
            f"{spec['timings_s']['forward']:.1f} s and {spec['timings_s']['factorize']:.1f} s; peak GPU {spec['peak_gpu_gib']:.2f} GiB, peak RSS {spec['peak_cpu_rss_gib']:.2f} GiB. "
            f"On these random weights (flat spectra) it kept {spec['dense_modules']} of 224 modules dense; the "
            "quality effect is measured on a real model in the Quality section (`aa-calib256-alloc`).", ""]
    return out


def _scale13_section() -> list[str]:
    """Issue 8's second scale: a 13B architecture through `emloc run` at the planner's own ρ."""
    run = _load("scale-llama2-13b-2026-11-29.json")
    tf32, fp32 = _load("emulator-llama2-13b-tf32-2026-11-29.json"), _load("emulator-llama2-13b-fp32-2026-11-29.json")
    inf, st = run["inference_peak_gib"], run["stages"]
    out = ["### A 13B architecture at the planner's ρ (Llama-2-13B shapes)", "",
           "Weights: `python benchmarks/make_random_model.py --arch llama2-13b --out /tmp/l13b --shards 6` "
           "(13.0 B parameters, 26 GB in 6 shards; 34 s on the H200). Command: `EMLOC_STATS_TF32=0 python "
           "benchmarks/bench_scale.py --model-dir /tmp/l13b --work /tmp/scale13 --steps 20 --max-length 1024 "
           f"--exports merged,adapter` (no `--ratio`: the planner chose **ρ = {run['ratio']}** for a budget of the "
           f"model's own inference peak, {run['plan']['budget_gib']:.2f} GiB predicted), on GPU 0 of the "
           f"`nvidia-h200-x2` host while GPU 1 ran quality benchmarks; {DATE}, torch {run['torch']}. This run "
           "predates anchored training (it trained without anchors); its planner already had the 64 MiB loss "
           "chunks and the margin on the predicted part.", "",
           f"Measured inference peak (generate, prompt 1024): **{inf:.2f} GiB**. Whole run: "
           f"**{run['total_s'] / 60:.1f} min**.", "",
           "| stage | wall s | peak GPU GiB | × inference peak | planner predicted GiB | error | peak CPU RSS GiB |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("emulator", "train", "correct", "export"):
        r = st[name]
        peak, pred = r.get("measured_peak_gib"), r.get("predicted_peak_gib")
        out.append(f"| {name} | {r['wall_s']:.1f} | {'—' if peak is None else f'{peak:.2f}'} | "
                   f"{'—' if peak is None else f'{peak / inf:.2f}'} | {'—' if pred is None else f'{pred:.2f}'} | "
                   f"{'—' if not (peak and pred) else _err(pred, peak)} | {r['peak_rss_gib']:.1f} |")
    tr, co = st["train"], st["correct"]
    out += ["", f"Training: {tr['tokens_per_s']:.0f} tokens/s at batch 1 (20 steps, {tr['wall_s']:.0f} s); "
            f"correction of {tf32['modules']} modules {co['correction_s']:.1f} s + λ search {co['eval_s']:.1f} s (chose "
            f"λ = {co['lambda']}); merge {st['export']['merge_s']:.1f} s for 26 GB. Every stage stayed under the "
            "inference peak; the planner over-predicted every measured peak (safe side).", "",
            "Why `EMLOC_STATS_TF32=0`: the first attempt of this run (same command, TF32 statistics, while three "
            "quality benchmarks shared the host) stopped in Stage 1 with \"the calibration statistic is not "
            "positive semi-definite\" for block 0's gate_proj. The stand-alone Stage 1 on the same weights "
            "(`benchmarks/bench_emulator.py --model-dir /tmp/l13b --skip-inference`, random calibration tokens, "
            f"ρ 0.4) then succeeded with both: TF32 statistics {tf32['wall_s']:.1f} s (forward "
            f"{tf32['timings_s']['forward']:.1f} s) and plain fp32 {fp32['wall_s']:.1f} s (forward "
            f"{fp32['timings_s']['forward']:.1f} s), identical errors (mean relative whitened error "
            f"{tf32['rel_error_mean']:.4f} vs {fp32['rel_error_mean']:.4f}), peak GPU {tf32['peak_gpu_gib']:.2f} GiB. "
            "Not reproduced, so not explained; the engine now names the knob in that error's message.", ""]
    return out


def _three_arch_planner() -> list[str]:
    data = _load("planner-3archs-2026-11-29.json")
    s = data["summary"]
    out = ["", f"Three architectures × three ratios × two contexts (issue 6's table). Command: `{data['command']}` "
           f"({data['device']}, {data['date']}; random bf16 weights built on the GPU, batch 1, LoRA r 16, 2 AdamW "
           f"steps per training measurement). {s['within_10pct']} of {s['measured']} predictions within ±10%; "
           f"largest error {s['max_abs_error_pct']}%.", "",
           "| architecture | stage | ρ | context | predicted GiB | measured GiB | error |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        ratio = "—" if r["ratio"] is None or r["stage"] != "emulator_train" else f"{r['ratio']}"
        out.append(f"| {r['arch']} | {r['stage']} | {ratio} | {r['context']} | {r['predicted_gib']:.2f} | "
                   f"{r['measured_gib']:.2f} | {r['error_pct']:+.1f}% |")
    return out


def render() -> str:
    scale = _load("scale-llama3-8b-2026-11-29.json")
    training = _load("training-llama3-8b-2026-11-29.json")
    dist = _load("distributed-llama3-8b-2026-11-29.json")
    probe = _load("inference-probe-llama3-8b-2026-11-29.json")
    ver = _load("export-verification-llama3-8b-2026-11-29.json")
    inf = scale["inference_peak_gib"]
    st = scale["stages"]
    out = [BEGIN, "## Scale (GPU): Llama-3-8B architecture, random bf16 weights, one H200", "",
           f"Date {DATE}; device {scale['device']}; torch {scale['torch']}, transformers 5.17.0, peft 0.21.2. "
           "Weights: `python benchmarks/make_random_model.py --arch llama3-8b --out /tmp/l8b --shards 4` "
           "(8.03 B parameters, 16.1 GB in 4 shards). Speed and memory do not depend on the weight values.", "",
           "### Every stage of `emloc run` (the same pipeline the app runs)", "",
           "Command: `python benchmarks/bench_scale.py --model-dir /tmp/l8b --work /tmp/scale --ratio 0.4 "
           "--steps 20 --max-length 1024 --exports merged,adapter` (64 calibration samples × 1024 tokens, "
           "LoRA r 16 / alpha 32 on all 224 linear modules, batch 1, λ auto).", "",
           f"Inference peak of the original model (budget), prompt 1024 tokens: **{inf:.2f} GiB**.", "",
           "| stage | wall s | peak GPU GiB | × inference peak | planner predicted GiB | peak CPU RSS GiB | notes |",
           "|---|---:|---:|---:|---:|---:|---|"]
    notes = {
        "emulator": "target ≤ 60 s, ≤ ½ inference peak, RSS ≤ 8 GiB",
        "train": f"{st['train'].get('tokens_per_s', 0):.0f} tokens/s, 20 steps; eval loss {st['train'].get('final_eval_loss', 0):.3f}",
        "correct": f"correction of 224 modules {st['correct'].get('correction_s', 0):.1f} s (target ≤ 10 s) + "
                   f"λ search {st['correct'].get('eval_s', 0):.1f} s; chose λ = {st['correct'].get('lambda')}",
        "export": f"merge + write 16 GB: {st['export'].get('merge_s', 0):.1f} s (target ≤ 120 s); then verification",
    }
    for name in ("emulator", "train", "correct", "export"):
        s = st[name]
        peak = s.get("measured_peak_gib")
        ratio = f"{peak / inf:.2f}" if peak else "—"
        pred = s.get("predicted_peak_gib")
        out.append(f"| {name} | {s['wall_s']:.1f} | {peak if peak is None else f'{peak:.2f}'} | {ratio} | "
                   f"{'—' if pred is None else f'{pred:.2f}'} | {s['peak_rss_gib']:.1f} | {notes[name]} |")
    lam = st["correct"]["lambda_table"]
    out += ["", "λ table (held-out loss on the original + corrected adapter): " +
            ", ".join(f"λ={r['lambda']}: {r['eval_loss']:.4f}" for r in lam) + ".", "",
            "Export verification (max |Δlogit| vs original + adapter through peft, fp32 compute on the GPU): " +
            ", ".join(f"{n} {d:.4g}" for n, d in ver["verification"]) +
            f"; bf16 rounding floor {ver['reduced_precision_floor']:.4g}; the adapter itself moves logits by "
            f"{ver['adapter_effect']:.3g}.", "",
            "Reading the table:",
            "- Peak CPU RSS counts file-backed pages of memory-mapped safetensors (page cache) touched while "
            "reading the 16 GB checkpoint; the export stage's figure includes loading models for verification. "
            "The merge itself reads with plain reads, not mmap; its own peak is reported as "
            "`merge_peak_rss_gib` since this run (not yet measured on the GPU host).",
            "- The correction stage's peak is the original model plus the adapter evaluated on held-out data "
            "(batch 1, chunked head): the same as running the fine-tuned model unmerged, 1.4% above the bare "
            "model's generate() peak.", ""]
    out += _scale13_section()
    merge = _load("merge-cpu-llama3-8b-2026-11-29.json")
    out += ["### The merge alone, on a 2-core CPU box", "",
            f"Command: `{merge['command']}` ({merge['machine']}). The merge is a CPU stage by design.", "",
            f"Merged {merge['merged_modules']} modules (rank {merge['rank']}) into {merge['model_gb']:.1f} GB of "
            f"bf16 shards in **{merge['merge_s']:.0f} s** (target ≤ 120 s) with **peak RSS "
            f"{merge['peak_rss_gib']:.2f} GiB** (target ≤ largest shard {merge['largest_shard_gib']:.2f} + 2 = "
            f"{merge['rss_target_gib']:.2f} GiB; the process itself started at {merge['baseline_rss_gib']:.2f}). "
            f"Spot check: max |merged − bf16(W + s·B·A)| = {merge['spot_check_ulps']:.0f} bf16 spacings of the "
            "exact value — large only where W and s·B·A nearly cancel (the spacing of a near-zero result is "
            "tiny while the fp32 sum carries fp32 rounding of s·B·A).", ""]
    demo = _load("demo-cpu-2026-11-29.json")
    lam_rows = ", ".join(f"λ={r['lambda']}: {r['eval_loss']:.4f}" for r in demo["lambda_table"])
    out += ["### The demo, end to end, on a 2-core CPU", "",
            f"Command: `{demo['command']}` ({demo['machine']}, {demo['date']}). SmolLM2-135M-Instruct, "
            f"planner's ρ = {demo['ratio']}.", "",
            f"Wall {demo['wall']} (emulator {demo['stage_wall_s']['emulator']:.0f} s, training "
            f"{demo['stage_wall_s']['train']:.0f} s, correction {demo['stage_wall_s']['correct']:.0f} s, export "
            f"{demo['stage_wall_s']['export']:.0f} s), peak RSS {demo['max_rss_gib']:.2f} GiB. Held-out loss of the "
            f"original + corrected adapter: {lam_rows}; chose λ = {demo['lambda']}. Exports verified (max |Δlogit|): "
            + ", ".join(f"{n} {d:.3g}" for n, d in demo["verification"]) + ".", ""]
    out += _emulator_section(inf)
    padded = _load("training-llama3-8b-padded-2026-11-29.json")
    before = training["summary"]
    out += ["### Training on the emulator vs LoRA on the full model", "",
            "Command: `python benchmarks/bench_training.py --model-dir /tmp/l8b --ratios 0.25 0.4 0.6 --batches 1 8 16 "
            "--steps 3 --warmup 1 --work-dir /tmp/bt` (seq 1024, r 16, gradient checkpointing, bf16; the engine's own "
            "training loop; emulator factors random with the builder's exact shapes; inner ranks zero-padded to a "
            f"multiple of 8 in memory by `lowrank.pad_rank`). Device {padded['device']} (one GPU of the "
            "`nvidia-h200-x2` host), torch " + padded["torch"] + f", {DATE}. The last column is the first run "
            "(same command with `--batches 1 8`, before rank padding, one `nvidia-h200`).", "",
            "| config | peak GiB | ≤ inference peak | tokens/s | speed-up vs full LoRA | before padding |",
            "|---|---:|---|---:|---:|---:|"]
    for key, r in padded["summary"].items():
        sp = r.get("speedup_vs_full_lora")
        old = before.get(key, {}).get("speedup_vs_full_lora")
        out.append(f"| {key} | {r['peak_gib']:.2f} | {'yes' if r['peak_le_inference_peak'] else 'no'} | "
                   f"{r['tokens_per_s']:.0f} | {'—' if sp is None else f'{sp:.2f}×'} | "
                   f"{'—' if old is None else f'{old:.2f}×'} |")
    s4, s8 = padded["summary"]["rho=0.4 b8"], padded["summary"]["rho=0.4 b16"]
    out += ["", f"Inference peak in this run: {padded['inference']['peak_gib']:.2f} GiB (prefill 1024).", "",
            "Memory: every emulator configuration at batch 1 and 8 trains within the inference peak; LoRA on the "
            "full model never does (17.2 GiB at batch 1). Speed (issue 4's target: ≥ 1.3× full LoRA at ρ 0.4 at a "
            f"batch that fills the GPU): **{s4['speedup_vs_full_lora']:.2f}× at batch 8** (within the inference "
            f"peak) and {s8['speedup_vs_full_lora']:.2f}× at batch 16. Padding the inner ranks to multiples of 8 "
            "is what moved ρ 0.4 from 0.80× to this: odd ranks (k = 819, 1274, 327) kept bf16 GEMMs off the "
            "tensor-core fast path. At batch 1 (1024 tokens) the GPU is far from full and launch overhead "
            "dominates: the emulator's two GEMMs per layer make it slower than full LoRA there in this run, "
            "and batch-1 speeds moved by ±30% between the two machines, so read batch 1 for memory, not speed.", "",
            "### Planner accuracy (predicted `max_memory_allocated` vs measured)", "",
            "Predictions recomputed by `benchmarks/render_scale.py` from `emloc_engine.run.planning` with the "
            "settings of each measurement.", ""]
    out += _planner_rows(probe, training, scale)
    out += _three_arch_planner()
    out += ["", "### Data-parallel training on 2 H200s (issue 10)", "",
            "Command: `python benchmarks/bench_distributed.py --model-dir /tmp/l8b --gpus 1 2` on `nvidia-h200-x2` "
            f"(ρ {dist['settings']['ratio']}, batch {dist['settings']['batch']} × grad-accum "
            f"{dist['settings']['grad_accum']}, seq {dist['settings']['seq']}, bf16, NCCL).", "",
            "| GPUs | tokens/s | step s | peak GiB per GPU | speed-up | adapter max |Δ| vs 1 GPU |",
            "|---:|---:|---:|---:|---:|---:|"]
    for r in dist["runs"]:
        out.append(f"| {r['gpus']} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {r['peak_gib']:.2f} | "
                   f"{r.get('speedup', 1.0):.2f}× | {r.get('adapter_max_abs_diff', 0.0):.2g} "
                   f"(of max {r.get('adapter_max_abs', 0.0):.2g}) |")
    two = _load("emulator-llama3-8b-2gpu-2026-11-29.json")
    one = _load("emulator-llama3-8b-1gpu-2026-11-29.json")
    out += ["", f"Stage 1 across the same two GPUs (`--gpus 2`, table above): {one['wall_s']:.1f} s → "
            f"{two['wall_s']:.1f} s ({one['wall_s'] / two['wall_s']:.2f}×; GPU 1's factorisation is now the "
            "critical path).", "", END]
    return "\n".join(out)


def main() -> None:
    section = render()
    write_section(section, BEGIN, END)
    print(section)


if __name__ == "__main__":
    main()
