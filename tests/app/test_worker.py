"""StageWorker: success, failure and cancel paths, throttled progress, no thread left behind.

Timeouts only guard against a hang (the machine may be busy): assertions are on what arrived,
never on how fast; the throttle is tested with a fake clock.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import pytest

from emloc_app.worker import PROGRESS_INTERVAL_S, StageWorker, start_stage
from emloc_engine.core.errors import ConfigError
from emloc_engine.core.progress import Progress

HANG_MS = 60_000

def three_updates(result: Any = None, exc: BaseException | None = None):  # type: ignore[no-untyped-def]
    def stage(config: Any, progress: Progress) -> Any:
        for i in range(3):
            progress.update((i + 1) / 3, f"step {i + 1}")
            progress.log("train/loss", 1.0 / (i + 1), i)
            time.sleep(PROGRESS_INTERVAL_S * 1.2)  # each update is past the throttle window
        if exc is not None:
            raise exc
        return result if result is not None else {"config": config}
    return stage


def test_worker_implements_progress_protocol() -> None:
    assert isinstance(StageWorker(lambda c, p: None, None), Progress)


def test_start_up_imports_no_torch() -> None:
    """The wizard is built at start-up; the stage modules (torch, diffusers) are imported when they are first used."""
    import subprocess
    import sys

    code = ("import os, sys; os.environ['QT_QPA_PLATFORM'] = 'offscreen'\n"
            "from PySide6.QtWidgets import QApplication; app = QApplication([])\n"
            "from emloc_app.wizard import EmlocWizard; w = EmlocWizard()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft', 'diffusers'))[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_success_emits_three_progress_updates_and_the_result(qtbot) -> None:  # type: ignore[no-untyped-def]
    progress: list[tuple[float, str]] = []
    metrics: list[tuple[str, float, int]] = []
    results: list[Any] = []
    worker = start_stage(None, three_updates(), "cfg", "fake", on_progress=lambda f, m: progress.append((f, m)),
                         on_metric=lambda *a: metrics.append(a), on_success=results.append)
    with qtbot.waitSignal(worker.finished, timeout=HANG_MS):
        pass
    qtbot.waitUntil(lambda: len(results) == 1, timeout=HANG_MS)
    assert results == [{"config": "cfg"}]
    assert [m for _, m in progress] == ["step 1", "step 2", "step 3"]
    assert progress[-1][0] == pytest.approx(1.0)
    assert [m[0] for m in metrics] == ["train/loss"] * 3


def test_failure_emits_the_exception(qtbot) -> None:  # type: ignore[no-untyped-def]
    errors: list[BaseException] = []
    succeeded: list[Any] = []
    worker = start_stage(None, three_updates(exc=ConfigError("bad rank")), None, "fake",
                         on_failure=errors.append, on_success=succeeded.append)
    with qtbot.waitSignal(worker.finished, timeout=HANG_MS):
        pass
    qtbot.waitUntil(lambda: len(errors) == 1, timeout=HANG_MS)
    assert isinstance(errors[0], ConfigError) and "bad rank" in str(errors[0])
    assert not succeeded


def test_cancel_is_cooperative(qtbot) -> None:  # type: ignore[no-untyped-def]
    started = threading.Event()
    seen: list[int] = []

    def slow(config: Any, progress: Progress) -> Any:
        for i in range(12_000):  # about a minute: only a cancel that never arrives lets it finish
            started.set()
            progress.check_cancelled()
            progress.update(i / 12_000)
            seen.append(i)
            time.sleep(0.005)
        return "finished anyway"

    cancelled: list[bool] = []
    succeeded: list[Any] = []
    worker = start_stage(None, slow, None, "slow", on_cancel=lambda: cancelled.append(True),
                         on_success=succeeded.append)
    assert started.wait(HANG_MS / 1000)
    with qtbot.waitSignal(worker.finished, timeout=HANG_MS):
        worker.request_cancel()
    qtbot.waitUntil(lambda: cancelled == [True], timeout=HANG_MS)
    assert not succeeded
    assert len(seen) < 12_000


def test_progress_is_throttled_but_the_last_update_arrives(qtbot) -> None:  # type: ignore[no-untyped-def]
    got: list[float] = []
    ticks = itertools.count()

    def burst(config: Any, progress: Progress) -> None:
        for i in range(2000):
            progress.update(i / 2000, "burst")
        progress.update(0.9999, "last")

    # 2001 updates 1 ms apart on a fake clock: 2 s, so about 20 per second get through.
    worker = StageWorker(burst, None, "burst", clock=lambda: 1000.0 + next(ticks) / 1000)
    worker.progressed.connect(lambda f, m: got.append(f))
    with qtbot.waitSignal(worker.finished, timeout=HANG_MS):
        worker.run()  # on this thread: the throttle is under test here, not the QThread plumbing
    assert got[0] == 0.0 and got[-1] == pytest.approx(0.9999)  # the first and the held-back last one
    assert 39 <= len(got) <= 42
