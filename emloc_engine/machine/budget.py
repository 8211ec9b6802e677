"""The default memory budget of a run, and the process cap ``--gpu-memory``: torch-free arithmetic.

**The budget is the GPU.** Unless the user gives ``--budget-gib``, every stage must keep to the chosen
card's *free* memory (what other programs leave) minus a margin. With ``--gpu-memory G`` (the
process's own cap, :mod:`emloc_engine.machine.memory_cap`) the room is ``min(G, free)``. The CLI
(``emloc run``, ``emloc plan``, per-stage commands) and the app's Machine, Model and Plan pages all call
:func:`default_budget_bytes`, so they cannot disagree.

The margin, ``max(0.5 GiB, 5 % of the room)``, is what a desktop needs on top of what the planner
predicts: the display server and browser grow while a run is going (0.2–0.4 GiB on a desktop GPU is
common), and the caching allocator's fragmentation after hours of training is not in the predictions.
On the CPU (no GPU) the room is the available RAM, with the same margin.
"""

from __future__ import annotations

import math
from typing import Final

GIB: Final = 1024**3
BUDGET_MARGIN_MIN_BYTES: Final = GIB // 2
"""Smallest margin left free below the room (0.5 GiB)."""
BUDGET_MARGIN_FRACTION: Final = 0.05
"""Margin as a fraction of the room (5 %), when that is more than the minimum."""


def gib_to_bytes(text: str | float, flag: str) -> int:
    """A memory size given in GiB (``--gpu-memory 24``, ``budget_gib = 20.5`` in a run file), in bytes.

    Only a plain positive number is taken: no unit (``24GB`` is refused rather than guessed at, since
    GB and GiB differ by 7 %), no ``inf`` or ``nan``.

    Args:
        text: the value as typed (or a TOML number).
        flag: the option's name, for the message (``--gpu-memory``).

    Returns:
        The size in bytes.

    Raises:
        ValueError: naming ``flag``, the value and what it takes.
    """
    try:
        gib = float(text)
    except (TypeError, ValueError):
        gib = math.nan
    if not math.isfinite(gib) or gib <= 0:
        raise ValueError(f"{flag} takes a positive number of GiB, e.g. {flag} 24 (got {text!r})")
    return int(gib * GIB)


def budget_margin_bytes(room_bytes: int) -> int:
    """``max(0.5 GiB, 5 % of room)``: what the default budget leaves free below ``room_bytes``."""
    return max(BUDGET_MARGIN_MIN_BYTES, int(BUDGET_MARGIN_FRACTION * room_bytes))


def budget_room_bytes(free_bytes: int, gpu_memory_bytes: int | None = None) -> int:
    """What this process may take of the device: its free memory, or the cap when that is lower."""
    return min(free_bytes, gpu_memory_bytes) if gpu_memory_bytes is not None else free_bytes


def default_budget_bytes(free_bytes: int, gpu_memory_bytes: int | None = None) -> int:
    """The budget when the user gives none: ``min(cap, free) − max(0.5 GiB, 5 %)`` (at least 1/4 of the room).

    Args:
        free_bytes: the chosen device's free memory (the card's, or the available RAM on the CPU).
        gpu_memory_bytes: the process cap (``--gpu-memory``), if any.

    Returns:
        The budget in bytes. On a nearly full card the margin would leave nothing; then a quarter of the
        room is kept as the budget, and the planner says what does not fit in it.
    """
    room = budget_room_bytes(free_bytes, gpu_memory_bytes)
    return max(room - budget_margin_bytes(room), room // 4)


def memory_fraction(cap_bytes: int, total_bytes: int) -> float:
    """The fraction of a card of ``total_bytes`` that ``cap_bytes`` is (for ``set_per_process_memory_fraction``).

    Clamped to (0, 1]: a cap above the card means no cap. Raises ValueError for a non-positive size.
    """
    if cap_bytes <= 0 or total_bytes <= 0:
        raise ValueError(f"cap and card sizes must be positive (got {cap_bytes}, {total_bytes})")
    return min(1.0, cap_bytes / total_bytes)
