"""``emloc``: the command line. ``main`` parses the options and calls the run orchestrator or a catalog command."""

from emloc_engine.cli.main import main

__all__ = ["main"]
