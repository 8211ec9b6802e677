"""``RUN_DIR/tensorboard/``: every metric a stage logs, in files other tools read.

Two writers, both fed by the same ``Progress.log`` calls the app's plots listen to:

* **TensorBoard event files** (``events.out.tfevents.*``) through ``torch.utils.tensorboard.SummaryWriter``
  when the ``tensorboard`` package is installed (a dependency of emloc-studio; a minimal install without it
  simply skips them): ``tensorboard --logdir RUN_DIR/tensorboard``. Tags are the metric names
  (``train/loss``, ``eval/loss``, ``train/lr``, ``correct/eval_loss``, ``emulator/rel_error``); the GPU
  memory, which several stages log, gets its stage in front (``train/gpu/peak_gib``).
* **``metrics.jsonl``**, always: one JSON object per line, appended as the metric arrives::

      {"stage": "train", "name": "train/loss", "step": 3, "value": 1.42, "time": 1764921600.5}

  ``time`` is seconds since the epoch (UTC). A resumed run appends to the same file; training resumed
  from a checkpoint logs the steps after that checkpoint again, so a step can appear twice: the later
  line wins (:func:`read_metrics` does this). Pandas: ``pd.read_json(path, lines=True)``.

Writing metrics never stops a run: a full disk or an unwritable folder is logged once and the
metric is dropped from the files (the manifest and the app still receive it).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

from emloc_engine.core.progress import Progress

log = logging.getLogger(__name__)

JSONL_NAME = "metrics.jsonl"


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can write event files (the ``tensorboard`` package is installed)."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def metric_tag(stage: str, name: str) -> str:
    """The TensorBoard tag of metric ``name`` logged by ``stage`` (GPU memory gets its stage in front)."""
    return f"{stage}/{name}" if name.startswith("gpu/") else name


class MetricsWriter:
    """Appends metrics to ``folder/metrics.jsonl`` and (when available) TensorBoard event files in ``folder``.

    Thread-safe; the folder and the files are created at the first metric. :meth:`close` flushes.
    """

    def __init__(self, folder: Path, *, tensorboard: bool | None = None) -> None:
        self.folder = Path(folder)
        self._tensorboard = tensorboard_available() if tensorboard is None else tensorboard
        self._lock = threading.Lock()
        self._jsonl: Any = None
        self._summary: Any = None
        self._broken = False

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.folder / JSONL_NAME).open("a", encoding="utf-8")
        if self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._summary = SummaryWriter(log_dir=str(self.folder), flush_secs=10)

    def log(self, stage: str, name: str, value: float, step: int) -> None:
        """Record one value (non-finite values are kept in the JSONL as ``null``)."""
        with self._lock:
            if self._broken:
                return
            try:
                if self._jsonl is None:
                    self._open()
                finite = math.isfinite(value)
                self._jsonl.write(
                    json.dumps(
                        {
                            "stage": stage,
                            "name": name,
                            "step": int(step),
                            "value": float(value) if finite else None,
                            "time": round(time.time(), 3),
                        }
                    )
                    + "\n"
                )
                self._jsonl.flush()
                if self._summary is not None and finite:
                    self._summary.add_scalar(metric_tag(stage, name), float(value), int(step))
            except OSError as exc:
                self._broken = True
                log.warning("Metrics are no longer written to %s: %s", self.folder, exc)

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        with self._lock:
            for handle in (self._summary, self._jsonl):
                if handle is not None:
                    try:
                        handle.close()
                    except OSError as exc:  # pragma: no cover - a disk that failed at the very end
                        log.warning("Closing the metrics files in %s failed: %s", self.folder, exc)
            self._summary = self._jsonl = None


class RecordingMetrics:
    """A ``Progress`` that passes everything on to ``parent`` and also writes each metric with ``writer``."""

    def __init__(self, parent: Progress, writer: MetricsWriter, stage: str) -> None:
        self._parent, self._writer, self._stage = parent, writer, stage

    def update(self, fraction: float, message: str = "") -> None:
        self._parent.update(fraction, message)

    def log(self, name: str, value: float, step: int) -> None:
        self._writer.log(self._stage, name, value, step)
        self._parent.log(name, value, step)

    def check_cancelled(self) -> None:
        self._parent.check_cancelled()

    def __getattr__(self, name: str) -> Any:
        # pass extensions of Progress (the app's emit_text) through to the wrapped object
        return getattr(self._parent, name)


def read_metrics(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The metrics of ``folder/metrics.jsonl``: name → ``(step, value)`` sorted by step, the last value of a
    step winning (a resumed run logs some steps twice). ``{}`` when there is no file; bad lines are skipped.
    """
    path = Path(folder) / JSONL_NAME
    if not path.is_file():
        return {}
    latest: dict[str, dict[int, float]] = {}
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
                name, step, value = str(row["name"]), int(row["step"]), row["value"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut off by a crash
            if isinstance(value, (int, float)):
                latest.setdefault(name, {})[step] = float(value)
    return {name: sorted(points.items()) for name, points in latest.items()}
