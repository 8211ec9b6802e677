"""``emloc vlm MODEL DATA --out RUN``: every stage for a vision-language model, resumable.

The options are :class:`~emloc_engine.vision.run.VlmRunConfig`'s fields (generated from them).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

HELP = "Fine-tune a vision-language model on images + conversations: emulator, train, correct, merge."
_SKIP = ("model_dir", "data", "run_dir")


def register(sub: Any) -> None:
    from emloc_engine.vision.run import VlmRunConfig

    p: argparse.ArgumentParser = sub.add_parser("vlm", help=HELP, description=HELP)
    p.add_argument("model", help="VLM folder or HF cache repo id (org/name).")
    p.add_argument("data", help="Image dataset (.jsonl/.json/.csv/.parquet); image paths relative to it.")
    p.add_argument("--out", required=True, help="Run folder (created; rerunning resumes).")
    p.add_argument("--max-length", type=int, default=2048, help="Tokens per sample, image tokens included.")
    for f in dataclasses.fields(VlmRunConfig):
        if f.name in _SKIP:
            continue
        kind = (
            float
            if f.name in ("ratio", "vision_ratio", "lr", "lam")
            else int
            if f.name in ("calibration_samples", "steps", "rank")
            else str
        )
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default, help=f.metadata["help"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emloc_engine.catalog.resolve import resolve_data, resolve_model
    from emloc_engine.core.progress import TqdmProgress
    from emloc_engine.data.config import DataConfig
    from emloc_engine.vision.run import VlmRunConfig, run_vlm

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(VlmRunConfig) if f.name not in _SKIP}
    cfg = VlmRunConfig(
        model_dir=resolve_model(args.model),
        data=DataConfig(resolve_data(args.data), max_length=args.max_length),
        run_dir=Path(args.out),
        **values,
    )
    bar = TqdmProgress("emloc vlm")
    try:
        result = run_vlm(cfg, bar)
    finally:
        bar.close()
    print(f"Run folder: {result.run_dir}")
    print(f"λ = {result.lam}; final eval loss (emulator + adapter) = {result.eval_loss}")
    print(f"  merged: {result.merged_dir}")
    print(f"  adapter: {result.adapter_dir}")
    return 0
