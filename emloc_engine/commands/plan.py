"""``emloc plan``: Predict peak memory of inference and of every EMLoC stage, and pick the compression ratio."""

from __future__ import annotations

from typing import Any

from emloc_engine.commands._common import add_placeholder


def register(sub: Any) -> None:
    add_placeholder(sub, "plan", "Predict peak memory of inference and of every EMLoC stage, and pick the compression ratio.", "memory planner")
