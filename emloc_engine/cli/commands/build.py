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
from dataclasses import replace
from pathlib import Path
from typing import Any

HELP = "Stage 1: build the emulator by activation-aware SVD, streaming block by block."


def register(sub: Any) -> None:
    from emloc_engine.run.options import add_options

    p: argparse.ArgumentParser = sub.add_parser("build", help=HELP, description=HELP)
    p.add_argument("model", help="Model folder, HF cache repo id (org/name) or catalog name.")
    p.add_argument("data", nargs="?", help="Dataset file (.jsonl/.json/.csv/.parquet/.txt) or 'demo'.")
    p.add_argument("--out", required=True, help="Run folder; the emulator goes to RUN_DIR/emulator.")
    p.add_argument("--calib-file", help="JSON file with a list of token-id lists, used instead of DATA.")
    p.add_argument("--overwrite", action="store_true", help="Replace an emulator built with other settings.")
    add_options(p, ("emulator", "data"), include=("ratio", "budget_bytes", "calib", "device", "gpus", "seed"))
    p.set_defaults(func=run)


def _calib(args: argparse.Namespace) -> int:
    from emloc_engine.run.config import RunConfig
    from emloc_engine.run.options import top_value, typed_values

    return int(top_value(typed_values(args), "calib", RunConfig.__dataclass_fields__["calib"].default))


def _data_config(args: argparse.Namespace) -> Any:
    """The calibration data's settings (None with --calib-file)."""
    if not args.data:
        return None
    from emloc_engine.catalog.resolve import resolve_data
    from emloc_engine.data import DataConfig
    from emloc_engine.run.options import apply_values, top_value, typed_values

    values = typed_values(args)
    data = apply_values(DataConfig(path=resolve_data(args.data)), "data", values)
    return replace(data, seed=int(top_value(values, "seed", data.seed)))


def _calibration_ids(args: argparse.Namespace, model_dir: Path) -> tuple[tuple[int, ...], ...]:
    from emloc_engine.core.errors import ConfigError, DataError

    if args.calib_file:
        try:
            ids = json.loads(Path(args.calib_file).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"Cannot read the calibration file {args.calib_file}: {exc}") from exc
        if not isinstance(ids, list) or not all(isinstance(s, list) for s in ids):
            raise DataError(f"{args.calib_file} must hold a JSON list of token-id lists.")
        return tuple(tuple(int(t) for t in s) for s in ids[: _calib(args)])
    if not args.data:
        raise ConfigError("emloc build needs DATA (a dataset file) or --calib-file.")
    from emloc_engine.data import calibration_token_ids, load_tokenizer

    data_cfg = _data_config(args)
    assert data_cfg is not None
    ids = calibration_token_ids(data_cfg, load_tokenizer(model_dir), n=_calib(args), seed=data_cfg.seed)
    return tuple(tuple(s) for s in ids)


def run(args: argparse.Namespace) -> int:
    from emloc_engine.catalog.resolve import resolve_model
    from emloc_engine.core.layout import RunLayout
    from emloc_engine.core.progress import TqdmProgress
    from emloc_engine.run.config import RunConfig
    from emloc_engine.run.options import apply_values, top_value, typed_values
    from emloc_engine.run.orchestrator import open_run, run_stage
    from emloc_engine.stages.emulator.builder import EmulatorConfig, build_emulator
    from emloc_engine.stages.emulator.options import EmulatorOptions

    values = typed_values(args)
    model_dir = resolve_model(args.model)
    options = apply_values(EmulatorOptions(), "emulator", values)
    gpus = int(top_value(values, "gpus", 1))
    device = str(top_value(values, "device", "auto"))
    cfg = EmulatorConfig(
        **{f: getattr(options, f) for f in EmulatorOptions.__dataclass_fields__},
        model_dir=model_dir, out_dir=RunLayout(Path(args.out)).emulator,
        calibration_ids=_calibration_ids(args, model_dir), ratio=float(top_value(values, "ratio", None) or 0.5),
        device=device, factor_devices=tuple(f"cuda:{i}" for i in range(1, max(1, gpus))),
        memory_budget_bytes=top_value(values, "budget_bytes", None), overwrite=args.overwrite)
    data = _data_config(args)
    bar = TqdmProgress("emloc build")
    try:
        with open_run(Path(args.out), model_dir=model_dir) as session:
            if data is not None and session.manifest.config is None:  # a whole run's settings, as far as known
                session.manifest.config = RunConfig(model_dir=model_dir, data=data, run_dir=Path(args.out),
                                                    ratio=cfg.ratio, device=device, gpus=gpus, seed=data.seed,
                                                    calib=_calib(args), emulator=options)
            recording = session.recording("emulator", bar)
            result = run_stage(session, "emulator", lambda: build_emulator(cfg, recording))
    finally:
        bar.close()
    print(f"Emulator: {result.emulator_dir}")
    print(f"{len(result.modules)} modules compressed; parameters {result.params_kept:,} of "
          f"{result.params_original:,} ({result.params_kept / result.params_original:.1%}); "
          f"{result.calibration_tokens:,} calibration tokens; {result.wall_s:.1f} s on {result.device}"
          + (f"; peak GPU {result.peak_vram_gib:.2f} GiB" if result.peak_vram_gib else "")
          + (f"; reused blocks {list(result.resumed_blocks)}" if result.resumed_blocks else ""), file=sys.stdout)
    return 0
