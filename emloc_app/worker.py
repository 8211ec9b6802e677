"""Run one engine stage on a ``QThread`` and turn its progress into Qt signals.

:class:`StageWorker` implements the engine's ``Progress`` protocol: the stage function calls
``update``/``log``/``check_cancelled`` from the worker thread, and the worker re-emits them as
signals, which Qt queues to the GUI thread. Cancel is a ``threading.Event`` set from the GUI thread
(a queued slot would never run while the worker thread is busy); the stage sees it at its next
``check_cancelled``. ``QThread.terminate`` is never used.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar, cast

from PySide6.QtCore import QCoreApplication, QObject, Qt, QThread, Signal, Slot

from emloc_engine.core.errors import Cancelled

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.05  # at most ~20 progress signals per second

C = TypeVar("C")
R = TypeVar("R")


class StageWorker(QObject):
    """Runs ``stage(config, self)`` once; emits what happens.

    Signals:
        progressed(fraction, message): throttled to ~20 per second; the last one always arrives.
        metric(name, value, step): every ``progress.log`` call.
        text(channel, chunk): streamed text (generation), via :meth:`emit_text`.
        succeeded(result) / failed(exception) / cancelled(): exactly one of them, then finished().
    """

    progressed = Signal(float, str)
    metric = Signal(str, float, int)
    text = Signal(str, str)
    succeeded = Signal(object)
    failed = Signal(object)
    cancelled = Signal()
    finished = Signal()

    def __init__(self, stage: Callable[[C, StageWorker], object], config: C, name: str = "", *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._call: Callable[[StageWorker], object] = functools.partial(stage, config)
        self._clock = clock  # the throttle's time source (tests pass a fake one)
        self.name = name or "stage"
        self._cancel = threading.Event()
        self._last_emit = 0.0
        self._pending: tuple[float, str] | None = None
        self.result: object = None
        self.error: BaseException | None = None
        self.relay: Relay | None = None  # the GUI-thread end of the signals, kept alive with the worker

    # -- Progress protocol (called from the worker thread) ---------------------------------
    def update(self, fraction: float, message: str = "") -> None:
        now = self._clock()
        fraction = max(0.0, min(1.0, float(fraction)))
        if now - self._last_emit < PROGRESS_INTERVAL_S and fraction < 1.0:
            self._pending = (fraction, message)
            return
        self._pending = None
        self._last_emit = now
        self.progressed.emit(fraction, message)

    def log(self, name: str, value: float, step: int) -> None:
        self.metric.emit(name, float(value), int(step))

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise Cancelled()

    def emit_text(self, chunk: str, channel: str = "") -> None:
        """Stream a piece of generated text to the GUI (``channel`` says which pane)."""
        if chunk:
            self.text.emit(channel, chunk)

    # -- GUI side ---------------------------------------------------------------------------
    def request_cancel(self) -> None:
        """Ask the stage to stop at its next ``check_cancelled`` (safe from any thread)."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @Slot()
    def run(self) -> None:
        try:
            result = self._call(self)
        except Cancelled:
            self._flush()
            self.cancelled.emit()
        except Exception as exc:
            log.info("stage %s failed: %s", self.name, exc, exc_info=True)
            self.error = exc
            self._flush()
            self.failed.emit(exc)
        else:
            self.result = result
            self._flush()
            self.succeeded.emit(result)
        finally:
            # Hand the object back to the GUI thread before the worker thread ends, so Python
            # drops it there. (deleteLater on these Python-owned objects from the worker thread
            # segfaulted 3 runs in 15 of the app tests.)
            app = QCoreApplication.instance()
            if app is not None:
                self.moveToThread(app.thread())
            self.finished.emit()

    def _flush(self) -> None:
        if self._pending is not None:
            self.progressed.emit(*self._pending)
            self._pending = None


class _Registry(QObject):
    """Keeps every running (worker, thread) pair alive until its thread has finished."""

    def __init__(self) -> None:
        super().__init__()
        self.running: dict[int, tuple[StageWorker, QThread]] = {}

    def add(self, worker: StageWorker, thread: QThread) -> None:
        self.running[id(thread)] = (worker, thread)
        thread.finished.connect(self._on_thread_finished)

    @Slot()
    def _on_thread_finished(self) -> None:
        for key, (_, thread) in list(self.running.items()):
            if thread.isFinished():
                del self.running[key]


_registry: _Registry | None = None


def _get_registry() -> _Registry:
    global _registry
    if _registry is None:
        _registry = _Registry()
    return _registry


