"""``emloc build``: Stage 1: build the emulator by activation-aware SVD, streaming block by block."""

from __future__ import annotations

from typing import Any

from emloc_engine.commands._common import add_placeholder


def register(sub: Any) -> None:
    add_placeholder(sub, "build", "Stage 1: build the emulator by activation-aware SVD, streaming block by block.", "emulator stage")
