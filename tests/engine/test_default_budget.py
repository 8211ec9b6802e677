"""The default memory budget: free memory less a margin, never the whole device."""

from __future__ import annotations

from emloc_engine.machine.budget import FREE_MARGIN_FRACTION, MIN_BUDGET_BYTES, default_budget_bytes

GIB = 2**30


def test_default_budget_is_free_memory_less_a_margin() -> None:
    assert default_budget_bytes(20 * GIB, 24 * GIB) == 20 * GIB - int(FREE_MARGIN_FRACTION * 24 * GIB)
    assert default_budget_bytes(24 * GIB, 24 * GIB) < 24 * GIB  # an idle card still leaves the margin


def test_default_budget_of_a_nearly_full_device_stays_positive_and_within_free() -> None:
    assert default_budget_bytes(512 * 2**20, 24 * GIB) == MIN_BUDGET_BYTES
    assert 0 < default_budget_bytes(100 * 2**20, 24 * GIB) <= 100 * 2**20
    assert default_budget_bytes(0, 24 * GIB) >= 1
    assert default_budget_bytes(30 * GIB, 24 * GIB) <= 24 * GIB  # free is never above total
