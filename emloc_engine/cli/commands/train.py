"""``emloc train RUN_DIR DATA``: Stage 2, LoRA fine-tuning on the emulator in ``RUN_DIR/emulator``.

Writes ``RUN_DIR/adapter/`` (a peft adapter for the ORIGINAL model) and checkpoints under
``RUN_DIR/checkpoints/``. Ctrl-C stops at the end of the current step and writes a checkpoint (a
second Ctrl-C aborts at once). Running the same command again after a crash or Ctrl-C resumes
from the newest checkpoint; ``--restart`` starts over.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from emloc_engine.core.progress import CancelToken, Progress

HELP = "Stage 2: LoRA fine-tuning on the emulator."


def register(sub: Any) -> None:
    from emloc_engine.run.options import add_options

    p: argparse.ArgumentParser = sub.add_parser("train", help=HELP, description=HELP)
    p.add_argument("run_dir", metavar="RUN_DIR", help="Run folder holding emulator/ (from emloc build).")
    p.add_argument("data", metavar="DATA", help="Dataset file (.jsonl/.json/.csv/.parquet/.txt) or 'demo'.")
    p.add_argument("--emulator", help="Emulator folder (default RUN_DIR/emulator).")
    p.add_argument("--restart", action="store_true", help="Ignore and delete existing checkpoints; start over.")
    add_options(p, ("train", "data"), include=("device", "gpus", "seed"))
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace, recorded: Any = None) -> Any:
    """The :class:`TrainConfig` the arguments describe, on top of the run's recorded settings (if any).

    Raises:
        ConfigError: bad values (all listed).
    """
    from emloc_engine.catalog.resolve import resolve_data
    from emloc_engine.data import DataConfig
    from emloc_engine.run.options import apply_values, top_value, typed_values
    from emloc_engine.run.plan import options_of
    from emloc_engine.stages.training.options import TrainOptions
    from emloc_engine.stages.training.trainer import TrainConfig

    values = typed_values(args)
    seed = int(top_value(values, "seed", recorded.seed if recorded else 0))
    data_base = recorded.data if recorded else DataConfig(path=Path("."))
    data = apply_values(replace(data_base, path=resolve_data(args.data), seed=seed), "data", values)
    options = apply_values(recorded.train if recorded else TrainOptions(), "train", values)
    return TrainConfig(**options_of(options), run_dir=Path(args.run_dir), data=data,
                       emulator_dir=Path(args.emulator) if args.emulator else None, resume=not args.restart,
                       device=str(top_value(values, "device", recorded.device if recorded else "auto")), seed=seed)


@contextlib.contextmanager
def _graceful_ctrl_c(token: CancelToken) -> Iterator[None]:
    """First Ctrl-C: stop at the end of the current step and write a checkpoint. Second: abort now."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum: int, frame: Any) -> None:
        if token.cancelled:
            raise KeyboardInterrupt
        token.cancel()
        print("\nStopping after this step and saving a checkpoint (Ctrl-C again to abort now).", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _parallel_from_args(args: argparse.Namespace, cfg: Any) -> Any:
    """The :class:`~emloc_engine.stages.training.distributed.ParallelConfig` of ``--gpus N`` (None for one GPU)."""
    from emloc_engine.run.options import top_value, typed_values
    from emloc_engine.stages.training.distributed import ParallelConfig, resolve_devices

    parallel = ParallelConfig(processes=int(top_value(typed_values(args), "gpus", 1)))
    if parallel.processes == 1:
        return None
    resolve_devices(cfg.device, parallel)
    return parallel


def run(args: argparse.Namespace) -> int:
    from emloc_engine.core.progress import TqdmProgress
    from emloc_engine.data.pipeline import fingerprint
    from emloc_engine.run.manifest import read_manifest
    from emloc_engine.run.orchestrator import open_run, run_stage
    from emloc_engine.weights.lowrank import read_emulator_meta

    manifest = read_manifest(Path(args.run_dir)) if Path(args.run_dir).is_dir() else None
    recorded = manifest.config if manifest is not None else None
    cfg = config_from_args(args, recorded)
    parallel = _parallel_from_args(args, cfg)
    read_emulator_meta(cfg.resolved_emulator_dir)  # before the run folder is touched
    token = CancelToken()
    progress = TqdmProgress("train", cancel=token)

    def work(progress: Progress) -> Any:
        with _graceful_ctrl_c(token):
            if parallel is not None:
                from emloc_engine.stages.training.distributed import train_lora_distributed

                return train_lora_distributed(cfg, parallel, progress)
            from emloc_engine.stages.training.trainer import train_lora

            return train_lora(cfg, progress)

    try:
        with open_run(cfg.run_dir) as session:
            if session.manifest.config is not None:  # the folder's settings now say what this adapter was made with
                session.manifest.config = replace(session.manifest.config, data=cfg.data,
                                                  train=_options(cfg), seed=cfg.seed)
            recording = session.recording("train", progress)
            result = run_stage(session, "train", lambda: work(recording))
            session.record_input("data", cfg.data.path, fingerprint(cfg.data))
    finally:
        progress.close()
    out = sys.stdout
    losses = [v for _, v in result.loss_history] or [math.nan]
    resumed = f" (resumed from step {result.resumed_from_step})" if result.resumed_from_step is not None else ""
    print(f"{result.steps_done} steps{resumed}; train loss {losses[0]:.4f} -> {losses[-1]:.4f}"
          + (f"; eval loss {result.final_eval_loss:.4f}" if result.final_eval_loss is not None else ""), file=out)
    print(f"{result.tokens_per_s:,.0f} tokens/s; {result.wall_s:.1f} s"
          + (f"; peak GPU {result.peak_vram_gib:.2f} GiB" if result.peak_vram_gib else ""), file=out)
    print(f"adapter: {result.adapter_dir}", file=out)
    return 0


def _options(cfg: Any) -> Any:
    from emloc_engine.stages.training.options import TrainOptions

    return TrainOptions(**{f: getattr(cfg, f) for f in TrainOptions.__dataclass_fields__})
