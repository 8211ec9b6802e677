"""``emloc plan MODEL``: predict the peak memory of inference and of every EMLoC stage, and pick ρ.

MODEL is a model folder, a cached repo id, ``demo``, or the name of a reference shape
(``Llama-3-8B``, ``Qwen2.5-7B``, ``Mistral-7B``...: no download needed). Only ``config.json`` and
the safetensors headers are read. Exit status 0 when a plan fits, 3 when nothing fits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HELP = "Predict peak memory of inference and of every EMLoC stage, and pick the compression ratio."
GIB = 1024**3


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("plan", help=HELP, description=HELP)
    p.add_argument("model", help="Model folder, cached repo id, 'demo', or a reference name such as Llama-3-8B.")
    p.add_argument("--budget-gib", type=float, default=None,
                   help="GPU memory EMLoC may use (default: what inference of the model needs).")
    p.add_argument("--gpu-gib", type=float, default=None, help="GPU memory to plan for (default: detected).")
    p.add_argument("--context", type=int, default=512, help="Tokens per training sequence.")
    p.add_argument("--batch", type=int, default=1, help="Sequences per step.")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank.")
    p.add_argument("--ratio", type=float, default=None, help="Evaluate this keep-ratio ρ instead of choosing one.")
    p.add_argument("--margin", type=float, default=0.1, help="Safety margin, a fraction of the budget.")
    p.add_argument("--json", action="store_true", help="Print the plan as JSON.")
    p.set_defaults(func=run)


def _facts(model: str) -> Any:
    from emloc_engine.catalog.model_facts import REFERENCE_CONFIGS, read_model_facts, reference_facts

    if model in REFERENCE_CONFIGS and not Path(model).exists():
        return reference_facts(model)
    from emloc_engine.catalog.resolve import resolve_model

    return read_model_facts(resolve_model(model))


def run(args: argparse.Namespace) -> int:
    from emloc_engine.machine.hardware import detect_machine
    from emloc_engine.run.planning import PlanConfig, format_plan, plan_memory

    facts = _facts(args.model)
    gpu_total: int | None = int(args.gpu_gib * GIB) if args.gpu_gib else None
    device, gpu_name = "cuda", None
    if gpu_total is None:
        machine = detect_machine()
        gpu = machine.best_gpu
        device = machine.backend
        gpu_total = gpu.total_bytes if gpu else machine.ram_total_bytes
        gpu_name = gpu.name if gpu else None
    cfg = PlanConfig(budget_bytes=int(args.budget_gib * GIB) if args.budget_gib else None, gpu_total_bytes=gpu_total,
                     context_length=args.context, batch_size=args.batch, lora_rank=args.rank, ratio=args.ratio,
                     safety_margin=args.margin, device=device, gpu_name=gpu_name)
    plan = plan_memory(facts, cfg)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0 if plan.fits else 3
