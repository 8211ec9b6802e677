"""Light and dark appearance following the system (``QStyleHints.colorScheme``).

The Fusion style gets a palette matching the scheme; charts read :func:`is_dark` to pick their
theme. A change of the system scheme while the app runs re-applies the palette.
"""

from __future__ import annotations

from importlib import resources

from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QColor, QGuiApplication, QPainter, QPalette, QPen
from PySide6.QtWidgets import QApplication, QProxyStyle, QStyle, QStyleOption, QWidget

ACCENT = QColor("#3b82f6")
DARK_INDICATOR_EDGE = QColor("#9a9ca3")
"""The edge of check boxes and radio buttons on a dark palette: Fusion draws it as the window colour
darkened, which on a dark window is the colour of the box itself (unchecked boxes vanished)."""


class VisibleIndicators(QProxyStyle):
    """Fusion, with a light edge around check boxes and radio buttons when the palette is dark."""

    def drawPrimitive(self, element: QStyle.PrimitiveElement, option: QStyleOption, painter: QPainter,
                      widget: QWidget | None = None) -> None:
        super().drawPrimitive(element, option, painter, widget)
        radio = element == QStyle.PrimitiveElement.PE_IndicatorRadioButton
        if not (radio or element == QStyle.PrimitiveElement.PE_IndicatorCheckBox) \
                or not palette_is_dark(option.palette):
            return
        painter.save()
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, True)
        painter.setPen(QPen(DARK_INDICATOR_EDGE, 1.0))
        painter.setBrush(Qt.BrushStyle.NoBrush)
        rect = QRectF(option.rect).adjusted(0.5, 0.5, -1.5, -1.5)
        if radio:
            painter.drawEllipse(rect)
        else:
            painter.drawRect(rect)
        painter.restore()


def is_dark() -> bool:
    """Whether the system asks for a dark appearance (its colour scheme; when it names none, its palette)."""
    app = QGuiApplication.instance()
    if app is None:
        return False
    scheme = QGuiApplication.styleHints().colorScheme()
    if scheme == Qt.ColorScheme.Unknown:
        return palette_is_dark(QGuiApplication.palette())
    return bool(scheme == Qt.ColorScheme.Dark)


def palette_is_dark(palette: QPalette) -> bool:
    """Whether ``palette`` draws light text on a dark window (widgets such as the charts follow it)."""
    return palette.color(QPalette.ColorRole.Window).lightness() < palette.color(QPalette.ColorRole.WindowText).lightness()


def dark_palette() -> QPalette:
    p = QPalette()
    base, window, text = QColor("#1e1f22"), QColor("#2b2d31"), QColor("#e6e6e6")
    for role, color in (
        (QPalette.ColorRole.Window, window), (QPalette.ColorRole.WindowText, text),
        (QPalette.ColorRole.Base, base), (QPalette.ColorRole.AlternateBase, window),
        (QPalette.ColorRole.ToolTipBase, window), (QPalette.ColorRole.ToolTipText, text),
        (QPalette.ColorRole.Text, text), (QPalette.ColorRole.Button, window),
        (QPalette.ColorRole.ButtonText, text), (QPalette.ColorRole.Highlight, ACCENT),
        (QPalette.ColorRole.HighlightedText, QColor("#ffffff")), (QPalette.ColorRole.Link, ACCENT.lighter()),
        (QPalette.ColorRole.PlaceholderText, QColor("#8a8a8a")),
    ):
        p.setColor(role, color)
    p.setColor(QPalette.ColorGroup.Disabled, QPalette.ColorRole.Text, QColor("#777777"))
    p.setColor(QPalette.ColorGroup.Disabled, QPalette.ColorRole.ButtonText, QColor("#777777"))
    return p


def stylesheet() -> str:
    return resources.files("emloc_app.resources").joinpath("style.qss").read_text(encoding="utf-8")


def apply_theme(app: QApplication) -> None:
    """Fusion style, the palette of the system scheme, the app stylesheet; follow later changes."""
    app.setStyle(VisibleIndicators("Fusion"))
    apply_palette(app, is_dark())
    QGuiApplication.styleHints().colorSchemeChanged.connect(lambda _scheme: apply_palette(app, is_dark()))


def light_palette(app: QApplication) -> QPalette:
    pal = app.style().standardPalette()
    pal.setColor(QPalette.ColorRole.Highlight, ACCENT)
    return pal


def apply_palette(app: QApplication, dark: bool) -> None:
    """The dark or light palette for every widget, the stylesheet applied again on top.

    Widgets already polished under a stylesheet keep the palette they had then: without setting the
    stylesheet again, a change of theme while the app runs repainted only some of them (the pages
    stayed light in a dark theme).
    """
    app.setPalette(dark_palette() if dark else light_palette(app))
    app.setStyleSheet(stylesheet())
