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
from pathlib import Path
from typing import Any

from emloc_engine.core.progress import CancelToken

HELP = "Stage 2: LoRA fine-tuning on the emulator."


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("train", help=HELP, description=HELP)
    p.add_argument("run_dir", metavar="RUN_DIR", help="Run folder holding emulator/ (from emloc build).")
    p.add_argument("data", metavar="DATA", help="Dataset file (.jsonl/.json/.csv/.parquet/.txt) or 'demo'.")
    p.add_argument("--emulator", help="Emulator folder (default RUN_DIR/emulator).")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r.")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (scale alpha/r, or alpha/√r with --rslora).")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout.")
    p.add_argument("--rslora", action="store_true", help="Rank-stabilised LoRA (scale alpha/√r).")
    p.add_argument("--targets", nargs="+", default=[], metavar="MODULE",
                   help="Modules that get LoRA (e.g. q_proj v_proj); default: every linear layer of the blocks.")
    p.add_argument("--steps", type=int, default=100, help="Optimizer steps.")
    p.add_argument("--lr", type=float, default=2e-4, help="Peak learning rate.")
    p.add_argument("--batch-size", type=int, default=4, help="Samples per micro-batch (lower it if memory runs out).")
    p.add_argument("--grad-accum", type=int, default=1, help="Micro-batches per optimizer step.")
    p.add_argument("--warmup-steps", type=int, default=10, help="Linear warmup steps.")
    p.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine", help="LR decay.")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay.")
    p.add_argument("--max-length", type=int, default=512, help="Tokens per training sequence.")
    p.add_argument("--format", default="auto", help="Dataset format (auto, messages, sharegpt, alpaca, ...).")
    p.add_argument("--train-on", choices=("assistant", "all"), default="assistant",
                   help="Loss on assistant replies only (default) or on every token.")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="Share of samples held out for eval loss.")
    p.add_argument("--packing", action="store_true", help="Pack samples into max-length sequences.")
    p.add_argument("--eval-every", type=int, default=25, help="Eval loss every N steps (0 = at the end).")
    p.add_argument("--save-every", type=int, default=25, help="Checkpoint every N steps (0 = at the end/cancel).")
    p.add_argument("--no-grad-checkpointing", action="store_true", help="Faster, but much more activation memory.")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu.")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="Train data-parallel on N GPUs of this host: same adapter, checkpoints and resume; "
                        "the effective batch (batch-size × grad-accum) is split over them.")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32.")
    p.add_argument("--seed", type=int, default=0, help="Seed of initialisation, dropout, data order and split.")
    p.add_argument("--restart", action="store_true", help="Ignore and delete existing checkpoints; start over.")
    p.add_argument("--anchor", choices=("auto", "blocks", "linears", "none"), default="auto",
                   help="Anchor the emulator to the original at every block on the training examples (needs the "
                        "source model folder; more of the gain reaches the original); auto = when it fits RAM.")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`TrainConfig` the arguments describe (raises ``ConfigError`` on bad values)."""
    from emloc_engine.catalog.resolve import resolve_data
    from emloc_engine.data import DataConfig
    from emloc_engine.stages.training.trainer import TrainConfig

    data = DataConfig(path=resolve_data(args.data), format=args.format, max_length=args.max_length,
                      train_on=args.train_on, eval_fraction=args.eval_fraction, seed=args.seed,
                      packing=args.packing)
    return TrainConfig(
        run_dir=Path(args.run_dir), data=data, emulator_dir=Path(args.emulator) if args.emulator else None,
        rank=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=tuple(args.targets),
        use_rslora=args.rslora, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
        grad_accum=args.grad_accum, warmup_steps=args.warmup_steps, schedule=args.schedule,
        weight_decay=args.weight_decay, grad_checkpointing=not args.no_grad_checkpointing,
        eval_every=args.eval_every, save_every=args.save_every, resume=not args.restart, device=args.device,
        dtype=args.dtype, seed=args.seed, anchor=args.anchor)


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
    """The :class:`~emloc_engine.stages.training.distributed.ParallelConfig` of ``--gpus N`` (None for one GPU); checks devices."""
    from emloc_engine.stages.training.distributed import ParallelConfig, check_anchor, resolve_devices

    parallel = ParallelConfig(processes=args.gpus)
    if parallel.processes == 1:
        return None
    check_anchor(cfg, parallel)
    resolve_devices(cfg.device, parallel)
    return parallel


def run(args: argparse.Namespace) -> int:
    from emloc_engine.core.progress import TqdmProgress
    from emloc_engine.data.pipeline import fingerprint
    from emloc_engine.run.manifest import RunManifest
    from emloc_engine.run.runlog import attach_run_log, detach_run_log
    from emloc_engine.stages.training.trainer import train_lora
    from emloc_engine.weights.lowrank import read_emulator_meta

    cfg = config_from_args(args)
    parallel = _parallel_from_args(args, cfg)
    read_emulator_meta(cfg.resolved_emulator_dir)  # before the run folder is touched
    manifest = RunManifest.open(cfg.run_dir)
    handler = attach_run_log(cfg.run_dir)
    token = CancelToken()
    progress = TqdmProgress("train", cancel=token)
    manifest.start_stage("train")
    try:
        with _graceful_ctrl_c(token):
            if parallel is not None:
                from emloc_engine.stages.training.distributed import train_lora_distributed

                result = train_lora_distributed(cfg, parallel, progress)
            else:
                result = train_lora(cfg, progress)
    except BaseException as exc:
        manifest.record_interruption("train", exc)
        raise
    finally:
        progress.close()
        detach_run_log(handler)
    manifest.set_input("data", cfg.data.path, fingerprint(cfg.data))
    manifest.finish_stage("train", result.summary(), measured_peak_gib=result.peak_vram_gib)
    out = sys.stdout
    losses = [v for _, v in result.loss_history] or [math.nan]
    resumed = f" (resumed from step {result.resumed_from_step})" if result.resumed_from_step is not None else ""
    print(f"{result.steps_done} steps{resumed}; train loss {losses[0]:.4f} -> {losses[-1]:.4f}"
          + (f"; eval loss {result.final_eval_loss:.4f}" if result.final_eval_loss is not None else ""), file=out)
    print(f"{result.tokens_per_s:,.0f} tokens/s; {result.wall_s:.1f} s"
          + (f"; peak GPU {result.peak_vram_gib:.2f} GiB" if result.peak_vram_gib else ""), file=out)
    print(f"adapter: {result.adapter_dir}", file=out)
    return 0
