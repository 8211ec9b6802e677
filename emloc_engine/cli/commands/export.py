"""``emloc export RUN_DIR``: merge the (corrected) adapter into the original model and export it.

Writes ``RUN_DIR/merged/`` (Hugging Face folder), the portable adapter (``RUN_DIR/adapter-corrected/``
with a model card) and ``RUN_DIR/model.gguf``, verifies each against original + adapter and records
the stage in ``RUN_DIR/manifest.json``. The original model defaults to the one the run recorded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from emloc_engine.catalog.resolve import resolve_model
from emloc_engine.core.errors import ConfigError


def _recorded_model(run_dir: Path, recorded: Any) -> Path:
    from emloc_engine.run.manifest import read_manifest

    if recorded is not None:
        return Path(recorded.model_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"There is no run folder at {run_dir}, so there is nothing to export.",
                          hint="Give the folder `emloc run --out` wrote (it holds manifest.json), or export an "
                               "adapter of your own with --model MODEL --adapter DIR.")
    manifest = read_manifest(run_dir) if run_dir.is_dir() else None
    if manifest is not None and "model" in manifest.inputs:
        return Path(manifest.inputs["model"].path)
    raise ConfigError(f"{run_dir} records no original model.", hint="Pass it with --model MODEL_DIR.")


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`ExportConfig` of the options, on top of the run's recorded settings."""
    from emloc_engine.run.manifest import read_manifest
    from emloc_engine.run.options import apply_values, top_value, typed_values
    from emloc_engine.run.plan import options_of, recorded_memory
    from emloc_engine.stages.export.exporter import ExportConfig
    from emloc_engine.stages.export.options import ExportOptions

    values = typed_values(args)
    run_dir = Path(args.run_dir)
    manifest = read_manifest(run_dir) if run_dir.is_dir() else None
    recorded = manifest.config if manifest is not None else None
    model = resolve_model(args.model) if args.model else _recorded_model(run_dir, recorded)
    options = apply_values(recorded.export if recorded is not None else ExportOptions(), "export", values)
    device = str(top_value(values, "device", recorded.device if recorded is not None else "cpu"))
    budget, stream = recorded_memory(manifest.plan if manifest is not None else None)
    return ExportConfig(**options_of(options), run_dir=run_dir, model_dir=model,
                        adapter_dir=Path(args.adapter) if args.adapter else None, overwrite=args.overwrite,
                        device=device, memory_budget_bytes=budget if device != "cpu" else None,
                        stream_original=stream)


def run(args: argparse.Namespace) -> int:
    from emloc_engine.core.progress import TqdmProgress
    from emloc_engine.run.orchestrator import export_in_run
    from emloc_engine.stages.export.exporter import export_summary

    cfg = config_from_args(args)
    progress = TqdmProgress("export")
    try:
        result = export_in_run(cfg, progress)
    finally:
        progress.close()
    print(export_summary(result), file=sys.stdout)
    return 0


def register(sub: Any) -> None:
    from emloc_engine.run.options import add_options

    text = "Merge into the original model and write the merged folder, the adapter and GGUF."
    p: argparse.ArgumentParser = sub.add_parser("export", help=text, description=text)
    p.add_argument("run_dir", metavar="RUN_DIR", help="The run folder (exports are written inside it).")
    p.add_argument("--model", metavar="MODEL", help="Original model folder (default: the one the run recorded).")
    p.add_argument("--adapter", metavar="DIR",
                   help="Adapter to merge (default: RUN_DIR/adapter-corrected, else RUN_DIR/adapter).")
    p.add_argument("--overwrite", action="store_true", help="Replace exports that already exist.")
    add_options(p, ("export",), include=("device",), aliases={"export.formats": "--formats"})
    p.set_defaults(func=run)
