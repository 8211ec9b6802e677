"""Two (or more) runs' loss curves on one chart: train loss as a line, eval loss as dots, one colour per run."""

from __future__ import annotations

import math

from PySide6.QtCharts import QChart, QChartView, QLineSeries, QScatterSeries, QValueAxis
from PySide6.QtCore import QMargins, Qt
from PySide6.QtGui import QColor, QPainter, QPen
from PySide6.QtWidgets import QSizePolicy

from emloc_app import theme

COLORS = ("#3b82f6", "#ef4444", "#10b981", "#a855f7")


def nice_step(span: float, max_ticks: int = 8) -> float:
    """The smallest of 1, 2, 5 × 10ᵏ (at least 1: steps are whole) giving at most ``max_ticks`` intervals."""
    magnitude = 10 ** math.floor(math.log10(max(span / max_ticks, 1.0)))
    return float(next(m * magnitude for m in (1, 2, 5, 10) if span / (m * magnitude) <= max_ticks))


class ComparePlot(QChartView):
    """``show_runs([(label, {"train/loss": [(step, value)], "eval/loss": [...]})])`` draws them on one chart."""

    def __init__(self) -> None:
        self._chart = QChart()
        super().__init__(self._chart)
        self._chart.setTitle("Loss")
        self._chart.setMargins(QMargins(4, 4, 4, 4))
        self._chart.legend().setAlignment(Qt.AlignmentFlag.AlignBottom)
        self._chart.setTheme(
            QChart.ChartTheme.ChartThemeDark if theme.is_dark() else QChart.ChartTheme.ChartThemeLight
        )
        self.ax, self.ay = QValueAxis(), QValueAxis()
        self.ax.setTitleText("step")
        self.ax.setLabelFormat("%d")
        self.ay.setLabelFormat("%.3g")
        self._chart.addAxis(self.ax, Qt.AlignmentFlag.AlignBottom)
        self._chart.addAxis(self.ay, Qt.AlignmentFlag.AlignLeft)
        self.setRenderHint(QPainter.RenderHint.Antialiasing)
        self.setMinimumHeight(220)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.labels: list[str] = []  # series names shown, in order (for tests and screen readers)

    def show_runs(self, runs: list[tuple[str, dict[str, list[tuple[int, float]]]]]) -> None:
        self._chart.removeAllSeries()
        self.labels = []
        xs: list[float] = []
        ys: list[float] = []
        for i, (label, curves) in enumerate(runs):
            color = QColor(COLORS[i % len(COLORS)])
            for name, scatter in (("train/loss", False), ("eval/loss", True)):
                points = [(s, v) for s, v in curves.get(name, []) if math.isfinite(v)]
                if not points:
                    continue
                if scatter:
                    dots = QScatterSeries()
                    dots.setMarkerSize(8.0)
                    dots.setColor(color)
                    series: QLineSeries | QScatterSeries = dots
                else:
                    line = QLineSeries()
                    line.setPen(QPen(color, 2))
                    series = line
                series.setName(f"{label} · {'eval' if scatter else 'train'}")
                for s, v in points:
                    series.append(float(s), float(v))
                    xs.append(float(s))
                    ys.append(float(v))
                self._chart.addSeries(series)
                series.attachAxis(self.ax)
                series.attachAxis(self.ay)
                self.labels.append(series.name())
        if xs:
            x_max = max(max(xs), 1.0)
            step = nice_step(x_max)
            self.ax.setTickType(QValueAxis.TickType.TicksDynamic)  # whole steps: labels never repeat
            self.ax.setTickAnchor(0.0)
            self.ax.setTickInterval(step)
            self.ax.setRange(0, math.ceil(x_max / step) * step)
            pad = (max(ys) - min(ys)) * 0.08 or abs(max(ys)) * 0.1 or 1.0
            self.ay.setRange(max(0.0, min(ys) - pad) if min(ys) >= 0 else min(ys) - pad, max(ys) + pad)
            self.ay.applyNiceNumbers()
