"""What makes a folder a *model view* of a GGUF file (config and tokenizer, weights read from the GGUF), torch-free.

Discovery and the app's start-up ask "is this a view, of which file?" without importing torch; the tensors
themselves are read by :mod:`emloc_engine.weights.gguf_source`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from emloc_engine.core.errors import ModelNotFound

GGUF_VIEW_MARKER = "emloc_gguf.json"
"""The file that makes a folder a model view of a GGUF: its source, size, mtime and view dtype."""
VIEW_DTYPES = ("bfloat16", "float16", "float32")


def is_gguf_view(model_dir: Path) -> bool:
    """Whether ``model_dir`` is a model view whose weights live in a GGUF file."""
    d = Path(model_dir)
    return (d / GGUF_VIEW_MARKER).is_file() and not any(d.glob("*.safetensors"))


def read_view_marker(model_dir: Path) -> dict[str, Any]:
    """The view's marker, with the GGUF it reads checked to be the same file (size and mtime).

    Raises:
        ModelNotFound: the marker is unreadable, or the GGUF is gone or was replaced since the view was made.
    """
    path = Path(model_dir) / GGUF_VIEW_MARKER
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
        source = Path(marker["source"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelNotFound(f"{path} is unreadable ({exc}).", hint="Open the GGUF file again (emloc models --convert FILE).") from exc
    try:
        st = source.stat()
    except OSError:
        raise ModelNotFound(f"The GGUF file {source} of the model view {model_dir} is gone.",
                            hint="Pick the model again from its new place.") from None
    if st.st_size != marker.get("source_size_bytes") or st.st_mtime_ns != marker.get("source_mtime_ns"):
        raise ModelNotFound(f"The GGUF file {source} changed since its model view {model_dir} was made.",
                            hint="Open it again (emloc models --convert FILE, or pick it in the app); "
                                 "a run started from the old file cannot go on with the new one.")
    return dict(marker)


__all__ = ["GGUF_VIEW_MARKER", "VIEW_DTYPES", "is_gguf_view", "read_view_marker"]
