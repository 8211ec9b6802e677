"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def not_implemented(name: str, issue: str) -> Any:
    """A command body for a subcommand whose stage has not landed yet: says so, exits 2."""

    def run(args: argparse.Namespace) -> int:
        print(f"emloc {name}: not implemented yet ({issue}).", file=sys.stderr)
        return 2

    return run


def add_placeholder(sub: Any, name: str, help_text: str, issue: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(func=not_implemented(name, issue))
    return p
