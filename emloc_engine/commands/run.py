"""``emloc run MODEL DATA --out RUN_DIR``: every stage, end to end, resumable from the manifest."""

from __future__ import annotations

import argparse
from typing import Any

from emloc_engine.commands._common import not_implemented


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a whole run (also reused by the app's "show command" view)."""
    p.add_argument("model", help="Model folder, HF cache repo id (org/name) or catalog name.")
    p.add_argument("data", help="Dataset file (.jsonl/.json/.csv/.parquet/.txt) or 'demo'.")
    p.add_argument("--out", required=True, help="Run folder (created; an interrupted run resumes).")
    ratio = p.add_mutually_exclusive_group()
    ratio.add_argument("--ratio", type=float, help="Keep-ratio ρ of the compressed layers (0 < ρ < 1).")
    ratio.add_argument("--budget-gib", type=float, help="GPU memory budget; the planner picks ρ.")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r.")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (scale alpha/r).")
    p.add_argument("--steps", type=int, default=100, help="Optimizer steps.")
    p.add_argument("--lr", type=float, default=2e-4, help="Peak learning rate.")
    p.add_argument("--lambda", dest="lambda_", default="auto",
                   help="Correction damping λ: a number, 'inf' (exact) or 'auto' (chosen on held-out data).")
    p.add_argument("--calib", type=int, default=64, help="Calibration samples for the emulator.")
    p.add_argument("--max-length", type=int, default=512, help="Tokens per sample (longer ones are truncated).")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="Where to compute.")
    p.add_argument("--export", default="merged,adapter,gguf",
                   help="Comma-separated exports: merged, adapter, gguf (empty for none).")
    p.add_argument("--seed", type=int, default=0, help="Seed for the split, sampling and initialisation.")


def register(sub: Any) -> None:
    help_text = "Run every stage: build the emulator, train, correct, export."
    p: argparse.ArgumentParser = sub.add_parser("run", help=help_text, description=help_text)
    add_run_arguments(p)
    p.set_defaults(func=not_implemented("run", "end-to-end pipeline"))
