"""Read a small JSON object file (a model folder's config, a lock, an adapter's record) leniently."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object stored in ``path``, or ``{}`` when the file is missing, unreadable, not JSON
    or not an object: callers only look up optional keys; whoever needs the file reads it strictly
    and reports what is wrong with it.

    Args:
        path: the file.

    Returns:
        The parsed object, or an empty dict.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError covers UnicodeDecodeError and JSONDecodeError
        return {}
    return data if isinstance(data, dict) else {}
