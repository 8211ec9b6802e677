"""``emloc correct``: Stage 3: correct the trained adapter for the emulator/original mismatch."""

from __future__ import annotations

from typing import Any

from emloc_engine.commands._common import add_placeholder


def register(sub: Any) -> None:
    add_placeholder(sub, "correct", "Stage 3: correct the trained adapter for the emulator/original mismatch.", "correction stage")
