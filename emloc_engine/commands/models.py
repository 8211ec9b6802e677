"""``emloc models``: List the models in the Hugging Face cache, added folders and LM Studio/Ollama stores."""

from __future__ import annotations

from typing import Any

from emloc_engine.commands._common import add_placeholder


def register(sub: Any) -> None:
    add_placeholder(sub, "models", "List the models in the Hugging Face cache, added folders and LM Studio/Ollama stores.", "model catalog")
