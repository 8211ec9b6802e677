"""``emloc export RUN_DIR``: merge the (corrected) adapter into the original model and export it.

Writes ``RUN_DIR/merged/`` (Hugging Face folder), the portable adapter (``RUN_DIR/adapter-corrected/``
with a model card) and ``RUN_DIR/model.gguf``, verifies each against original + adapter and records
the stage in ``RUN_DIR/manifest.json``. The original model defaults to the one the run recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from emloc_engine.catalog.resolve import resolve_model
from emloc_engine.core.errors import ConfigError


def parse_formats(text: str) -> tuple[str, ...]:
    """``"merged,gguf"`` -> ``("merged", "gguf")`` (validated by :class:`ExportConfig`)."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _recorded_model(run_dir: Path) -> Path:
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
        path = manifest["inputs"]["model"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{run_dir} records no original model.", hint="Pass it with --model MODEL_DIR.") from None
    return Path(path)


def run(args: argparse.Namespace) -> int:
    from emloc_engine.core.progress import TqdmProgress
    from emloc_engine.run.manifest import RunManifest
    from emloc_engine.run.runlog import attach_run_log, detach_run_log
    from emloc_engine.stages.export.exporter import ExportConfig, export_summary, merge_and_export

    run_dir = Path(args.run_dir)
    model = resolve_model(args.model) if args.model else _recorded_model(run_dir)
    cfg = ExportConfig(run_dir=run_dir, model_dir=model, adapter_dir=Path(args.adapter) if args.adapter else None,
                       formats=parse_formats(args.formats), gguf_type=args.gguf_type, overwrite=args.overwrite,
                       verify=not args.no_verify, device=args.device)
    manifest = RunManifest.open(run_dir)
    handler = attach_run_log(run_dir)
    progress = TqdmProgress("export")
    manifest.start_stage("export")
    try:
        result = merge_and_export(cfg, progress)
    except BaseException as exc:
        manifest.record_interruption("export", exc)
        raise
    finally:
        progress.close()
        detach_run_log(handler)
    summary = result.to_dict()
    paths = {k: summary[k] for k in ("merged_dir", "adapter_dir", "gguf_path") if summary[k]}
    manifest.finish_stage("export", {**summary, "paths": paths})
    print(export_summary(result), file=sys.stdout)
    return 0


def register(sub: Any) -> None:
    from emloc_engine.stages.export.exporter import EXPORT_FORMATS
    from emloc_engine.stages.export.gguf_export import GGUF_TYPES

    text = "Merge into the original model and write the merged folder, the adapter and GGUF."
    p: argparse.ArgumentParser = sub.add_parser("export", help=text, description=text)
    p.add_argument("run_dir", metavar="RUN_DIR", help="The run folder (exports are written inside it).")
    p.add_argument("--model", metavar="MODEL", help="Original model folder (default: the one the run recorded).")
    p.add_argument("--adapter", metavar="DIR",
                   help="Adapter to merge (default: RUN_DIR/adapter-corrected, else RUN_DIR/adapter).")
    p.add_argument("--formats", default=",".join(EXPORT_FORMATS),
                   help=f"Comma-separated exports among {', '.join(EXPORT_FORMATS)} (default: all).")
    p.add_argument("--gguf-type", default="f16", choices=GGUF_TYPES, help="GGUF weight type (default f16).")
    p.add_argument("--overwrite", action="store_true", help="Replace exports that already exist.")
    p.add_argument("--no-verify", action="store_true",
                   help="Skip loading each export back and comparing logits (saves RAM and time).")
    p.add_argument("--device", default="cpu", help="Device for verification: cpu, cuda or auto.")
    p.set_defaults(func=run)
