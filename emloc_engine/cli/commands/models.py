"""``emloc models [--json] [--add DIR] [--remove DIR]``: the local model catalog.

Lists every revision in the Hugging Face cache, the folders you added, GGUF files in LM Studio and
Ollama (marked "convert": ``emloc models --convert FILE`` makes its model view: config and tokenizer from the
file's metadata, no weights; training streams them from the GGUF) and the demo model,
each with parameters, dtype, size, and what is wrong when it cannot be used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HELP = "List the models in the Hugging Face cache, added folders and LM Studio/Ollama stores."
GIB = 1024**3


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("models", help=HELP, description=HELP)
    p.add_argument("--json", action="store_true", help="Print the catalog as JSON.")
    p.add_argument("--add", metavar="DIR", action="append", default=[],
                   help="Add a folder (a model, or a folder of models) to the catalog; kept for next time.")
    p.add_argument("--remove", metavar="DIR", action="append", default=[], help="Remove an added folder.")
    p.add_argument("--convert", metavar="GGUF", action="append", default=[],
                   help="Make a GGUF file (e.g. from LM Studio or Ollama) trainable in place: a small model view "
                        "(config, tokenizer; no weights) in the app's data folder, added to the catalog. "
                        "Every stage reads the weights from the GGUF, one tensor at a time.")
    p.add_argument("--cache-dir", default=None, help="Hugging Face hub cache (default: HF_HUB_CACHE / HF_HOME).")
    p.add_argument("--no-stores", action="store_true", help="Skip LM Studio and Ollama.")
    p.set_defaults(func=run)


def _count(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else str(n)


def run(args: argparse.Namespace) -> int:
    from emloc_engine.catalog.discovery import scan_models
    from emloc_engine.catalog.model_folders import add_model_folder, remove_model_folder

    for d in args.add:
        add_model_folder(Path(d))
        print(f"Added {Path(d).expanduser().resolve()}", file=sys.stderr)
    for d in args.remove:
        removed = remove_model_folder(Path(d))
        print(f"{'Removed' if removed else 'Not in the list:'} {d}", file=sys.stderr)
    for g in args.convert:
        from emloc_engine.catalog.gguf_import import convert_for_catalog
        from emloc_engine.core.progress import TqdmProgress

        bar = TqdmProgress(f"convert {Path(g).name}")
        try:
            out = convert_for_catalog(Path(g).expanduser(), bar)
        finally:
            bar.close()
        print(f"Ready to train {g} (model view {out}; the weights stay in the GGUF)", file=sys.stderr)
    scan = scan_models(Path(args.cache_dir) if args.cache_dir else None, include_stores=not args.no_stores)
    if args.json:
        print(json.dumps({"models": [m.to_dict() for m in scan.models], "warnings": list(scan.warnings)}, indent=2))
        return 0
    if not scan.models:
        print("No models found. Download one with `hf download ORG/NAME`, add a folder with "
              "`emloc models --add DIR`, or build the demo with `emloc demo`.")
        return 0
    rows = [("name", "rev", "source", "type", "kind", "params", "dtype", "size", "status")]
    for m in scan.models:
        status = "convert" if m.needs_conversion and m.supported else "ok" if m.supported else "NO"
        rows.append((m.name, (m.revision or "")[:8], m.source, m.model_type or "?", m.kind, _count(m.num_parameters),
                     m.dtype or "?", f"{m.size_on_disk_bytes / GIB:.2f} GiB", status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("  ".join(c.ljust(w) for c, w in zip(rows[0], widths)).rstrip())
    for r, info in zip(rows[1:], scan.models):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if info.problem:
            print(f"    ↳ {info.problem}")
    for w in scan.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0
