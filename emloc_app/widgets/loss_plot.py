"""Live training plots with Qt Charts: loss (train and eval), learning rate, GPU memory.

The widget only listens: connect a worker's ``metric(name, value, step)`` signal to
:meth:`LossPlot.on_metric`. Axes grow with the data; nothing is redrawn more often than the
metrics arrive.

- An empty chart shows no tick labels (a 0..1 step axis printed "0 0 0 0 1"); step ticks are whole
  numbers, never repeated; the step axis reaches a little past the last step so its marker is whole.
- :meth:`LossPlot.configure` says where the run computes: on the CPU the GPU-memory chart is hidden
  (the trainer logs 0 there), on a GPU it draws the budget as a dashed line.
- The charts take their colours from the widget's palette, so they follow a light or dark theme.
- A step logged again (a resumed run repeats the steps after its checkpoint) replaces the later points;
  :meth:`LossPlot.show_recorded` draws a reopened run's recorded curves.
"""

from __future__ import annotations

import math

from PySide6.QtCharts import QChart, QChartView, QLineSeries, QScatterSeries, QValueAxis, QXYSeries
from PySide6.QtCore import QEvent, QMargins, QPointF, Qt
from PySide6.QtGui import QColor, QPainter, QPalette, QPen
from PySide6.QtWidgets import QGridLayout, QSizePolicy, QWidget

BUDGET_COLOR = "#d9534f"

# metric name -> (chart key, series label, colour, scatter)
SERIES = {
    "train/loss": ("loss", "train loss", "#3b82f6", False),
    "eval/loss": ("loss", "eval loss", "#f59e0b", True),
    "train/lr": ("lr", "learning rate", "#10b981", False),
    "gpu/peak_gib": ("mem", "GPU memory (GiB)", "#a855f7", False),
    "gpu/allocated_gib": ("mem", "GPU memory (GiB)", "#a855f7", False),
}
CHARTS = {"loss": "Loss", "lr": "Learning rate", "mem": "GPU memory (GiB)"}


def nice_step(rough: float) -> float:
    """The smallest of 1, 2, 5 × 10ⁿ (at least 1: steps are whole) that is ≥ ``rough``."""
    if rough <= 1:
        return 1.0
    power = 10 ** math.floor(math.log10(rough))
    return float(next(m * power for m in (1, 2, 5, 10) if m * power >= rough))


class _Chart:
    def __init__(self, title: str) -> None:
        self.chart = QChart()
        self.chart.setTitle(title)
        self.chart.setMargins(QMargins(4, 4, 4, 4))
        self.chart.legend().setAlignment(Qt.AlignmentFlag.AlignBottom)
        self.ax = QValueAxis()
        self.ax.setLabelFormat("%d")
        self.ax.setTitleText("step")
        self.ay = QValueAxis()
        self.ay.setLabelFormat("%.3g")
        self.chart.addAxis(self.ax, Qt.AlignmentFlag.AlignBottom)
        self.chart.addAxis(self.ay, Qt.AlignmentFlag.AlignLeft)
        self.view = QChartView(self.chart)
        self.view.setRenderHint(QPainter.RenderHint.Antialiasing)
        self.view.setMinimumSize(220, 180)
        self.view.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.floor: float | None = None  # a value the y axis always shows (the budget line)
        self.reset()

    def reset(self) -> None:
        """No data: no tick labels, default ranges."""
        self.x_max = 0.0
        self.y_min = math.inf
        self.y_max = -math.inf
        self.ax.setRange(0, 1)
        self.ay.setRange(0, 1)
        self.ax.setLabelsVisible(False)
        self.ay.setLabelsVisible(False)
        if self.floor is not None:
            self._fit_y()

    def add_point(self, series: QXYSeries, x: float, y: float) -> None:
        series.append(x, y)
        self.x_max = max(self.x_max, x)
        self.y_min, self.y_max = min(self.y_min, y), max(self.y_max, y)
        self.ax.setLabelsVisible(True)
        self.ay.setLabelsVisible(True)
        self._fit_x()
        self._fit_y()

    def _fit_x(self) -> None:
        """0 … a little past the last step (so a marker there is whole), ticks every 1, 2 or 5 × 10ⁿ steps."""
        top = self.x_max + max(1.0, 0.04 * self.x_max)
        self.ax.setRange(0, top)
        self.ax.setTickType(QValueAxis.TickType.TicksDynamic)
        self.ax.setTickAnchor(0)
        self.ax.setTickInterval(nice_step(top / 6))  # at most 7 ticks

    def _fit_y(self) -> None:
        lo, hi = self.y_min, self.y_max
        if self.floor is not None:
            lo, hi = min(lo, self.floor), max(hi, self.floor)
        if not math.isfinite(lo):
            return
        pad = (hi - lo) * 0.08 or abs(hi) * 0.1 or 1.0
        self.ay.setRange(lo - pad if lo - pad > 0 or lo < 0 else 0, hi + pad)
        self.ay.applyNiceNumbers()  # round tick values, so labels never repeat

    def apply_palette(self, palette: QPalette) -> None:
        """Background, titles, labels and grid in the palette's colours (light or dark)."""
        # colours set one by one: QChart.setTheme would also repaint the series in the theme's colours
        text = palette.color(QPalette.ColorRole.WindowText)
        self.chart.setBackgroundBrush(palette.color(QPalette.ColorRole.Base))
        self.chart.setTitleBrush(text)
        self.chart.legend().setLabelColor(text)
        grid = QColor(text)
        grid.setAlpha(40)
        for axis in (self.ax, self.ay):
            axis.setLabelsColor(text)
            axis.setTitleBrush(text)
            axis.setGridLineColor(grid)
            axis.setLinePenColor(grid)
        self.view.setBackgroundBrush(palette.color(QPalette.ColorRole.Window))


