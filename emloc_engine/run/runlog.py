"""Logging to the run folder. The engine logs with ``logging.getLogger(__name__)``; callers attach."""

from __future__ import annotations

import logging
from pathlib import Path

from emloc_engine.core.layout import RunLayout

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def attach_run_log(run_dir: Path, level: int = logging.INFO) -> logging.Handler:
    """Append the ``emloc_engine`` log to ``RUN_DIR/logs/emloc.log``; returns the handler to detach."""
    path = RunLayout(Path(run_dir)).log_file
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(level)
    logger = logging.getLogger("emloc_engine")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    return handler


def detach_run_log(handler: logging.Handler) -> None:
    logging.getLogger("emloc_engine").removeHandler(handler)
    handler.close()
