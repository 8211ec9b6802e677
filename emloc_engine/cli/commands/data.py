"""``emloc data DATA [--model MODEL]``: validate a dataset and preview rendered samples, before any model loads.

Only the model's tokenizer is loaded (never weights). Without ``--model`` the structure is checked and
lengths are given in characters. Exit status: 0 when the data can be used (warnings allowed), 2 when
there is a fatal problem.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from emloc_engine.data import FORMATS, DataConfig, DataReport, inspect_dataset, load_tokenizer
from emloc_engine.data.config import DATA_DEFAULTS, TRAIN_ON, parse_column_map

HELP = "Validate a dataset and preview rendered samples, before any model is loaded."
WARNINGS_SHOWN_PER_KIND = 20
PREVIEW_CHARS = 600


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The options that describe a dataset (shared with ``emloc train``/``emloc run`` if they want them)."""
    d = DATA_DEFAULTS
    p.add_argument("--format", default=d.format, choices=("auto", *FORMATS),
                   help="Record format (default: detected from the first record).")
    p.add_argument("--map", dest="column_map", action="append", default=[], metavar="FIELD=COLUMN",
                   help="Read FIELD (messages, conversations, instruction, input, output, system, prompt, "
                        "completion, text) from COLUMN; repeat for several.")
    p.add_argument("--max-length", type=int, default=d.max_length, help="Tokens per sample (longer ones are truncated).")
    p.add_argument("--train-on", choices=TRAIN_ON, default=d.train_on,
                   help="Loss on assistant replies / completions only (default) or on every token.")
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction, help="Share of samples held out for eval.")
    p.add_argument("--packing", action="store_true", help="Pack several samples per sequence.")
    p.add_argument("--max-samples", type=int, default=d.max_samples, help="Read at most this many samples.")
    p.add_argument("--seed", type=int, default=d.seed, help="Seed of the train/eval split.")


def data_config_from_args(path: str, args: argparse.Namespace) -> DataConfig:
    """A :class:`DataConfig` from the options of :func:`add_data_arguments`."""
    return DataConfig(path=Path(path), format=args.format, column_map=parse_column_map(args.column_map),
                      max_length=args.max_length, train_on=args.train_on, eval_fraction=args.eval_fraction,
                      seed=args.seed, packing=args.packing, max_samples=args.max_samples)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("data", help=HELP, description=HELP)
    p.add_argument("data", help="Dataset file (.jsonl, .json, .csv, .tsv, .parquet, .txt), a datasets folder "
                   "(save_to_disk) or Parquet/Arrow folder, a dataset in the local cache (org/name), or 'demo'.")
    p.add_argument("--model", help="Model folder or cached repo id: its tokenizer and chat template are used "
                                   "(no weights are loaded).")
    add_data_arguments(p)
    p.add_argument("--json", action="store_true", help="Print the report as JSON.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    data_path = args.data
    if data_path == "demo":
        from emloc_engine.catalog.resolve import resolve_data

        data_path = str(resolve_data("demo"))
    cfg = data_config_from_args(data_path, args)
    model = args.model
    if model == "demo":
        from emloc_engine.catalog.resolve import resolve_model

        model = str(resolve_model("demo"))
    from emloc_engine.data.images import is_image_dataset

    if is_image_dataset(cfg):  # conversations with images: checked with the model's processor
        from emloc_engine.catalog.resolve import resolve_model
        from emloc_engine.data.vision_pipeline import inspect_vision_dataset
        from emloc_engine.vision.processor import load_processor

        report = inspect_vision_dataset(cfg, load_processor(resolve_model(model)) if model else None)
    else:
        report = inspect_dataset(cfg, load_tokenizer(model) if model else None)
    if args.json:
        print(json.dumps(report_to_dict(report), indent=2, ensure_ascii=False))
    else:
        print_report(report, sys.stdout)
    return 0 if report.ok else 2


def report_to_dict(report: DataReport) -> dict[str, Any]:
    """The report as plain JSON-able data (problems with their ``where`` text)."""
    out = dataclasses.asdict(report)
    out["ok"] = report.ok
    out["problems"] = [dict(dataclasses.asdict(p), where=p.where()) for p in report.problems]
    return out


def _stats_line(report: DataReport) -> str:
    stats = report.token_stats or report.char_stats
    if stats is None:
        return "lengths: -"
    return (f"{stats.unit}: min {stats.min}, mean {stats.mean:.1f}, p95 {stats.p95}, max {stats.max}")


def print_report(report: DataReport, out: Any) -> None:
    """Human-readable report: summary, lengths, previews, then every problem (``file:line: ...``).

    Fatal problems are all printed; warnings of one kind beyond :data:`WARNINGS_SHOWN_PER_KIND` are
    counted (``--json`` lists them all).
    """
    w = out.write
    w(f"{report.path}\n")
    w(f"  format: {report.format}   tokenizer: {report.tokenizer or 'none (structure only; pass --model)'}\n")
    w(f"  records: {report.n_records}   samples: {report.n_samples}   train: {report.n_train}   "
      f"eval: {report.n_eval}\n")
    w(f"  {_stats_line(report)}\n")
    if report.tokenizer:
        w(f"  truncated: {report.n_truncated}   without label: {report.n_no_labels}   "
          f"trainable tokens: {report.n_label_tokens}\n")
    w(f"  fingerprint: {report.fingerprint}\n")
    for i, text in enumerate(report.rendered_examples):
        w(f"\n--- example {i + 1} ---\n{_clip(text)}\n")
        if i < len(report.rendered_labels):
            w(f"--- trained on ---\n{_clip(report.rendered_labels[i])}\n")
    if report.problems:
        w(f"\nproblems ({len(report.fatal_problems)} errors, {len(report.warnings)} warnings):\n")
    shown: dict[str, int] = defaultdict(int)
    for p in report.problems:
        if not p.fatal:
            shown[p.code] += 1
            if shown[p.code] > WARNINGS_SHOWN_PER_KIND:
                continue
        w(f"{p}\n")
    for code, count in shown.items():
        if count > WARNINGS_SHOWN_PER_KIND:
            w(f"... and {count - WARNINGS_SHOWN_PER_KIND} more '{code}' warnings (--json lists them all)\n")
    w("\nOK: the data can be used.\n" if report.ok else
      f"\nNot usable: {len(report.fatal_problems)} error(s) above; fix them and run `emloc data` again.\n")


def _clip(text: str) -> str:
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + f" [... {len(text) - PREVIEW_CHARS} more chars]"
