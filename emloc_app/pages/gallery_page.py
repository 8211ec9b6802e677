"""The gallery (image runs, in place of the Try page): sample images per training step, and the export.

Training writes ``RUN/samples/step-N/*.png`` every N steps (one image per sample prompt). The page
lists the steps (newest first) and shows the chosen step's images large; it looks for new steps every
two seconds while shown, and follows the newest step unless the user picked an older one. A step's
``prompts.txt`` (one line per image, in file-name order), when present, gives each image its tooltip.

Export: the run's adapter (``adapter-corrected``, else ``adapter``) as the formats ticked, through
:func:`emloc_engine.images.export.export_image_lora` in a worker (every output read back and checked).
"""

from __future__ import annotations

import re
from pathlib import Path

from PySide6.QtCore import QSize, Qt, QTimer
from PySide6.QtGui import QHideEvent, QIcon, QPixmap, QShowEvent
from PySide6.QtWidgets import (
    QCheckBox,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from emloc_app.pages.common import BasePage
from emloc_app.state import WizardState
from emloc_engine.images import export as image_export
from emloc_engine.images.export import IMAGE_EXPORT_FORMATS, ImageExportConfig, ImageExportResult

IMAGE_PX = 256
POLL_MS = 2000
_STEP = re.compile(r"step-(\d+)$")
FORMAT_LABELS = {
    "diffusers": "LoRA for diffusers / ComfyUI",
    "kohya": "LoRA in kohya naming (A1111, Forge, ComfyUI)",
    "merged": "Whole pipeline with the LoRA merged in",
}


def sample_steps(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``RUN/samples/step-N`` holding at least one PNG, newest first."""
    root = Path(run_dir) / "samples"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP.match(d.name)
        if m and d.is_dir() and any(d.glob("*.png")):
            found.append((int(m.group(1)), d))
    return sorted(found, reverse=True)


def step_images(folder: Path) -> list[tuple[Path, str]]:
    """The PNGs of one step in name order, each with its prompt (from ``prompts.txt``) or ``""``."""
    images = sorted(folder.glob("*.png"))
    prompts_file = folder / "prompts.txt"
    prompts = prompts_file.read_text(encoding="utf-8").splitlines() if prompts_file.is_file() else []
    return [(p, prompts[i] if i < len(prompts) else "") for i, p in enumerate(images)]


def run_adapter(run_dir: Path) -> Path | None:
    """The adapter an export uses: the corrected one when the run has it."""
    for name in ("adapter-corrected", "adapter"):
        if (Path(run_dir) / name / "adapter_config.json").is_file():
            return Path(run_dir) / name
    return None


class GalleryPage(BasePage):
    """Last step for image runs: what the model draws as it trains, and the LoRA for image tools."""

    def __init__(self, state: WizardState, parent: QWidget | None = None) -> None:
        super().__init__(state, parent)
        self.setTitle("Gallery")
        self.setSubTitle("Sample images from your prompts, every few training steps.")
        self.steps = QListWidget()
        self.steps.setObjectName("sampleSteps")
        self.steps.setMaximumWidth(180)
        self.steps.currentItemChanged.connect(self._step_chosen)
        self.images = QListWidget()
        self.images.setObjectName("sampleImages")
        self.images.setViewMode(QListWidget.ViewMode.IconMode)
        self.images.setIconSize(QSize(IMAGE_PX, IMAGE_PX))
        self.images.setResizeMode(QListWidget.ResizeMode.Adjust)
        self.images.setMovement(QListWidget.Movement.Static)
        self.images.setWordWrap(True)
        self.images.setSpacing(8)
        self.empty = QLabel("No sample images yet: they appear here while the run trains.")
        self.empty.setObjectName("PageHint")
        right = QWidget()
        rv = QVBoxLayout(right)
        rv.setContentsMargins(0, 0, 0, 0)
        rv.addWidget(self.empty)
        rv.addWidget(self.images, 1)
        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.addWidget(self.steps)
        splitter.addWidget(right)
        splitter.setSizes([160, 800])
        self.body.addWidget(splitter, 1)
        self.body.addWidget(self._export_box())
        self._follow_newest = True
        self._shown: list[int] = []
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self.refresh)
        self.export_result: ImageExportResult | None = None

    def _export_box(self) -> QGroupBox:
        box = QGroupBox("Export the LoRA")
        lay = QVBoxLayout(box)
        row = QHBoxLayout()
        self.format_boxes: dict[str, QCheckBox] = {}
        for fmt in IMAGE_EXPORT_FORMATS:
            cb = QCheckBox(FORMAT_LABELS[fmt])
            cb.setChecked(fmt != "merged")
            self.format_boxes[fmt] = cb
            row.addWidget(cb)
        row.addStretch(1)
        self.export_button = QPushButton("Export")
        self.export_button.clicked.connect(self.start_export)
        row.addWidget(self.export_button)
        lay.addLayout(row)
        self.export_bar = QProgressBar()
        self.export_bar.setRange(0, 1000)
        self.export_bar.hide()
        self.export_status = QLabel("")
        self.export_status.setWordWrap(True)
        self.export_status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(self.export_bar)
        lay.addWidget(self.export_status)
        return box

    # -- lifecycle -------------------------------------------------------------------------------
    def initializePage(self) -> None:
        self._offer_formats()
        self._follow_newest = True
        self._shown = []
        self.steps.clear()
        self.refresh()
        self._timer.start()

    def cleanupPage(self) -> None:
        self._timer.stop()

    def hideEvent(self, event: QHideEvent) -> None:
        self._timer.stop()
        super().hideEvent(event)

    def showEvent(self, event: QShowEvent) -> None:
        if self.state.run_dir is not None:
            self._timer.start()
        super().showEvent(event)

    def nextId(self) -> int:
        return -1

    def _offer_formats(self) -> None:
        """SD3 has no kohya naming (the diffusers file is what ComfyUI/Forge load for it): not offered."""
        folder = self.state.pipeline_folder
        index = folder / "model_index.json" if folder is not None else None
        text = index.read_text(encoding="utf-8") if index is not None and index.is_file() else ""
        sd3 = '"StableDiffusion3Pipeline"' in text
        kohya = self.format_boxes["kohya"]
        kohya.setEnabled(not sd3)
        kohya.setChecked(not sd3)
        kohya.setToolTip(
            "SD3 LoRAs load in ComfyUI and Forge in the diffusers naming; no kohya file is written."
            if sd3
            else ""
        )

    # -- samples ---------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Pick up new steps; keep the user's choice unless they follow the newest."""
        run = self.state.run_dir
        found = sample_steps(run) if run is not None else []
        steps = [s for s, _ in found]
        self.empty.setVisible(not found)
        if steps == self._shown:
            return
        chosen = self.current_step()
        self._shown = steps
        self.steps.blockSignals(True)
        self.steps.clear()
        for step, folder in found:
            item = QListWidgetItem(f"step {step}  ({len(list(folder.glob('*.png')))})")
            item.setData(Qt.ItemDataRole.UserRole, str(folder))
            item.setData(Qt.ItemDataRole.UserRole + 1, step)
            self.steps.addItem(item)
        self.steps.blockSignals(False)
        row = 0 if self._follow_newest or chosen not in steps else steps.index(chosen)
        if found:
            self.steps.setCurrentRow(row)
            self._show_step(Path(found[row][1]))

    def current_step(self) -> int | None:
        item = self.steps.currentItem()
        return int(item.data(Qt.ItemDataRole.UserRole + 1)) if item is not None else None

    def _step_chosen(self, current: QListWidgetItem | None, _prev: QListWidgetItem | None = None) -> None:
        if current is None:
            return
        self._follow_newest = self.steps.row(current) == 0
        self._show_step(Path(current.data(Qt.ItemDataRole.UserRole)))

    def _show_step(self, folder: Path) -> None:
        self.images.clear()
        for path, prompt in step_images(folder):
            pix = QPixmap(str(path))
            if not pix.isNull() and max(pix.width(), pix.height()) > IMAGE_PX:
                pix = pix.scaled(
                    IMAGE_PX,
                    IMAGE_PX,
                    Qt.AspectRatioMode.KeepAspectRatio,
                    Qt.TransformationMode.SmoothTransformation,
                )
            item = QListWidgetItem(QIcon(pix), prompt or path.stem)
            item.setToolTip(f"{path}\n{prompt}" if prompt else str(path))
            self.images.addItem(item)

    # -- export ----------------------------------------------------------------------------------
    def export_config(self) -> ImageExportConfig | None:
        s = self.state
        adapter = run_adapter(s.run_dir) if s.run_dir is not None else None
        folder = s.pipeline_folder
        if s.run_dir is None or folder is None or adapter is None:
            self.export_status.setText("This run has no trained adapter yet.")
            return None
        formats = tuple(f for f, cb in self.format_boxes.items() if cb.isChecked())
        # a single-file checkpoint: its pipeline folder's text encoders and VAE, the file's denoiser as the
        # run converted it once (RUN/denoiser), so the merge and the read-back use the weights trained on
        denoiser = Path(s.run_dir) / "denoiser" if s.single_file is not None else None
        return ImageExportConfig(
            folder,
            adapter,
            Path(s.run_dir) / "export",
            formats=formats,
            denoiser_dir=denoiser,
            name=Path(s.run_dir).name,
        )

    def start_export(self) -> None:
        cfg = self.export_config()
        if cfg is None:
            return
        self.export_button.setEnabled(False)
        self.export_bar.setValue(0)
        self.export_bar.show()
        self.export_status.setText("Writing and checking each file…")
        self.run_task(
            "export", image_export.export_image_lora, cfg, self._exported, on_progress=self._progress
        )

    def _progress(self, fraction: float, message: str) -> None:
        self.export_bar.setValue(int(fraction * 1000))
        if message:
            self.export_status.setText(message)

    def _exported(self, result: ImageExportResult) -> None:
        self.export_result = result
        lines = [
            f"{label}: {path}"
            for label, path in (
                ("diffusers", result.diffusers_file),
                ("kohya", result.kohya_file),
                ("merged", result.merged_dir),
            )
            if path is not None
        ]
        checked = ", ".join(c.what for c in result.checks)
        self.export_status.setText(
            "\n".join(lines) + (f"\nChecked by loading back: {checked}." if checked else "")
        )

    def task_finished(self, name: str) -> None:
        if name == "export":
            self.export_button.setEnabled(True)
            self.export_bar.hide()
        super().task_finished(name)
