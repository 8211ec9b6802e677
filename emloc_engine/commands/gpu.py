"""``emloc gpu``: Show the GPUs, memory and CPU this machine has (NVML, torch.cuda, psutil)."""

from __future__ import annotations

from typing import Any

from emloc_engine.commands._common import add_placeholder


def register(sub: Any) -> None:
    add_placeholder(sub, "gpu", "Show the GPUs, memory and CPU this machine has (NVML, torch.cuda, psutil).", "hardware detection")
