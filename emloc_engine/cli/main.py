"""``emloc``: every stage of EMLoC Studio, headless.

Each subcommand lives in ``emloc_engine/cli/commands/<name>.py`` with ``register(subparsers)``; the
command functions call the same stage functions the app calls. Engine errors (a full disk included)
print their message and exit 2; a cancel (Ctrl-C) exits 130 and leaves the run resumable.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from emloc_engine.core.atomic import as_disk_full
from emloc_engine.core.errors import Cancelled, EngineError
from emloc_engine.core.version import __version__

COMMANDS = ("gpu", "models", "plan", "data", "build", "train", "correct", "export", "run", "vlm", "image",
            "image-export", "demo")


def version_text() -> str:
    """``emloc --version``: our version plus the torch, CUDA and GPU it sees."""
    parts = [f"emloc {__version__}"]
    try:
        import torch

        cuda = torch.version.cuda or "none"
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU"
        parts.append(f"torch {torch.__version__} (CUDA {cuda}; {gpu})")
    except Exception as exc:  # pragma: no cover - torch is a dependency
        parts.append(f"torch unavailable: {exc}")
    return ", ".join(parts)


def _quiet_libraries(verbose: bool) -> None:
    """Our own bar is the progress; hide the libraries' per-load bars unless --verbose."""
    if verbose:
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover - transformers is a dependency
        pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistyped option gets the one line that says what is wrong and where the options are
    listed, not the whole usage (``emloc run``'s is some 35 lines, with the error below it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nAll options: {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="emloc",
        description="EMLoC Studio: fine-tune the model you already run, on the GPU you already have.",
    )
    parser.add_argument("--version", action="version", version=version_text())
    parser.add_argument("-v", "--verbose", action="store_true", help="Log at DEBUG level to stderr.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"emloc_engine.cli.commands.{name.replace('-', '_')}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Offline first: never probe the Hub for files that are (or are not) on disk.
    # HF_HUB_OFFLINE=0 in the environment allows downloads again.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    level = logging.DEBUG if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # the run log (a file) gets INFO; the terminal does not
        handler.setLevel(level)
    _quiet_libraries(args.verbose)
    try:
        code: int = args.func(args)
        return code
    except Cancelled:
        print("Cancelled. The run folder is resumable: run the same command again.", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("Interrupted. The run folder is resumable: run the same command again.", file=sys.stderr)
        return 130
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:  # a full disk outside the engine's atomic writers
        filename = getattr(exc, "filename", None)
        full = as_disk_full(exc, Path(filename).parent if filename else Path.cwd())
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
