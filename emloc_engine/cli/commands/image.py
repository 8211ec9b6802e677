"""``emloc image PIPELINE IMAGES --trigger WORD --out RUN``: personalise an image model, resumable.

The options are :class:`~emloc_engine.images.options.ImageRunConfig`'s fields (generated from them:
name, type, default and help come from the one place the settings are defined).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

HELP = "Personalise an image model (FLUX.1, SD3, SDXL) on your photos: cache, emulator, train, correct."
_POSITIONAL = ("pipeline_dir", "images_dir", "run_dir")


def _parser_of(type_text: str) -> tuple[Any, dict[str, Any]]:
    """argparse ``type`` (and extra kwargs) for a dataclass field's annotation text."""
    base = type_text.replace(" | None", "").strip()
    if base == "bool":
        return None, {"action": argparse.BooleanOptionalAction}
    if base.startswith("tuple["):
        return str, {"nargs": "*"}
    if base == "float":
        return (lambda s: math.inf if s in ("inf", "∞") else float(s)), {}
    if base == "int":
        return int, {}
    if base == "Path":
        return Path, {}
    return str, {}


def register(sub: Any) -> None:
    from emloc_engine.images.options import ImageRunConfig  # torch-free: `emloc --help` stays fast

    p: argparse.ArgumentParser = sub.add_parser("image", help=HELP, description=HELP)
    p.add_argument(
        "pipeline", help="Diffusers pipeline folder (FLUX.1, SD3, SDXL) or a single-file denoiser."
    )
    p.add_argument("images", help="Folder of the subject's images; captions as .txt beside them.")
    p.add_argument("--out", required=True, help="Run folder (created; rerunning resumes).")
    hints = typing.get_type_hints(ImageRunConfig)
    for f in dataclasses.fields(ImageRunConfig):
        if f.name in _POSITIONAL:
            continue
        conv, extra = _parser_of(str(f.type))
        if typing.get_origin(hints[f.name]) is typing.Literal:  # e.g. --anchor {none,blocks}
            extra["choices"] = typing.get_args(hints[f.name])
        kw: dict[str, Any] = {"default": f.default, "help": f.metadata["help"], **extra}
        if f.name == "ratio":  # planned unless given (emloc_engine.images.planning)
            conv, kw["default"] = _ratio, "auto"
            kw["help"] += " auto (default): the largest that fits the budget (emloc plan PIPELINE shows it)."
        if conv is not None:
            kw["type"] = conv
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)
    p.add_argument(
        "--budget-gib",
        type=float,
        default=None,
        help="GPU memory every stage must keep to, for --ratio auto (default: the GPU's free memory, "
        "or --gpu-memory when lower, minus max(0.5 GiB, 5%%)).",
    )
    p.add_argument(
        "--gpu-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="Cap this process's GPU memory at GIB (the budget of --ratio auto comes from it).",
    )
    p.set_defaults(func=run)


def _ratio(text: str) -> float | str:
    return "auto" if text == "auto" else float(text)


def _auto_ratio(cfg: Any, args: argparse.Namespace) -> Any:
    """``cfg`` with ρ and the emulator's statistics budget chosen by the image planner (a resumed run keeps
    its first ρ and statistics budget).

    Raises:
        InsufficientMemory: no ρ fits; the message says which stage and by how much.
    """
    from dataclasses import replace

    from emloc_engine.images.planning import (
        format_image_plan,
        plan_for_run,
        stored_ratio,
        stored_stats_budget,
        with_plan,
    )

    first = stored_ratio(cfg.run_dir)
    if first is not None:
        stats = cfg.stats_budget_gib if cfg.stats_budget_gib is not None else stored_stats_budget(cfg.run_dir)
        return replace(cfg, ratio=first, stats_budget_gib=stats)
    gib = 1024**3
    budget = int(args.budget_gib * gib) if args.budget_gib else None
    cap = int(args.gpu_memory * gib) if args.gpu_memory else None
    plan = plan_for_run(cfg, budget, cap)
    print(format_image_plan(plan))
    return with_plan(cfg, plan)


def run(args: argparse.Namespace) -> int:
    from emloc_engine.core.progress import TqdmProgress
    from emloc_engine.images.run import ImageRunConfig, run_images

    values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(ImageRunConfig) if f.name not in _POSITIONAL
    }
    values["sample_prompts"] = tuple(values["sample_prompts"] or ())
    auto = values["ratio"] == "auto"
    if auto:
        values["ratio"] = 0.5  # replaced by the plan below
    cfg = ImageRunConfig(
        pipeline_dir=Path(args.pipeline), images_dir=Path(args.images), run_dir=Path(args.out), **values
    )
    if auto:
        cfg = _auto_ratio(cfg, args)
    if args.gpu_memory:
        from emloc_engine.machine.memory_cap import apply_gpu_memory_cap

        apply_gpu_memory_cap(int(args.gpu_memory * 1024**3), cfg.device)
    bar = TqdmProgress("emloc image")
    try:
        result = run_images(cfg, bar)
    finally:
        bar.close()
    print(f"Run folder: {result.run_dir} ({result.kind})")
    if not result.finished:
        print(f"Stopped after step {result.steps_done}; run the same command again to continue.")
        return 0
    print(f"λ = {result.lam}; held-out denoising loss per λ: {list(result.lambda_table)}")
    print(f"  adapter (for the emulator): {result.adapter_dir}")
    print(f"  corrected adapter (for the original pipeline): {result.corrected_dir}")
    return 0
