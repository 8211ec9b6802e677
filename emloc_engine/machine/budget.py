"""The memory budget a run gets when the user names none: what is free now, less a margin for the rest.

One function for the CLI and the app, so the Machine page's default and ``emloc run``'s agree.
"""

from __future__ import annotations

FREE_MARGIN_FRACTION = 0.05
"""Part of the device's total memory left to other programs (a browser, the desktop, a notebook) that
may grow while the run goes on; 5% of a 24 GiB card is 1.2 GiB."""
MIN_BUDGET_BYTES = 256 * 2**20
"""The smallest default budget (256 MiB): a nearly full device still gets a budget the planner can refuse
with a message, rather than zero."""


def default_budget_bytes(free: int, total: int) -> int:
    """The default budget of a device: its free memory less a margin, never more than the free memory.

    Args:
        free: bytes free on the device now (for the CPU: available RAM).
        total: bytes the device has (for the CPU: total RAM); the margin is a share of it.

    Returns:
        ``free − FREE_MARGIN_FRACTION × total``, at least :data:`MIN_BUDGET_BYTES` (and at most ``free``
        when that is smaller still).
    """
    free = max(0, min(free, total) if total > 0 else free)
    return max(free - int(FREE_MARGIN_FRACTION * max(total, 0)), min(MIN_BUDGET_BYTES, free), 1)
