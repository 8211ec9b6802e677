"""``emloc train``: Stage 2: LoRA fine-tuning on the emulator."""

from __future__ import annotations

from typing import Any

from emloc_engine.commands._common import add_placeholder


def register(sub: Any) -> None:
    add_placeholder(sub, "train", "Stage 2: LoRA fine-tuning on the emulator.", "training stage")
