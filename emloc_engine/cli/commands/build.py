"""``emloc build MODEL DATA --out RUN_DIR``: Stage 1, the emulator by activation-aware SVD.

Tokenizes ``--calib`` calibration samples of at most ``--max-length`` tokens from DATA (the train
split, with the model's tokenizer and chat template) and writes ``RUN_DIR/emulator/``. An
interrupted build resumes at the next unfinished block when the same command is run again.
``--calib-file`` (a JSON list of token-id lists) replaces DATA for scripted or pre-tokenized runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HELP = "Stage 1: build the emulator by activation-aware SVD, streaming block by block."


def _ratio_override(text: str) -> tuple[str, float]:
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"expected PATTERN=RATIO, got {text!r}")
    return pattern, float(value)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("build", help=HELP, description=HELP)
    p.add_argument("model", help="Model folder, HF cache repo id (org/name) or catalog name.")
    p.add_argument("data", nargs="?", help="Dataset file (.jsonl/.json/.csv/.parquet/.txt) or 'demo'.")
    p.add_argument("--out", required=True, help="Run folder; the emulator goes to RUN_DIR/emulator.")
    p.add_argument("--ratio", type=float, default=0.5, help="Keep-ratio ρ of the compressed layers (0 < ρ < 1).")
    p.add_argument("--calib", type=int, default=64, help="Calibration samples.")
    p.add_argument("--max-length", type=int, default=512, help="Tokens per calibration sample.")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
    p.add_argument("--dtype", default="auto", dest="compute_dtype",
                   help="Compute dtype of the block forward (auto, float32, bfloat16, float16, float64).")
    p.add_argument("--dense", nargs="+", default=[], metavar="PATTERN",
                   help="Module name patterns kept dense (fnmatch on full names, e.g. '*.31.mlp.down_proj').")
    p.add_argument("--ratio-override", action="append", type=_ratio_override, default=[], metavar="PATTERN=RATIO",
                   help="Per-module keep-ratio (repeatable; last match wins; ≥ 1 keeps dense).")
    p.add_argument("--solver", choices=("eigh", "randomized"), default="eigh",
                   help="eigh (exact) or randomized (faster on big layers, error within about 0.5%%).")
    p.add_argument("--allocation", choices=("uniform", "spectral"), default="uniform",
                   help="Ranks per module: uniform (k from ρ for every module) or spectral (a first pass measures "
                        "each module's whitened spectrum and spends the same parameter budget where it removes the "
                        "most error; some modules become dense; better at ρ ≥ 0.4, worse at 0.25).")
    p.add_argument("--chunk-tokens", type=int, help="Tokens per forward chunk (default: from the memory budget).")
    p.add_argument("--budget-gib", type=float, help="GPU memory the build may use (sizes the chunks).")
    p.add_argument("--calib-file", help="JSON file with a list of token-id lists, used instead of DATA.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the calibration sample order.")
    p.add_argument("--overwrite", action="store_true", help="Replace an emulator built with other settings.")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="Use N GPUs: GPU 0 runs the blocks, GPUs 1..N-1 factorise finished blocks meanwhile.")
    p.set_defaults(func=run)


def _calibration_ids(args: argparse.Namespace, model_dir: Path) -> tuple[tuple[int, ...], ...]:
    from emloc_engine.core.errors import ConfigError, DataError

    if args.calib_file:
        try:
            ids = json.loads(Path(args.calib_file).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"Cannot read the calibration file {args.calib_file}: {exc}") from exc
        if not isinstance(ids, list) or not all(isinstance(s, list) for s in ids):
            raise DataError(f"{args.calib_file} must hold a JSON list of token-id lists.")
        return tuple(tuple(int(t) for t in s) for s in ids[: args.calib])
    if not args.data:
        raise ConfigError("emloc build needs DATA (a dataset file) or --calib-file.")
    from emloc_engine.catalog.resolve import resolve_data
    from emloc_engine.data import DataConfig, calibration_token_ids, load_tokenizer

    data_cfg = DataConfig(path=resolve_data(args.data), max_length=args.max_length, seed=args.seed)
    ids = calibration_token_ids(data_cfg, load_tokenizer(model_dir), n=args.calib, seed=args.seed)
    return tuple(tuple(s) for s in ids)


def run(args: argparse.Namespace) -> int:
    from emloc_engine.catalog.resolve import resolve_model
    from emloc_engine.core.layout import RunLayout
    from emloc_engine.core.progress import TqdmProgress
    from emloc_engine.stages.emulator.builder import EmulatorConfig, build_emulator

    model_dir = resolve_model(args.model)
    cfg = EmulatorConfig(
        model_dir=model_dir, out_dir=RunLayout(Path(args.out)).emulator,
        calibration_ids=_calibration_ids(args, model_dir), ratio=args.ratio,
        ratio_overrides=tuple(args.ratio_override), dense_patterns=tuple(args.dense), device=args.device,
        factor_devices=tuple(f"cuda:{i}" for i in range(1, max(1, args.gpus))),
        compute_dtype=args.compute_dtype, solver=args.solver, allocation=args.allocation,
        chunk_tokens=args.chunk_tokens,
        memory_budget_bytes=int(args.budget_gib * 2**30) if args.budget_gib else None, overwrite=args.overwrite)
    bar = TqdmProgress("emloc build")
    try:
        result = build_emulator(cfg, bar)
    finally:
        bar.close()
    print(f"Emulator: {result.emulator_dir}")
    print(f"{len(result.modules)} modules compressed; parameters {result.params_kept:,} of "
          f"{result.params_original:,} ({result.params_kept / result.params_original:.1%}); "
          f"{result.calibration_tokens:,} calibration tokens; {result.wall_s:.1f} s on {result.device}"
          + (f"; peak GPU {result.peak_vram_gib:.2f} GiB" if result.peak_vram_gib else "")
          + (f"; reused blocks {list(result.resumed_blocks)}" if result.resumed_blocks else ""), file=sys.stdout)
    return 0
