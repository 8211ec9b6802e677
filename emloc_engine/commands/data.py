"""``emloc data``: Validate a dataset and preview rendered samples, before any model is loaded."""

from __future__ import annotations

from typing import Any

from emloc_engine.commands._common import add_placeholder


def register(sub: Any) -> None:
    add_placeholder(sub, "data", "Validate a dataset and preview rendered samples, before any model is loaded.", "data pipeline")