class LossPlot(QWidget):
    """Three small charts side by side (loss, learning rate, GPU memory)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        grid = self.grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        self.charts = {key: _Chart(title) for key, title in CHARTS.items()}
        for i, c in enumerate(self.charts.values()):
            grid.addWidget(c.view, 0, i)
            grid.setColumnStretch(i, 2 if i == 0 else 1)
        self.series: dict[str, QXYSeries] = {}
        self.points: dict[str, list[tuple[int, float]]] = {}
        self.on_gpu = True
        self.budget_line: QLineSeries | None = None
        self._apply_palette()

    def configure(self, *, on_gpu: bool, budget_gib: float | None) -> None:
        """Where the run computes: the GPU-memory chart is hidden on the CPU; on a GPU it shows the budget.

        Args:
            on_gpu: the run's stages compute on a GPU.
            budget_gib: the run's memory budget, drawn as a dashed line on the GPU-memory chart.
        """
        self.on_gpu = on_gpu
        mem = self.charts["mem"]
        mem.view.setVisible(on_gpu)
        self.grid.setColumnStretch(list(self.charts).index("mem"), 1 if on_gpu else 0)  # no empty column
        if self.budget_line is None:
            line = QLineSeries()
            pen = QPen(QColor(BUDGET_COLOR), 1.5, Qt.PenStyle.DashLine)
            line.setPen(pen)
            line.setName("budget")
            mem.chart.addSeries(line)
            line.attachAxis(mem.ax)
            line.attachAxis(mem.ay)
            self.budget_line = line
        mem.floor = budget_gib if on_gpu else None
        self._draw_budget()

    def _draw_budget(self) -> None:
        mem = self.charts["mem"]
        if self.budget_line is None:
            return
        self.budget_line.clear()
        if mem.floor is not None:
            right = max(mem.ax.max(), mem.x_max, 1.0)
            self.budget_line.append(0.0, mem.floor)
            self.budget_line.append(right, mem.floor)
            mem._fit_y()
        mem.chart.legend().setVisible(mem.floor is not None)

    def changeEvent(self, event: QEvent) -> None:
        if event.type() == QEvent.Type.PaletteChange:
            self._apply_palette()
        super().changeEvent(event)

    def _apply_palette(self) -> None:
        for c in self.charts.values():
            c.apply_palette(self.palette())

    def _series(self, name: str) -> tuple[_Chart, QXYSeries] | None:
        spec = SERIES.get(name)
        if spec is None:
            return None
        key, label, color, scatter = spec
        chart = self.charts[key]
        s = self.series.get(label)
        if s is None:
            if scatter:
                dots = QScatterSeries()
                dots.setMarkerSize(8.0)
                dots.setColor(QColor(color))
                s = dots
            else:
                s = QLineSeries()
                s.setPen(QPen(QColor(color), 2))
            s.setName(label)
            chart.chart.addSeries(s)
            s.attachAxis(chart.ax)
            s.attachAxis(chart.ay)
            self.series[label] = s
            chart.chart.legend().setVisible(key == "loss" or (key == "mem" and chart.floor is not None))
        return chart, s

    def on_metric(self, name: str, value: float, step: int) -> None:
        """Slot for ``StageWorker.metric``: add one point if the metric is plotted."""
        if not math.isfinite(value) or (name.startswith("gpu/") and not self.on_gpu):
            return
        found = self._series(name)
        if found is None:
            return
        chart, s = found
        points = self.points.setdefault(name, [])
        if points and points[-1][0] >= step and not name.startswith("gpu/"):
            # a resumed run logs the steps after its checkpoint again: the later values win (as in read_metrics)
            points[:] = [(x, y) for x, y in points if x < step]
            s.replace([QPointF(x, y) for x, y in points])
        points.append((step, value))
        chart.add_point(s, float(step), float(value))
        if chart is self.charts["mem"]:
            self._draw_budget()

    def show_recorded(self, curves: dict[str, list[tuple[int, float]]]) -> None:
        """Draw a run's recorded curves (:func:`~emloc_engine.run.metrics_log.read_metrics`) on cleared charts.

        GPU memory is left out: several stages logged it against their own steps (blocks, then optimizer
        steps), which read back as one mixed series; the chart fills again as a resumed run reports.
        """
        self.clear()
        for name, points in curves.items():
            if not name.startswith("gpu/"):
                for step, value in points:
                    self.on_metric(name, value, step)

    def clear(self) -> None:
        for s in self.series.values():
            s.clear()
        self.points.clear()
        for c in self.charts.values():
            c.reset()
        self._draw_budget()