class Relay(QObject):
    """Lives on the GUI thread and calls plain Python callbacks for a worker's signals.

    Signals of the worker are connected to these bound slots, so Qt queues them to the GUI thread;
    connecting a lambda directly could run it on the worker thread.
    """

    def __init__(self, *, success: Callable[[object], None] | None = None,
                 failure: Callable[[BaseException], None] | None = None,
                 cancel: Callable[[], None] | None = None, finished: Callable[[], None] | None = None,
                 progress: Callable[[float, str], None] | None = None,
                 metric: Callable[[str, float, int], None] | None = None,
                 text: Callable[[str, str], None] | None = None) -> None:
        super().__init__()
        self.success, self.failure, self.cancel, self.finished = success, failure, cancel, finished
        self.progress, self.metric, self.text = progress, metric, text

    @Slot(object)
    def on_succeeded(self, result: object) -> None:
        if self.success is not None:
            self.success(result)

    @Slot(object)
    def on_failed(self, exc: BaseException) -> None:
        if self.failure is not None:
            self.failure(exc)

    @Slot()
    def on_cancelled(self) -> None:
        if self.cancel is not None:
            self.cancel()

    @Slot()
    def on_finished(self) -> None:
        if self.finished is not None:
            self.finished()

    @Slot(float, str)
    def on_progressed(self, fraction: float, message: str) -> None:
        if self.progress is not None:
            self.progress(fraction, message)

    @Slot(str, float, int)
    def on_metric(self, name: str, value: float, step: int) -> None:
        if self.metric is not None:
            self.metric(name, value, step)

    @Slot(str, str)
    def on_text(self, channel: str, chunk: str) -> None:
        if self.text is not None:
            self.text(channel, chunk)


def start_stage(
    owner: QObject | None, stage: Callable[[C, StageWorker], R], config: C, name: str = "", *,
    on_success: Callable[[R], None] | None = None,
    on_failure: Callable[[BaseException], None] | None = None,
    on_cancel: Callable[[], None] | None = None,
    on_finished: Callable[[], None] | None = None,
    on_progress: Callable[[float, str], None] | None = None,
    on_metric: Callable[[str, float, int], None] | None = None,
    on_text: Callable[[str, str], None] | None = None,
) -> StageWorker:
    """Run ``stage(config, progress)`` on a new ``QThread``; return the worker.

    The callbacks run on the GUI thread (through a :class:`Relay`); they are connected before the
    thread starts, so even an instant stage cannot finish unobserved.

    Args:
        owner: the page that started it (for logs; the worker is not parented to it).
        stage: the engine function, called as ``stage(config, worker)``.
        config: the frozen stage config.
        name: a short name for logs and the thread name.
        on_success, on_failure, on_cancel, on_finished, on_progress, on_metric, on_text:
            GUI-thread callbacks for the corresponding signals.

    Returns:
        The worker; it and its thread are kept alive until the thread has finished.
    """
    worker = StageWorker(stage, config, name)
    thread = QThread()
    thread.setObjectName(f"emloc-{worker.name}")
    worker.moveToThread(thread)

    def succeeded(result: object) -> None:
        if on_success is not None:
            on_success(cast(R, result))  # the signal carries ``object``; it is what ``stage`` returned

    relay = Relay(success=succeeded, failure=on_failure, cancel=on_cancel, finished=on_finished,
                  progress=on_progress, metric=on_metric, text=on_text)
    worker.relay = relay
    worker.succeeded.connect(relay.on_succeeded)
    worker.failed.connect(relay.on_failed)
    worker.cancelled.connect(relay.on_cancelled)
    worker.progressed.connect(relay.on_progressed)
    worker.metric.connect(relay.on_metric)
    worker.text.connect(relay.on_text)
    worker.finished.connect(relay.on_finished)
    thread.started.connect(worker.run)
    # Direct: QThread.quit is thread-safe, and a queued call would wait for the GUI loop.
    worker.finished.connect(thread.quit, Qt.ConnectionType.DirectConnection)
    # No deleteLater: both objects are owned by Python; the registry drops its references on
    # the GUI thread once the thread has finished, and Python deletes them there.
    _get_registry().add(worker, thread)
    thread.start()
    return worker


def running_workers() -> list[StageWorker]:
    """Workers whose threads have not finished yet."""
    return [w for w, _ in _get_registry().running.values()]


def shutdown_workers(timeout_ms: int = 30000) -> bool:
    """Cancel every running stage and wait for its thread (used when the app closes).

    Returns:
        True if every thread finished within ``timeout_ms``.
    """
    reg = _get_registry()
    ok = True
    for worker, _thread in list(reg.running.values()):
        with contextlib.suppress(RuntimeError):  # already deleted on the C++ side
            worker.request_cancel()
    deadline = time.monotonic() + timeout_ms / 1000
    for key, (_, thread) in list(reg.running.items()):
        left = max(1, int((deadline - time.monotonic()) * 1000))
        with contextlib.suppress(RuntimeError):
            ok = thread.wait(left) and ok
        reg.running.pop(key, None)
    app = QCoreApplication.instance()
    if app is not None:
        app.processEvents()
    return ok
