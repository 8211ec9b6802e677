"""Progress reporting and cooperative cancel, shared by every stage.

A stage receives one object implementing :class:`Progress`. It calls ``update`` with the
fraction done, ``log`` for metrics (loss, learning rate, peak memory, ...) and
``check_cancelled`` at natural boundaries (each optimizer step, each block factorised, each
shard written). ``check_cancelled`` raises :class:`~emloc_engine.core.errors.Cancelled`.

Nested work gets a slice of the bar with :func:`sub`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from emloc_engine.core.errors import Cancelled


@runtime_checkable
class Progress(Protocol):
    """What a stage may tell the outside world while it runs."""

    def update(self, fraction: float, message: str = "") -> None:
        """Report that ``fraction`` (0..1) of this stage is done, with a short status line."""

    def log(self, name: str, value: float, step: int) -> None:
        """Report a metric value at an integer step (``train/loss``, ``eval/loss``, ``gpu/peak_gib``)."""

    def check_cancelled(self) -> None:
        """Raise :class:`Cancelled` if the user asked to stop."""


class NullProgress:
    """Ignores everything and never cancels."""

    def update(self, fraction: float, message: str = "") -> None:
        pass

    def log(self, name: str, value: float, step: int) -> None:
        pass

    def check_cancelled(self) -> None:
        pass


NULL_PROGRESS: Progress = NullProgress()


class CancelToken:
    """A thread-safe cancel flag (a ``threading.Event``): set from any thread, read by the stage."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled()


@dataclass
class RecordingProgress:
    """Keeps every call, for tests. ``cancel_after_updates`` cancels after that many updates."""

    updates: list[tuple[float, str]] = field(default_factory=list)
    metrics: list[tuple[str, float, int]] = field(default_factory=list)
    cancel_after_updates: int | None = None
    checks: int = 0

    def update(self, fraction: float, message: str = "") -> None:
        self.updates.append((fraction, message))

    def log(self, name: str, value: float, step: int) -> None:
        self.metrics.append((name, value, step))

    def check_cancelled(self) -> None:
        self.checks += 1
        if self.cancel_after_updates is not None and len(self.updates) >= self.cancel_after_updates:
            raise Cancelled()

    def values(self, name: str) -> list[float]:
        """All logged values of one metric, in order."""
        return [v for n, v, _ in self.metrics if n == name]


class TqdmProgress:
    """A terminal progress bar for the CLI; metrics go to the bar's postfix. Ctrl-C cancels."""

    def __init__(self, description: str, cancel: CancelToken | None = None) -> None:
        from tqdm import tqdm

        self._bar: Any = tqdm(total=1000, desc=description, unit="‰", dynamic_ncols=True, leave=True)
        self._cancel = cancel or CancelToken()
        self._postfix: dict[str, str] = {}

    def update(self, fraction: float, message: str = "") -> None:
        target = int(max(0.0, min(1.0, fraction)) * 1000)
        if target > self._bar.n:
            self._bar.update(target - self._bar.n)
        if message:
            self._bar.set_description_str(message[:60], refresh=False)
        self._bar.refresh()

    # Metrics worth a glance on one terminal line; everything else goes to the run log/manifest.
    SHOWN: ClassVar[dict[str, str]] = {"train/loss": "loss", "eval/loss": "eval", "train/tokens_per_s": "tok/s", "gpu/peak_gib": "GiB"}

    def log(self, name: str, value: float, step: int) -> None:
        label = self.SHOWN.get(name)
        if label is None:
            return
        self._postfix[label] = f"{value:.4g}"
        self._bar.set_postfix(self._postfix, refresh=True)

    def check_cancelled(self) -> None:
        self._cancel.check()

    def close(self) -> None:
        self._bar.close()


class _SubProgress:
    def __init__(self, parent: Progress, start: float, end: float) -> None:
        self._parent, self._start, self._end = parent, start, end

    def update(self, fraction: float, message: str = "") -> None:
        f = max(0.0, min(1.0, fraction))
        self._parent.update(self._start + (self._end - self._start) * f, message)

    def log(self, name: str, value: float, step: int) -> None:
        self._parent.log(name, value, step)

    def check_cancelled(self) -> None:
        self._parent.check_cancelled()


def sub(progress: Progress, start: float, end: float) -> Progress:
    """A progress that maps 0..1 onto ``start..end`` of ``progress`` (a slice of its bar)."""
    return _SubProgress(progress, start, end)


class EtaClock:
    """Seconds remaining from the fraction done, for status lines (``"block 3/32, ETA 41 s"``)."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()

    def elapsed_s(self) -> float:
        return time.monotonic() - self._t0

    def eta_s(self, fraction: float) -> float | None:
        if fraction <= 0.0:
            return None
        return self.elapsed_s() * (1.0 - fraction) / fraction


def format_seconds(seconds: float | None) -> str:
    """``75`` -> ``"1 min 15 s"``; ``None`` -> ``"?"``."""
    if seconds is None:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {(s % 3600) // 60} min"
