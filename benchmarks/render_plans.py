"""'This GPU runs this model; EMLoC trains it at ρ = … in … minutes' — the planner's answer, as a table.

Pure arithmetic (``emloc_engine.run.planning``), no GPU: the budget is the model's own inference peak
on that GPU (the promise: if you can run it, you can fine-tune it). Memory predictions were within
+0.3…+5.8% of the H200 measurements in the Scale section; time estimates assume the GPU's dense
bf16 rate at the utilisations in ``PlannerConstants`` and are rough (±50%).

    python benchmarks/render_plans.py
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_md import write_section

from emloc_engine.catalog.model_facts import reference_facts
from emloc_engine.run.planning import PlanConfig, inference_peak, plan_memory

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- plans:begin -->", "<!-- plans:end -->"
GIB = 2**30
GPUS = (("RTX 4090", 24), ("RTX 6000 Ada", 48), ("A100 80GB", 80), ("H200", 141))
MODELS = ("Qwen2.5-0.5B", "Llama-3-8B", "Qwen2.5-14B", "Llama-3-70B")
CONTEXT, STEPS = 1024, 100


def render() -> str:
    out = [BEGIN, "## What fits where (planner arithmetic, no GPU)", "",
           f"Context {CONTEXT}, batch 1, LoRA r 16 on every linear, {STEPS} steps, 64 calibration samples, "
           "λ auto. Budget = the model's own inference peak on that GPU, 10% margin. Command: "
           "`python benchmarks/render_plans.py` (same as `emloc plan MODEL --gpu-gib G --context 1024 --batch 1`).", "",
           "| GPU | model | runs here (inference GiB) | EMLoC trains it at ρ | EMLoC training GiB | "
           "plain LoRA GiB (fits?) | est. minutes (build + train + correct) |",
           "|---|---|---|---|---|---|---:|"]
    for gpu, gib in GPUS:
        for name in MODELS:
            facts = reference_facts(name)
            cfg = PlanConfig(gpu_total_bytes=gib * GIB, context_length=CONTEXT, batch_size=1,
                             lora_rank=16, gpu_name=gpu, train_steps=STEPS)
            # This table's budget is the model's own inference peak (the run's default is now the free GPU).
            plan = plan_memory(facts, replace(cfg, budget_bytes=inference_peak(facts, cfg).peak_bytes))
            infer = plan.inference_peak_bytes / GIB
            runs = infer <= gib
            full = plan.full_lora_peak_bytes / GIB
            if not runs:
                out.append(f"| {gpu} | {name} | no ({infer:.1f}) | — | — | {full:.1f} (no) | — |")
                continue
            if plan.ratio is None or not plan.fits:
                out.append(f"| {gpu} | {name} | yes ({infer:.1f}) | none fits: {plan.reason} | — | "
                           f"{full:.1f} ({'yes' if full <= gib else 'no'}) | — |")
                continue
            train = plan.stage("train").peak_bytes / GIB
            minutes = sum(plan.est_seconds.get(s, 0.0) for s in ("emulator", "train", "correct")) / 60
            out.append(f"| {gpu} | {name} | yes ({infer:.1f}) | {plan.ratio:.2f} | {train:.1f} | "
                       f"{full:.1f} ({'yes' if full <= gib else 'no'}) | {'< 1' if minutes < 1 else f'{minutes:.0f}'} |")
    out += ["", "The training column includes anchored training (one GPU; `emloc_engine.stages.training.anchoring`): the "
            "micro-batch's block offsets on the GPU and one pass of the original and of the emulator over the "
            "visited examples in the time. Losses are computed in chunks of ≤ 64 MiB of logits, and the 10% "
            "safety margin is taken from the predicted part of the budget, not from the CUDA context that "
            "inference pays too: before both changes the planner found no ρ for Qwen2.5-0.5B at its own "
            "inference peak and chose 0.70 for Llama-3-8B. When nothing fits, the app offers the whole GPU as the "
            "budget.", "",
            "Since 2026-12-06 the table plans the λ search the run performs (the correction's 64 held-out "
            "sequences; the planner had its own default of 16). With the original streamed, that search keeps "
            "every held-out sequence × candidate's hidden states on the GPU between blocks (0.6 GiB at 1,024 "
            "tokens for Qwen2.5-0.5B) up to a 1 GiB threshold; where keeping them would not fit the budget the "
            "plan now offloads them to RAM (`hidden_on_gpu_bytes` 0, passed to the stage; the anchor pass alike), "
            "and the streamed anchor pass runs one example at a time where its 4,096-token groups would not fit "
            "(`anchor_group_tokens`), so Qwen2.5-0.5B fits at its own inference peak again, at ρ 0.80 (it did not "
            "for a few hours on 2026-12-06, under the fixed threshold and groups).", "", END]
    return "\n".join(out)


def main() -> None:
    section = render()
    write_section(section, BEGIN, END, after="<!-- scale:end -->")
    print(section)


if __name__ == "__main__":
    main()
