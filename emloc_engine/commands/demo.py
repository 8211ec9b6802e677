"""``emloc demo``: Prepare the embedded demo model and datasets (offline, from installed packages)."""

from __future__ import annotations

from typing import Any

from emloc_engine.commands._common import add_placeholder


def register(sub: Any) -> None:
    add_placeholder(sub, "demo", "Prepare the embedded demo model and datasets (offline, from installed packages).", "demo assets")
