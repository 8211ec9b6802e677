"""``emloc vlm MODEL DATA --out RUN``: kept as another name of ``emloc run`` (same options, same orchestrator).

``emloc run`` recognises a vision-language model by itself; this name stays so that scripts written
for it keep working.
"""

from __future__ import annotations

import argparse
from typing import Any

HELP = "Same as `emloc run` (which detects vision-language models by itself); kept for older scripts."


def register(sub: Any) -> None:
    from emloc_engine.cli.commands import run

    p: argparse.ArgumentParser = sub.add_parser("vlm", help=HELP, description=HELP)
    run.add_run_arguments(p)
    p.set_defaults(func=run.run)
