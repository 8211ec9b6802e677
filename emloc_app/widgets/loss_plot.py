"""Live training plots with Qt Charts: loss (train and eval), learning rate, GPU memory.

The widget only listens: connect a worker's ``metric(name, value, step)`` signal to
:meth:`LossPlot.on_metric`. Axes grow with the data; nothing is redrawn more often than the
metrics arrive.
"""

from __future__ import annotations

import math

from PySide6.QtCharts import QChart, QChartView, QLineSeries, QScatterSeries, QValueAxis, QXYSeries
from PySide6.QtCore import QMargins, Qt
from PySide6.QtGui import QColor, QPainter, QPen
from PySide6.QtWidgets import QGridLayout, QSizePolicy, QWidget

from emloc_app import theme

# metric name -> (chart key, series label, colour, scatter)
SERIES = {
    "train/loss": ("loss", "train loss", "#3b82f6", False),
    "eval/loss": ("loss", "eval loss", "#f59e0b", True),
    "train/lr": ("lr", "learning rate", "#10b981", False),
    "gpu/peak_gib": ("mem", "GPU memory (GiB)", "#a855f7", False),
    "gpu/allocated_gib": ("mem", "GPU memory (GiB)", "#a855f7", False),
}
CHARTS = {"loss": "Loss", "lr": "Learning rate", "mem": "GPU memory (GiB)"}


class _Chart:
    def __init__(self, title: str) -> None:
        self.chart = QChart()
        self.chart.setTitle(title)
        self.chart.setMargins(QMargins(4, 4, 4, 4))
        self.chart.legend().setAlignment(Qt.AlignmentFlag.AlignBottom)
        self.chart.setTheme(QChart.ChartTheme.ChartThemeDark if theme.is_dark() else QChart.ChartTheme.ChartThemeLight)
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
        self.x_max = 1.0
        self.y_min = math.inf
        self.y_max = -math.inf
        self.ax.setRange(0, 1)
        self.ay.setRange(0, 1)

    def add_point(self, series: QXYSeries, x: float, y: float) -> None:
        series.append(x, y)
        self.x_max = max(self.x_max, x)
        self.y_min, self.y_max = min(self.y_min, y), max(self.y_max, y)
        pad = (self.y_max - self.y_min) * 0.08 or abs(self.y_max) * 0.1 or 1.0
        self.ax.setRange(0, self.x_max)
        self.ay.setRange(self.y_min - pad if self.y_min - pad > 0 or self.y_min < 0 else 0, self.y_max + pad)
        self.ay.applyNiceNumbers()  # round tick values, so labels never repeat


class LossPlot(QWidget):
    """Three small charts side by side (loss, learning rate, GPU memory)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        self.charts = {key: _Chart(title) for key, title in CHARTS.items()}
        for i, c in enumerate(self.charts.values()):
            grid.addWidget(c.view, 0, i)
            grid.setColumnStretch(i, 2 if i == 0 else 1)
        self.series: dict[str, QXYSeries] = {}
        self.points: dict[str, list[tuple[int, float]]] = {}

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
            chart.chart.legend().setVisible(key == "loss")
        return chart, s

    def on_metric(self, name: str, value: float, step: int) -> None:
        """Slot for ``StageWorker.metric``: add one point if the metric is plotted."""
        if not math.isfinite(value):
            return
        found = self._series(name)
        if found is None:
            return
        chart, s = found
        self.points.setdefault(name, []).append((step, value))
        chart.add_point(s, float(step), float(value))

    def clear(self) -> None:
        for s in self.series.values():
            s.clear()
        self.points.clear()
        for c in self.charts.values():
            c.x_max, c.y_min, c.y_max = 1.0, math.inf, -math.inf
