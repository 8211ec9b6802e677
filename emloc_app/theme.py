"""Light and dark appearance following the system (``QStyleHints.colorScheme``).

The Fusion style gets a palette matching the scheme; charts read :func:`is_dark` to pick their
theme. A change of the system scheme while the app runs re-applies the palette.
"""

from __future__ import annotations

from importlib import resources

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QGuiApplication, QPalette
from PySide6.QtWidgets import QApplication

ACCENT = QColor("#3b82f6")


def is_dark() -> bool:
    """Whether the system asks for a dark appearance."""
    app = QGuiApplication.instance()
    if app is None:
        return False
    hints = QGuiApplication.styleHints()
    return bool(hints.colorScheme() == Qt.ColorScheme.Dark)


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
    app.setStyle("Fusion")
    _apply_palette(app)
    app.setStyleSheet(stylesheet())
    QGuiApplication.styleHints().colorSchemeChanged.connect(lambda _scheme: _apply_palette(app))


def _apply_palette(app: QApplication) -> None:
    if is_dark():
        app.setPalette(dark_palette())
    else:
        pal = app.style().standardPalette()
        pal.setColor(QPalette.ColorRole.Highlight, ACCENT)
        app.setPalette(pal)
