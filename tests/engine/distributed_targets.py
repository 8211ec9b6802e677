"""Worker bodies for the supervisor tests of :mod:`emloc_engine.stages.training.distributed`.

They live in their own small module because each spawned worker imports the module of its
target by name: this one imports only torch and the engine's light modules.
"""

from __future__ import annotations

import os
import time

import torch

from emloc_engine.core.errors import ConfigError
from emloc_engine.stages.training.distributed import Collectives


def fail_on_rank_1(comm: Collectives, how: str) -> None:
    """Rank 1 fails (``how``: engine | bug | die); rank 0 waits for it in a collective forever."""
    comm.all_reduce_([torch.zeros(1)])  # both ranks joined the group
    if comm.rank == 1:
        if how == "engine":
            raise ConfigError("Rank one cannot go on.", problems=["first problem"], hint="Change the setting.")
        if how == "bug":
            raise ValueError("an unexpected bug")
        os._exit(3)
    while True:
        comm.all_reduce_([torch.zeros(1)])


def until_cancelled(comm: Collectives, payload: None) -> int:
    """Report a step, then agree on cancel, until the caller cancels; never returns normally."""
    progress = comm.progress()
    step = 0
    while step < 10_000:
        step += 1
        progress.update(min(1.0, step / 100), f"step {step}")
        progress.check_cancelled()
        time.sleep(0.01)
    return step
