"""Memory bars: inference and each EMLoC stage against the budget (a painted widget, no charts)."""

from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtCore import QRectF, QSize, Qt
from PySide6.QtGui import QColor, QFontMetrics, QPainter, QPaintEvent, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from emloc_engine.run.planning import MemoryPlan

GIB = 1024**3
OK_COLOR, OVER_COLOR, REF_COLOR = QColor("#22a06b"), QColor("#d9534f"), QColor("#8c8c8c")


@dataclass(frozen=True)
class MemoryRow:
    """One bar: a label, peak bytes, and the parts it is made of (for the tooltip)."""

    label: str
    peak_bytes: int
    parts: tuple[tuple[str, int], ...] = ()
    reference: bool = False  # drawn grey: for comparison only (e.g. LoRA on the full model)


def rows_from_plan(plan: MemoryPlan) -> list[MemoryRow]:
    """Bars for a ``MemoryPlan``: inference, each stage, and full-model LoRA for comparison."""
    inference = "Inference, whole model on the GPU" if plan.stream_original else "Inference (what you run today)"
    rows = [MemoryRow(inference, plan.inference_peak_bytes, plan.inference.parts)]
    names = {"emulator": "Build emulator", "train": "Train on emulator", "correct": "Correct LoRA",
             "export": "Merge & export"}
    # The emulator build always streams the original; elsewhere "streamed" is what a big model changes.
    rows += [MemoryRow(names.get(st.name, st.name.capitalize())
                       + (" (original streamed)" if st.streamed and st.name != "emulator" else ""),
                       st.peak_bytes, st.parts) for st in plan.stages]
    rows.append(MemoryRow("LoRA on the full model (no EMLoC)", plan.full_lora_peak_bytes, plan.full_lora.parts,
                          reference=True))
    return rows


class VramBar(QWidget):
    """Horizontal bars scaled to the largest value; a dashed line marks the budget."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.rows: list[MemoryRow] = []
        self.budget_bytes: int | None = None
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setMouseTracking(True)

    def set_rows(self, rows: list[MemoryRow], budget_bytes: int | None) -> None:
        self.rows = list(rows)
        self.budget_bytes = budget_bytes
        self.setToolTip(self._tooltip())
        self.updateGeometry()
        self.update()

    def set_plan(self, plan: MemoryPlan) -> None:
        self.set_rows(rows_from_plan(plan), plan.budget_bytes)

    def _row_height(self) -> int:
        return QFontMetrics(self.font()).height() + 10

    def sizeHint(self) -> QSize:
        return QSize(480, max(1, len(self.rows)) * self._row_height() + 22)

    def minimumSizeHint(self) -> QSize:
        return QSize(300, self.sizeHint().height())

    def over_budget(self) -> list[str]:
        """Labels of the non-reference bars that exceed the budget."""
        if not self.budget_bytes:
            return []
        return [r.label for r in self.rows if not r.reference and r.peak_bytes > self.budget_bytes]

    def _tooltip(self) -> str:
        lines = []
        for r in self.rows:
            lines.append(f"<b>{r.label}</b>: {r.peak_bytes / GIB:.2f} GiB")
            lines += [f"&nbsp;&nbsp;{a}: {b / GIB:.2f} GiB" for a, b in r.parts]
        return "<br>".join(lines)

    def paintEvent(self, event: QPaintEvent) -> None:
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        fm = QFontMetrics(self.font())
        label_w = max([fm.horizontalAdvance(r.label) for r in self.rows] + [60]) + 12
        value_w = fm.horizontalAdvance("000.00 GiB") + 8
        x0, x1 = label_w, max(label_w + 40, self.width() - value_w)
        top = 16
        scale_max = max([r.peak_bytes for r in self.rows] + [self.budget_bytes or 0, 1]) * 1.05
        rh = self._row_height()
        text_color = self.palette().windowText().color()
        for i, r in enumerate(self.rows):
            y = top + i * rh
            p.setPen(text_color)
            p.drawText(QRectF(0, y, label_w - 8, rh), Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter,
                       r.label)
            w = (x1 - x0) * r.peak_bytes / scale_max
            over = bool(self.budget_bytes) and r.peak_bytes > (self.budget_bytes or 0)
            color = REF_COLOR if r.reference else (OVER_COLOR if over else OK_COLOR)
            p.setPen(Qt.PenStyle.NoPen)
            p.setBrush(color)
            p.drawRoundedRect(QRectF(x0, y + 4, max(2.0, w), rh - 8), 3, 3)
            p.setPen(text_color)
            p.drawText(QRectF(x0 + w + 6, y, value_w + 40, rh), Qt.AlignmentFlag.AlignVCenter,
                       f"{r.peak_bytes / GIB:.2f} GiB")
        if self.budget_bytes:
            bx = x0 + (x1 - x0) * self.budget_bytes / scale_max
            pen = QPen(OVER_COLOR.darker(120), 1.5, Qt.PenStyle.DashLine)
            p.setPen(pen)
            p.drawLine(int(bx), top - 2, int(bx), top + len(self.rows) * rh)
            p.drawText(QRectF(bx - 150, 0, 300, 14), Qt.AlignmentFlag.AlignHCenter,
                       f"budget {self.budget_bytes / GIB:.1f} GiB")
        p.end()
