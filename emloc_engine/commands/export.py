"""``emloc export``: Merge into the original model and write the merged folder, the adapter and GGUF."""

from __future__ import annotations

from typing import Any

from emloc_engine.commands._common import add_placeholder


def register(sub: Any) -> None:
    add_placeholder(sub, "export", "Merge into the original model and write the merged folder, the adapter and GGUF.", "export stage")
