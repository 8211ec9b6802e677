"""``emloc run MODEL DATA --out RUN_DIR``: every stage, end to end, resumable; the options come from RunConfig."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from emloc_engine.run.config import STAGES


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a whole run: generated from :class:`~emloc_engine.run.config.RunConfig`'s fields."""
    from emloc_engine.run.options import add_options, add_preset_option

    p.add_argument("model", nargs="?", help="Model folder, HF cache repo id (org/name), GGUF file or 'demo'.")
    p.add_argument("data", nargs="?", help="Dataset file (.jsonl/.json/.csv/.parquet/.txt) or 'demo'.")
    p.add_argument("--out", help="Run folder (created; an interrupted run resumes).")
    p.add_argument("--config", type=Path, metavar="RUN.toml",
                   help="Read settings from a TOML file whose keys are these options' long names "
                        "(model, data, out, ratio, rank, lambda, export = [\"merged\", \"adapter\"], …); "
                        "options given on the command line win.")
    p.add_argument("--redo-from", choices=STAGES, metavar="STAGE",
                   help="Redo this stage and every later one in an existing run folder (needed to change "
                        "settings of a folder whose stages already ran): " + ", ".join(STAGES) + ".")
    add_preset_option(p)
    add_options(p)


def register(sub: Any) -> None:
    help_text = "Run every stage: build the emulator, train, correct, export."
    p: argparse.ArgumentParser = sub.add_parser("run", help=help_text, description=help_text)
    add_run_arguments(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~emloc_engine.run.config.RunConfig` the options (and ``--config RUN.toml``) describe.

    Order: field defaults < the preset (``--preset``, else the TOML file's ``preset``) < the TOML file
    < what was typed on the command line.
    """
    from emloc_engine.catalog.resolve import resolve_data, resolve_model
    from emloc_engine.run.options import build_config, toml_values, typed_values, with_preset

    values: dict[str, Any] = toml_values(args.config) if args.config is not None else {}
    model, data, out = (args.model or values.pop("model", None), args.data or values.pop("data", None),
                        args.out or values.pop("out", None))
    preset = getattr(args, "preset", None) or values.pop("preset", None)
    for key in ("model", "data", "out", "preset"):
        values.pop(key, None)
    values.update(typed_values(args))
    values = with_preset(values, preset)
    return build_config(None, values, model_dir=resolve_model(model) if model else None,
                        data_path=resolve_data(data) if data else None, run_dir=Path(out) if out else None)


def ollama_hint(run_dir: Path) -> str | None:
    """The ``ollama create`` line the export recorded (printed, never run), or how to get it."""
    from emloc_engine.run.manifest import read_manifest
    from emloc_engine.stages.export.modelfile import command_text

    m = read_manifest(Path(run_dir))
    rec = m.stage("export") if m is not None else None
    if rec is None or not rec.done:
        return None
    cmd, modelfile = rec.result.get("ollama_command"), rec.result.get("modelfile_path")
    if cmd:
        return f"Add it to Ollama: {command_text(tuple(cmd))}"
    if modelfile:
        return f"Ollama was not found on PATH; once it is installed: ollama create NAME -f {modelfile}"
    return None


def plan_summary(plan: Any) -> str:
    """One line before the run starts: ρ, the budget and where it came from, the original's place, time and RAM."""
    from emloc_engine.core.progress import format_seconds

    memory = plan.memory
    where = "streamed block by block (it does not fit the budget)" if plan.stream_original else "loaded whole"
    return (f"Plan: ρ = {plan.ratio:.2f} within a budget of {memory.budget_bytes / 2**30:.2f} GiB "
            f"({plan.budget_note}); the original is {where}; about {format_seconds(memory.total_seconds)}, "
            f"RAM up to {memory.ram_bytes / 2**30:.1f} GiB.")


def run(args: argparse.Namespace) -> int:
    from emloc_engine.core.progress import TqdmProgress
    from emloc_engine.run.orchestrator import run_stages
    from emloc_engine.run.plan import plan_run

    cfg = config_from_args(args)
    plan = plan_run(cfg)
    print(plan_summary(plan), file=sys.stderr)
    early = [n for n in plan.notes if n.startswith(("--gpu-memory", "Budget"))]  # about a setting: before the wait
    for note in early:
        print(f"Note: {note}", file=sys.stderr)
    bar = TqdmProgress("emloc run")
    try:
        result = run_stages(plan, bar, redo_from=args.redo_from)
    finally:
        bar.close()
    print(f"Run folder: {result.run_dir}")
    print(f"ρ = {result.ratio:.3f}; λ = {result.lambda_}; final eval loss = {result.final_eval_loss}")
    print(f"Stages run: {', '.join(result.stages_run) or 'none'}; resumed past: {', '.join(result.stages_skipped) or 'none'}")
    for name, path in result.exports.items():
        print(f"  {name}: {path}")
    hint = ollama_hint(result.run_dir)
    if hint:
        print(hint)
    for note in result.notes:
        if note not in early:
            print(f"Note: {note}")
    return 0
