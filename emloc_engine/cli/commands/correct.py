"""``emloc correct RUN_DIR``: Stage 3: correct the trained adapter for the emulator/original mismatch.

Reads ``RUN_DIR/adapter`` and ``RUN_DIR/emulator``, writes ``RUN_DIR/adapter-corrected`` and records
the stage (λ, λ table) in ``RUN_DIR/manifest.json``. ``--lambda auto`` (default) chooses λ on the
eval split of ``--data`` (or of the dataset recorded in the run manifest).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from emloc_engine.catalog.resolve import resolve_data, resolve_model
from emloc_engine.run.orchestrator import parse_lambda


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:g}"


def run(args: argparse.Namespace) -> int:
    from emloc_engine.core.progress import TqdmProgress
    from emloc_engine.run.manifest import RunManifest
    from emloc_engine.run.runlog import attach_run_log, detach_run_log
    from emloc_engine.stages.correction.corrector import CorrectionConfig, correct_lora

    data = None
    if args.data:
        from emloc_engine.data import DataConfig

        data = DataConfig(path=resolve_data(args.data), max_length=args.max_length)
    cfg = CorrectionConfig(run_dir=Path(args.run_dir), model_dir=resolve_model(args.model) if args.model else None,
                           lambda_=parse_lambda(args.lambda_), data=data, device=args.device,
                           max_eval_batches=args.max_eval_batches, overwrite=args.overwrite)
    manifest = RunManifest.open(cfg.run_dir)
    handler = attach_run_log(cfg.run_dir)
    progress = TqdmProgress("correct")
    manifest.start_stage("correct")
    try:
        result = correct_lora(cfg, progress)
    except BaseException as exc:
        manifest.record_interruption("correct", exc)
        raise
    finally:
        progress.close()
        detach_run_log(handler)
    manifest.finish_stage("correct", result.to_dict(), measured_peak_gib=result.peak_vram_gib)
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
    help_text = "Stage 3: correct the trained adapter for the emulator/original mismatch."
    p: argparse.ArgumentParser = sub.add_parser("correct", help=help_text, description=help_text)
    p.add_argument("run_dir", metavar="RUN_DIR", help="Run folder holding emulator/ and adapter/.")
    p.add_argument("--lambda", dest="lambda_", default="auto",
                   help="Damping λ: 'auto' (default: chosen on held-out data among 0, 0.5, 1, 3, inf), "
                        "'inf' (exact correction), or a number (0 = no correction, 3 = the paper's value).")
    p.add_argument("--data", help="Dataset whose eval split chooses λ (default: the run's dataset).")
    p.add_argument("--max-length", type=int, default=512, help="Tokens per eval sample (with --data).")
    p.add_argument("--model", help="Original model folder (default: the emulator's recorded source model).")
    p.add_argument("--device", default="auto", help="Where to compute: auto, cpu, cuda, cuda:N.")
    p.add_argument("--max-eval-batches", type=int, default=16, help="At most this many eval batches per λ.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing RUN_DIR/adapter-corrected.")
    p.set_defaults(func=run)
