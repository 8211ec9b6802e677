"""Render ``resources/emloc-studio.svg`` to ``resources/emloc-studio.png`` (256 px) with Qt's SVG renderer.

Run after editing the SVG: ``QT_QPA_PLATFORM=offscreen python packaging/render_icon.py [SIZE]``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def render(svg: Path, png: Path, size: int) -> None:
    """Draw ``svg`` into a transparent ``size``×``size`` PNG."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QGuiApplication, QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])
    renderer = QSvgRenderer(str(svg))
    if not renderer.isValid():
        raise SystemExit(f"{svg} is not a valid SVG")
    image = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    renderer.render(painter)
    painter.end()
    if not image.save(str(png), "PNG"):
        raise SystemExit(f"could not write {png}")
    del app


if __name__ == "__main__":
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    render(ROOT / "resources" / "emloc-studio.svg", ROOT / "resources" / "emloc-studio.png", size)
    print(f"wrote resources/emloc-studio.png ({size} px)")
