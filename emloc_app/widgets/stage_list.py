"""The stages of a run as rows: status, title, progress bar, ETA or result line."""

from __future__ import annotations

from dataclasses import dataclass, field

from PySide6.QtWidgets import QGridLayout, QLabel, QProgressBar, QSizePolicy, QWidget

from emloc_engine.core.progress import EtaClock, format_seconds

SYMBOLS = {"pending": "○", "running": "◐", "done": "✔", "failed": "✖", "cancelled": "■", "skipped": "✔"}


@dataclass
class _Row:
    symbol: QLabel
    title: QLabel
    bar: QProgressBar
    status: QLabel
    state: str = "pending"
    clock: EtaClock = field(default_factory=EtaClock)


class StageList(QWidget):
    """One row per stage; the Run page drives it from worker signals."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._grid = QGridLayout(self)
        self._grid.setContentsMargins(0, 0, 0, 0)
        self._grid.setColumnStretch(2, 1)
        self._grid.setHorizontalSpacing(10)
        self.rows: dict[str, _Row] = {}

    def set_stages(self, stages: list[tuple[str, str]]) -> None:
        """Replace the rows: ``[(name, title), ...]``."""
        for row in self.rows.values():
            widgets: tuple[QWidget, ...] = (row.symbol, row.title, row.bar, row.status)
            for w in widgets:
                w.deleteLater()
        self.rows.clear()
        for i, (name, title) in enumerate(stages):
            bar = QProgressBar()
            bar.setRange(0, 1000)
            bar.setValue(0)
            bar.setFormat("%p%")
            bar.setMinimumWidth(160)
            status = QLabel("waiting")
            status.setMinimumWidth(220)
            status.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
            row = _Row(QLabel(SYMBOLS["pending"]), QLabel(title), bar, status)
            cells: tuple[QWidget, ...] = (row.symbol, row.title, row.bar, row.status)
            for col, cell in enumerate(cells):
                self._grid.addWidget(cell, i, col)
            self.rows[name] = row

    def start(self, name: str) -> None:
        row = self.rows[name]
        row.state = "running"
        row.clock = EtaClock()
        row.symbol.setText(SYMBOLS["running"])
        row.status.setText("starting…")

    def set_progress(self, name: str, fraction: float, message: str = "") -> None:
        """Show the stage's progress; one ETA only: the engine's when its message has one (it times the
        steps themselves, not the loading before them), else this row's clock's."""
        row = self.rows[name]
        row.bar.setValue(round(fraction * 1000))
        if "ETA" in message:
            row.status.setText(message)
            return
        eta = format_seconds(row.clock.eta_s(fraction)) if fraction > 0.01 else "?"
        row.status.setText(f"{message}  ·  ETA {eta}" if message else f"ETA {eta}")

    def finish(self, name: str, state: str, message: str = "") -> None:
        """``state``: done, skipped (done earlier), failed or cancelled."""
        row = self.rows[name]
        row.state = state
        row.symbol.setText(SYMBOLS.get(state, "?"))
        if state in ("done", "skipped"):
            row.bar.setValue(1000)
        took = format_seconds(row.clock.elapsed_s())
        default = {"done": f"done in {took}", "skipped": "done earlier", "failed": "failed",
                   "cancelled": "cancelled (resumable)"}[state]
        row.status.setText(message or default)

    def state(self, name: str) -> str:
        return self.rows[name].state
