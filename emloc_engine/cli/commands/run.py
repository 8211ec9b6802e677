"""``emloc run MODEL DATA --out RUN_DIR``: every stage, end to end, resumable from the manifest."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a whole run (also reused by the app's "show command" view)."""
    p.add_argument("model", nargs="?", help="Model folder, HF cache repo id (org/name), GGUF file or 'demo'.")
    p.add_argument("data", nargs="?", help="Dataset file (.jsonl/.json/.csv/.parquet/.txt) or 'demo'.")
    p.add_argument("--out", help="Run folder (created; an interrupted run resumes).")
    p.add_argument("--config", type=Path, metavar="RUN.toml",
                   help="Read settings from a TOML file whose keys are these options' long names "
                        "(model, data, out, ratio, allocation, rank, lambda, export = [\"merged\", \"adapter\"], …); "
                        "options given on the command line win.")
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
    p.add_argument("--allocation", choices=("uniform", "spectral"), default="uniform",
                   help="Emulator ranks per module: uniform, or spectral (the same parameter budget spent where "
                        "the whitened spectra say it removes the most error; better at ρ ≥ 0.4, worse at 0.25).")
    p.add_argument("--max-length", type=int, default=512, help="Tokens per sample (longer ones are truncated).")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="Where to compute.")
    p.add_argument("--export", default="merged,adapter,gguf",
                   help="Comma-separated exports: merged, adapter, gguf (empty for none).")
    p.add_argument("--batch-size", type=int, default=4, help="Sequences per optimizer step.")
    p.add_argument("--gguf-type", default="f16", choices=("f16", "bf16", "q8_0", "f32"), help="GGUF tensor type.")
    p.add_argument("--seed", type=int, default=0, help="Seed for the split, sampling and initialisation.")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="Train data-parallel on N GPUs of this machine (N CPU processes with --device cpu).")
    p.add_argument("--anchor", choices=("auto", "blocks", "linears", "none"), default="auto",
                   help="Anchor the emulator to the original at every block while training (more of the gain "
                        "reaches the original); auto = when its offsets fit a quarter of the free RAM, one GPU.")


def register(sub: Any) -> None:
    help_text = "Run every stage: build the emulator, train, correct, export."
    p: argparse.ArgumentParser = sub.add_parser("run", help=help_text, description=help_text)
    add_run_arguments(p)
    p.set_defaults(func=run)


def _defaults() -> dict[str, Any]:
    probe = argparse.ArgumentParser(add_help=False)
    add_run_arguments(probe)
    return {a.dest: a.default for a in probe._actions}


def apply_config_file(args: argparse.Namespace) -> argparse.Namespace:
    """Fill options the command line left at their defaults from ``--config RUN.toml``.

    Raises:
        ConfigError: unreadable TOML, unknown keys (all listed), or model/data/out given nowhere.
    """
    from emloc_engine.core.errors import ConfigError

    if args.config is not None:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            values = tomllib.loads(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"Cannot read {args.config}: {exc}") from exc
        defaults = _defaults()
        unknown = []
        for key, value in values.items():
            dest = {"lambda": "lambda_", "exports": "export"}.get(key, key.replace("-", "_"))
            if dest not in defaults or dest == "config":
                unknown.append(f"{args.config}: unknown key {key!r}")
                continue
            if dest == "export" and isinstance(value, list):
                value = ",".join(str(v) for v in value)
            if getattr(args, dest) == defaults[dest]:
                setattr(args, dest, value)
        if unknown:
            raise ConfigError("The run file has keys emloc run does not know.", problems=unknown,
                              hint="Use the long option names of `emloc run --help` (with - or _).")
    missing = [name for name in ("model", "data", "out") if not getattr(args, name)]
    if missing:
        raise ConfigError(f"emloc run needs {', '.join(missing)}.",
                          hint="Give them on the command line (MODEL DATA --out RUN_DIR) or in --config RUN.toml.")
    return args


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~emloc_engine.run.orchestrator.RunConfig` that the options (and ``--config``) describe."""
    from emloc_engine.catalog.resolve import resolve_data, resolve_model
    from emloc_engine.run.orchestrator import RunConfig, parse_lambda

    args = apply_config_file(args)

    exports = tuple(e.strip() for e in args.export.split(",") if e.strip())
    return RunConfig(
        model_dir=resolve_model(args.model), data_path=resolve_data(args.data), run_dir=Path(args.out),
        ratio=args.ratio, budget_bytes=int(args.budget_gib * 2**30) if args.budget_gib else None,
        rank=args.rank, alpha=args.alpha, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
        lambda_=parse_lambda(args.lambda_), calib=args.calib, allocation=args.allocation,
        max_length=args.max_length, device=args.device,
        exports=exports, gguf_type=args.gguf_type, seed=args.seed, gpus=args.gpus,
        anchor=args.anchor)


def run(args: argparse.Namespace) -> int:
    from emloc_engine.core.progress import TqdmProgress
    from emloc_engine.run.orchestrator import run_pipeline

    cfg = config_from_args(args)
    bar = TqdmProgress("emloc run")
    try:
        result = run_pipeline(cfg, bar)
    finally:
        bar.close()
    print(f"Run folder: {result.run_dir}")
    print(f"ρ = {result.ratio:.3f}; λ = {result.lambda_}; final eval loss = {result.final_eval_loss}")
    print(f"Stages run: {', '.join(result.stages_run) or 'none'}; resumed past: {', '.join(result.stages_skipped) or 'none'}")
    for name, path in result.exports.items():
        print(f"  {name}: {path}")
    for note in result.notes:
        print(f"Note: {note}")
    return 0
