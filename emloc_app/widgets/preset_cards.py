"""The Plan page's first choice: one card per preset, each with its predicted time and memory.

The presets are the engine's (:data:`~emloc_engine.run.presets.PRESETS`); the page fills in each card's
prediction (:class:`PresetEstimate`) and hears which card the user picked (``chosen``). When the
settings under "Advanced" match no preset, no card is checked and a line says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QButtonGroup, QFrame, QHBoxLayout, QLabel, QRadioButton, QVBoxLayout, QWidget

from emloc_engine.run.presets import PRESETS

GIB = 1024**3


def rough_duration(seconds: float) -> str:
    """A duration as people say it: "under a minute", "about 12 min", "about 2 h 10 min"."""
    minutes = round(seconds / 60)
    if minutes < 1:
        return "under a minute"
    if minutes < 60:
        return f"about {minutes} min"
    hours, rest = divmod(minutes, 60)
    return f"about {hours} h {rest} min" if rest else f"about {hours} h"


@dataclass(frozen=True)
class PresetEstimate:
    """What one preset is predicted to take (None fields: could not be planned)."""

    seconds: float | None
    peak_bytes: int | None
    left_free_bytes: int | None
    fits: bool
    memory_word: str = "GPU memory"  # "RAM" on the CPU
    ratio: float | None = None  # ρ: what share of each layer the emulator keeps

    def text(self) -> str:
        """``"about 12 min · 18.2 GiB of GPU memory · leaves 3.8 GiB free · keeps 40% of each layer"``.

        The share kept is shown because a preset with a larger adapter can leave less room for the
        emulator within the same budget (the planner then keeps less of each layer).
        """
        if self.seconds is None or self.peak_bytes is None:
            return "does not fit this budget"
        parts = [rough_duration(self.seconds), f"{self.peak_bytes / GIB:.1f} GiB of {self.memory_word}"]
        if self.left_free_bytes is not None:
            parts.append(f"leaves {max(0, self.left_free_bytes) / GIB:.1f} GiB free")
        if self.ratio is not None:
            parts.append(f"keeps {self.ratio:.0%} of each layer")
        return " · ".join(parts) + ("" if self.fits else " · over the budget")


class PresetCards(QWidget):
    """Faster · Balanced · Best quality, side by side; ``chosen(name)`` when the user picks one."""

    chosen = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.group = QButtonGroup(self)
        self.group.setExclusive(False)  # so that "none checked" (custom settings) can be shown
        self.buttons: dict[str, QRadioButton] = {}
        self.estimates: dict[str, QLabel] = {}
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        for p in PRESETS:
            card = QFrame()
            card.setObjectName("PresetCard")
            card.setFrameShape(QFrame.Shape.StyledPanel)
            lay = QVBoxLayout(card)
            button = QRadioButton(p.title)
            button.setObjectName(f"preset_{p.name}")
            button.setStyleSheet("font-weight: bold")
            button.clicked.connect(lambda _checked=False, name=p.name: self._clicked(name))
            summary = QLabel(p.summary)
            summary.setWordWrap(True)
            summary.setObjectName("PageHint")
            estimate = QLabel("…")
            estimate.setWordWrap(True)
            estimate.setObjectName(f"estimate_{p.name}")
            lay.addWidget(button)
            lay.addWidget(summary)
            lay.addWidget(estimate)
            lay.addStretch(1)
            self.group.addButton(button)
            self.buttons[p.name] = button
            self.estimates[p.name] = estimate
            row.addWidget(card, 1)
        self.custom = QLabel("Custom settings (changed under Advanced); pick a preset to go back to one.")
        self.custom.setObjectName("PageHint")
        self.custom.hide()
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addLayout(row)
        outer.addWidget(self.custom)

    def _clicked(self, name: str) -> None:
        self.set_current(name)
        self.chosen.emit(name)

    def set_current(self, name: str | None) -> None:
        """Check ``name``'s card (None: custom settings, no card checked)."""
        for n, b in self.buttons.items():
            b.setChecked(n == name)
        self.custom.setVisible(name is None)

    def current(self) -> str | None:
        return next((n for n, b in self.buttons.items() if b.isChecked()), None)

    def set_estimate(self, name: str, estimate: PresetEstimate) -> None:
        self.estimates[name].setText(estimate.text())
