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


def _gib(flag: str) -> Any:
    """An argparse ``type`` for a size in GiB: a positive finite number, else an error naming ``flag``."""

    def parse(text: str) -> float:
        from emloc_engine.machine.budget import gib_to_bytes

        try:
            gib_to_bytes(text, flag)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return float(text)

    return parse


def register(sub: Any) -> None:
    from emloc_engine.data.config import DATA_DEFAULTS
    from emloc_engine.images.options import ANCHOR_MODES, run_default
    from emloc_engine.run.planning import PlanConfig
    from emloc_engine.stages.training.options import TrainOptions

    run, data = TrainOptions(), DATA_DEFAULTS
    p: argparse.ArgumentParser = sub.add_parser("plan", help=HELP, description=HELP)
    p.add_argument("model", help="Model folder, cached repo id, 'demo', or a reference name such as Llama-3-8B.")
    p.add_argument("--budget-gib", type=_gib("--budget-gib"), default=None,
                   help="GPU memory every stage must keep to (default: the GPU's free memory, or --gpu-memory when "
                        "lower, minus max(0.5 GiB, 5%%); with --gpu-gib: that size minus the margin).")
    p.add_argument("--gpu-gib", type=_gib("--gpu-gib"), default=None,
                   help="Plan for a GPU of this size, all of it free (default: the detected GPU).")
    p.add_argument("--gpu-memory", type=_gib("--gpu-memory"), default=None, metavar="GIB",
                   help="The process cap a run would use (emloc run --gpu-memory): the default budget comes from it.")
    p.add_argument("--ram-gib", type=_gib("--ram-gib"), default=None, help="RAM of the machine to plan for (default: this machine's).")
    p.add_argument("--gpu-name", default=None, help="GPU name for the time estimates (e.g. 'RTX 4090').")
    p.add_argument("--context", type=int, default=data.max_length, help="Tokens per training sequence.")
    p.add_argument("--batch", type=int, default=None,
                   help=f"Sequences per step (default {run.batch_size}; images per step for an image model, default 1).")
    p.add_argument("--rank", type=int, default=run.rank, help="LoRA rank.")
    p.add_argument("--steps", type=int, default=run.steps, help="Optimizer steps (for the time and the anchors).")
    p.add_argument("--anchor-ram-gib", type=float, default=run.anchor_ram_gib,
                   help="Most RAM the anchors take at once (emloc run --anchor-ram-gib).")
    p.add_argument("--ratio", type=float, default=None, help="Evaluate this keep-ratio ρ instead of choosing one.")
    p.add_argument("--margin", type=float, default=PlanConfig().safety_margin,
                   help="Safety margin, a fraction of the budget.")
    p.add_argument("--resolution", type=int, default=run_default("resolution"),
                   help="Image models: the training resolution of the detailed plan (the table shows 512-1024).")
    p.add_argument("--anchor", choices=ANCHOR_MODES, default=run_default("anchor"),
                   help="Image models: plan anchored training (emloc image --anchor).")
    p.add_argument("--json", action="store_true", help="Print the plan as JSON.")
    p.set_defaults(func=run_plan)


def _facts(model: str) -> Any:
    from emloc_engine.catalog.model_facts import REFERENCE_CONFIGS, read_model_facts, reference_facts

    if model in REFERENCE_CONFIGS and not Path(model).exists():
        return reference_facts(model)
    from emloc_engine.catalog.resolve import resolve_model

    return read_model_facts(resolve_model(model))


def plan_config_of(args: argparse.Namespace, machine: Any = None) -> Any:
    """The :class:`~emloc_engine.run.planning.PlanConfig` of ``emloc plan``'s arguments.

    With ``--gpu-gib`` the card is hypothetical and wholly free; else the detected machine's bounding GPU
    (its free memory makes the default budget, exactly as ``emloc run`` computes it).
    """
    from emloc_engine.machine.budget import default_budget_bytes
    from emloc_engine.run.planning import PlanConfig
    from emloc_engine.stages.training.options import TrainOptions

    cap = int(args.gpu_memory * GIB) if args.gpu_memory else None
    ram = int(args.ram_gib * GIB) if args.ram_gib else None
    if args.gpu_gib:
        total, free, device, gpu_name = int(args.gpu_gib * GIB), int(args.gpu_gib * GIB), "cuda", args.gpu_name
    else:
        if machine is None:
            from emloc_engine.machine.hardware import detect_machine

            machine = detect_machine()
        from emloc_engine.run.plan import bounding_gpu

        gpu = bounding_gpu(machine, "auto", 1)
        device = "cuda" if gpu is not None and machine.backend in ("cuda", "rocm") else machine.backend
        total = gpu.total_bytes if gpu else machine.ram_total_bytes
        free = gpu.free_bytes if gpu else (machine.ram_available_bytes or machine.ram_total_bytes)
        gpu_name = args.gpu_name or (gpu.name if gpu else None)
        ram = ram if ram is not None else (machine.ram_total_bytes or None)
        if gpu is None:
            cap = None  # the cap applies to GPUs only
    budget = int(args.budget_gib * GIB) if args.budget_gib else default_budget_bytes(free, cap)
    return PlanConfig(budget_bytes=budget, gpu_total_bytes=min(total, cap) if cap else total,
                      context_length=args.context, batch_size=args.batch or TrainOptions().batch_size, lora_rank=args.rank, ratio=args.ratio,
                      safety_margin=args.margin, device=device if device in ("cuda", "rocm", "mps", "cpu") else "cpu",
                      gpu_name=gpu_name, train_steps=args.steps, ram_bytes=ram,
                      anchor_ram_bytes=int(args.anchor_ram_gib * GIB))


def run_plan(args: argparse.Namespace) -> int:
    from emloc_engine.images.pipeline_index import is_pipeline_folder
    from emloc_engine.run.planning import format_plan, plan_memory

    if is_pipeline_folder(Path(args.model)):
        return run_image_plan(args)
    plan = plan_memory(_facts(args.model), plan_config_of(args))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0 if plan.fits else 3


def run_image_plan(args: argparse.Namespace) -> int:
    """``emloc plan PIPELINE_DIR``: the image planner's table (resolution × batch) and the detailed plan."""
    from emloc_engine.images.planning import (
        ImagePlanConfig,
        format_image_plan,
        format_plan_table,
        plan_images,
        plan_table,
    )

    base = plan_config_of(args)
    cfg = ImagePlanConfig(Path(args.model), base.budget_bytes, resolution=args.resolution, batch_size=args.batch or 1,
                          rank=args.rank, ratio=args.ratio, device="cpu" if base.device == "cpu" else "cuda",
                          safety_margin=args.margin, anchor=args.anchor)
    plan = plan_images(cfg)
    if args.json:
        print(json.dumps({"kind": plan.kind, "ratio": plan.ratio, "fits": plan.fits, "reason": plan.reason,
                          "limit_gib": plan.limit_bytes / GIB, "predicted_peaks_gib": plan.predicted_peaks_gib()},
                         indent=2))
    else:
        print(format_plan_table(plan_table(cfg)))
        print()
        print(format_image_plan(plan))
    return 0 if plan.fits else 3
