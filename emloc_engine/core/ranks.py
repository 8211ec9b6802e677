"""The rank of a compressed layer at keep-ratio ρ: one formula for the planner and the emulator.

A layer ``W`` (out × in) stored as ``u`` (out × k) and ``v`` (k × in) keeps ``k·(out + in)``
parameters, so keeping the fraction ρ of its ``out·in`` parameters means
``k = floor(ρ · out · in / (out + in))``. The emulator writes modules at this rank (it is part of
its file format) and the planner predicts memory from it, so both import it from here (torch-free).
"""

from __future__ import annotations


def rank_for_ratio(ratio: float, out_features: int, in_features: int) -> int:
    """``k = floor(ρ · out · in / (out + in))``, at least 1.

    Args:
        ratio: the keep-ratio ρ.
        out_features: rows of ``W``.
        in_features: columns of ``W``.

    Returns:
        The rank ``k`` (not clamped to ``min(out, in)``: callers that allow ρ near 1 clamp).
    """
    return max(1, int(ratio * out_features * in_features // (out_features + in_features)))


__all__ = ["rank_for_ratio"]
