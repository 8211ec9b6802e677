"""``emloc correct RUN_DIR``: Stage 3: correct the trained adapter for the emulator/original mismatch.

Reads ``RUN_DIR/adapter`` and ``RUN_DIR/emulator``, writes ``RUN_DIR/adapter-corrected`` and records
the stage (λ, λ table) in ``RUN_DIR/manifest.json``. ``--lambda auto`` (default) chooses λ on the
eval split of ``--data`` (or of the run's recorded dataset).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from emloc_engine.catalog.resolve import resolve_data, resolve_model


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:g}"


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`CorrectionConfig` of the options, on top of the run's recorded settings (model, data)."""
    from emloc_engine.run.manifest import read_manifest
    from emloc_engine.run.options import apply_values, top_value, typed_values
    from emloc_engine.run.plan import options_of
    from emloc_engine.stages.correction.corrector import CorrectionConfig
    from emloc_engine.stages.correction.options import CorrectionOptions

    values = typed_values(args)
    run_dir = Path(args.run_dir)
    manifest = read_manifest(run_dir) if run_dir.is_dir() else None
    recorded = manifest.config if manifest is not None else None
    data = recorded.data if recorded is not None else None
    if args.data:
        from emloc_engine.data import DataConfig

        data = DataConfig(path=resolve_data(args.data)) if data is None else replace(data, path=resolve_data(args.data))
    if data is not None:
        data = apply_values(data, "data", values)
    model = resolve_model(args.model) if args.model else (recorded.model_dir if recorded is not None else None)
    options = apply_values(recorded.correct if recorded is not None else CorrectionOptions(), "correct", values)
    device = str(top_value(values, "device", recorded.device if recorded is not None else "auto"))
    return CorrectionConfig(**options_of(options), run_dir=run_dir, model_dir=model, data=data, device=device,
                            overwrite=args.overwrite)


def run(args: argparse.Namespace) -> int:
    from emloc_engine.core.progress import TqdmProgress
    from emloc_engine.run.orchestrator import open_run, run_stage
    from emloc_engine.stages.correction.corrector import correct_lora

    cfg = config_from_args(args)
    progress = TqdmProgress("correct")
    try:
        with open_run(cfg.run_dir) as session:
            recording = session.recording("correct", progress)
            result = run_stage(session, "correct", lambda: correct_lora(cfg, recording))
    finally:
        progress.close()
    out = sys.stdout
    if result.lambda_table:
        print("λ       held-out loss", file=out)
        for lam, loss in result.lambda_table:
            mark = "  <- chosen" if lam == result.lambda_ else ""
            print(f"{_fmt(lam):<7} {loss:.4f}{mark}", file=out)
    damped = sum(m.damped for m in result.modules)
    print(f"λ = {_fmt(result.lambda_)} ({result.lambda_mode}); {len(result.modules)} modules corrected, "
          f"{damped} damped; {result.wall_s:.1f} s", file=out)
    print(f"corrected adapter: {result.adapter_dir}", file=out)
    return 0


def register(sub: Any) -> None:
    from emloc_engine.run.options import add_options

    help_text = "Stage 3: correct the trained adapter for the emulator/original mismatch."
    p: argparse.ArgumentParser = sub.add_parser("correct", help=help_text, description=help_text)
    p.add_argument("run_dir", metavar="RUN_DIR", help="Run folder holding emulator/ and adapter/.")
    p.add_argument("--data", help="Dataset whose eval split chooses λ (default: the run's dataset).")
    p.add_argument("--model", help="Original model folder (default: the run's, else the emulator's source model).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing RUN_DIR/adapter-corrected.")
    add_options(p, ("correct",), include=("device", "data.max_length"))
    p.set_defaults(func=run)
