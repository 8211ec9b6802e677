"""``emloc gpu [--json]``: the GPUs (NVML, else torch), their memory and processes, CPU cores and RAM."""

from __future__ import annotations

import argparse
import json
from typing import Any

HELP = "Show the GPUs, memory and CPU this machine has (NVML, torch.cuda, psutil)."


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("gpu", help=HELP, description=HELP)
    p.add_argument("--json", action="store_true", help="Print the machine description as JSON.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emloc_engine.machine.hardware import describe_machine, detect_machine

    machine = detect_machine()
    if args.json:
        print(json.dumps(machine.to_dict(), indent=2))
    else:
        print(describe_machine(machine))
    return 0
