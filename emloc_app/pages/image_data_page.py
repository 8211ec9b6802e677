"""The image dataset page (image models): a folder of photos, their captions editable, every problem listed.

The folder is scanned by the engine (:func:`emloc_engine.images.dataset.scan_image_folder`: every image
decoded, its caption read, unreadable / too-small images and orphan captions reported with a fix) in a
worker, which also makes the thumbnails (``QImage`` is safe off the GUI thread; ``QPixmap`` is made
here). Selecting a thumbnail shows the photo and its caption file's text; **Save caption** writes
``<image>.txt`` beside the image atomically (temp file + rename) and scans again. Captions are never
written into the model's folder (or anywhere under it): the page refuses that.

The text box holds the caption file as written; the line under it shows the caption training uses
(the trigger word put in front when missing, or the prompt for images without a file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import QSize, Qt
from PySide6.QtGui import QIcon, QImage, QImageReader, QPixmap
from PySide6.QtWidgets import (
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from emloc_app.pages.common import BasePage, choose_folder
from emloc_app.state import WizardState
from emloc_engine.core.atomic import write_text_atomic
from emloc_engine.core.errors import ConfigError
from emloc_engine.core.progress import Progress
from emloc_engine.images.dataset import ImageFolderConfig, ImageFolderReport, add_trigger, scan_image_folder

THUMB_PX = 120
PREVIEW_PX = 320


@dataclass(frozen=True)
class ImageScan:
    """What the worker hands the page: the engine's report and a thumbnail per usable image."""

    report: ImageFolderReport
    thumbs: dict[Path, QImage] = field(default_factory=dict)


def thumbnail(path: Path, px: int = THUMB_PX) -> QImage:
    """The image scaled to fit ``px`` × ``px`` (decoded at that size where the format allows)."""
    reader = QImageReader(str(path))
    reader.setAutoTransform(True)
    size = reader.size()
    if size.isValid() and max(size.width(), size.height()) > px:
        reader.setScaledSize(size.scaled(px, px, Qt.AspectRatioMode.KeepAspectRatio))
    return reader.read()


def scan_with_thumbnails(cfg: ImageFolderConfig, progress: Progress) -> ImageScan:
    """Scan the folder (engine) and make the thumbnails; runs in the worker thread."""
    progress.update(0.1, "Reading every image…")
    report = scan_image_folder(cfg)
    thumbs: dict[Path, QImage] = {}
    for i, item in enumerate(report.items):
        progress.check_cancelled()
        thumbs[item.path] = thumbnail(item.path)
        progress.update(0.5 + 0.5 * (i + 1) / max(1, len(report.items)), "Thumbnails…")
    return ImageScan(report, thumbs)


def caption_file(image: Path) -> Path:
    return image.with_suffix(".txt")


class ImageDataPage(BasePage):
    """Step 3 for image models: the subject's photos, their captions, and what is wrong with them."""

    def __init__(self, state: WizardState, parent: QWidget | None = None) -> None:
        super().__init__(state, parent)
        self.setTitle("Your photos")
        self.setSubTitle("A folder of photos of one subject, captions beside them as .txt files.")
        self.scan: ImageScan | None = None
        form = QFormLayout()
        row = QHBoxLayout()
        self.folder = QLineEdit()
        self.folder.setPlaceholderText("Folder with your photos (PNG, JPEG, WebP)")
        self.folder.editingFinished.connect(self.start_scan)
        browse = QPushButton("Choose folder…")
        browse.clicked.connect(self._browse)
        row.addWidget(self.folder, 1)
        row.addWidget(browse)
        form.addRow("Photos", row)
        self.trigger = QLineEdit()
        self.trigger.setPlaceholderText("e.g. sks")
        self.trigger.setToolTip(ImageFolderConfig.__dataclass_fields__["trigger"].metadata["help"])
        self.trigger.editingFinished.connect(self.start_scan)
        form.addRow("Trigger word", self.trigger)
        self.prompt = QLineEdit()
        self.prompt.setPlaceholderText("e.g. a photo of sks dog (used for photos without a .txt)")
        self.prompt.setToolTip(ImageFolderConfig.__dataclass_fields__["prompt"].metadata["help"])
        self.prompt.editingFinished.connect(self.start_scan)
        form.addRow("Caption for the rest", self.prompt)
        self.body.addLayout(form)
        self.summary = QLabel("No folder chosen yet.")
        self.summary.setWordWrap(True)
        self.body.addWidget(self.summary)

        self.thumbs = QListWidget()
        self.thumbs.setObjectName("imageThumbs")
        self.thumbs.setViewMode(QListWidget.ViewMode.IconMode)
        self.thumbs.setIconSize(QSize(THUMB_PX, THUMB_PX))
        self.thumbs.setResizeMode(QListWidget.ResizeMode.Adjust)
        self.thumbs.setMovement(QListWidget.Movement.Static)
        self.thumbs.setSpacing(6)
        self.thumbs.currentItemChanged.connect(self._selected)
        right = QWidget()
        rv = QVBoxLayout(right)
        rv.setContentsMargins(0, 0, 0, 0)
        self.photo = QLabel()
        self.photo.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.photo.setMinimumHeight(200)
        self.caption = QPlainTextEdit()
        self.caption.setObjectName("captionEdit")
        self.caption.setPlaceholderText("Caption of the selected photo (saved as a .txt beside it)")
        self.caption.setMaximumHeight(90)
        self.caption.textChanged.connect(self._caption_edited)
        self.trained_as = QLabel()
        self.trained_as.setWordWrap(True)
        self.trained_as.setObjectName("PageHint")
        self.save = QPushButton("Save caption")
        self.save.setEnabled(False)
        self.save.clicked.connect(self.save_caption)
        rv.addWidget(self.photo, 1)
        rv.addWidget(self.caption)
        rv.addWidget(self.trained_as)
        rv.addWidget(self.save, 0, Qt.AlignmentFlag.AlignRight)
        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.addWidget(self.thumbs)
        splitter.addWidget(right)
        splitter.setSizes([560, 400])
        self.body.addWidget(splitter, 1)

        self.problems = QTableWidget(0, 3)
        self.problems.setObjectName("imageProblems")
        self.problems.setHorizontalHeaderLabels(["File", "Kind", "Problem and fix"])
        self.problems.verticalHeader().hide()
        header = self.problems.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        self.problems.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.problems.setMaximumHeight(150)
        self.problems.hide()
        self.body.addWidget(self.problems)

    # -- state in / out ------------------------------------------------------------------------
    def initializePage(self) -> None:
        s = self.state
        self.folder.setText(str(s.image_folder) if s.image_folder else "")
        self.trigger.setText(s.image_trigger)
        self.prompt.setText(s.image_prompt)
        if s.image_report is not None and s.image_folder == s.image_report.folder:
            self._show(ImageScan(s.image_report, {i.path: thumbnail(i.path) for i in s.image_report.items}))
        elif s.image_folder is not None:
            self.start_scan()

    def isComplete(self) -> bool:
        return self.scan is not None and self.scan.report.ok and not self.busy("scan")

    def validatePage(self) -> bool:
        if self.scan is None:
            return False
        self.state.image_folder = self.scan.report.folder
        self.state.image_trigger = self.trigger.text().strip()
        self.state.image_prompt = self.prompt.text().strip()
        self.state.image_report = self.scan.report
        return True

    def nextId(self) -> int:
        from emloc_app.wizard import Page

        return int(Page.Plan)

    # -- scanning --------------------------------------------------------------------------------
    def config(self) -> ImageFolderConfig:
        return ImageFolderConfig(
            Path(self.folder.text().strip()).expanduser(),
            trigger=self.trigger.text().strip(),
            prompt=self.prompt.text().strip(),
        )

    def start_scan(self) -> None:
        if not self.folder.text().strip():
            return
        try:
            cfg = self.config()
        except ConfigError as exc:
            self.banner.show_error(exc, retry=False)
            return
        self.summary.setText("Reading the photos…")
        self.run_task("scan", scan_with_thumbnails, cfg, self._show)
        self.completeChanged.emit()

    def _show(self, scan: ImageScan) -> None:
        keep = self.selected_path()
        self.scan = scan
        r = scan.report
        self.state.image_report = r
        self.state.image_folder = r.folder
        errors = sum(p.severity == "error" for p in r.problems)
        self.summary.setText(
            f"{len(r.items)} usable photo(s) in {r.folder}"
            + (f"; {errors} problem(s) to fix first." if errors else ".")
            + ("" if r.ok or errors else " Add at least one photo.")
        )
        self.thumbs.clear()
        for item in r.items:
            image = scan.thumbs.get(item.path)
            icon = QIcon(QPixmap.fromImage(image)) if image is not None and not image.isNull() else QIcon()
            li = QListWidgetItem(icon, item.path.name)
            li.setData(Qt.ItemDataRole.UserRole, str(item.path))
            li.setToolTip(f"{item.path.name} · {item.width}×{item.height}\n{item.caption}")
            self.thumbs.addItem(li)
            if keep is not None and item.path == keep:
                self.thumbs.setCurrentItem(li)
        if self.thumbs.currentItem() is None and self.thumbs.count():
            self.thumbs.setCurrentRow(0)
        self.problems.setRowCount(len(r.problems))
        for i, p in enumerate(r.problems):
            where = QTableWidgetItem(p.path.name)
            where.setToolTip(str(p.path))
            self.problems.setItem(i, 0, where)
            self.problems.setItem(i, 1, QTableWidgetItem(p.severity))
            self.problems.setItem(i, 2, QTableWidgetItem(f"{p.message} Fix: {p.fix}"))
        self.problems.setVisible(bool(r.problems))
        self.completeChanged.emit()

    # -- captions --------------------------------------------------------------------------------
    def selected_path(self) -> Path | None:
        item = self.thumbs.currentItem()
        return Path(item.data(Qt.ItemDataRole.UserRole)) if item is not None else None

    def _selected(self, current: QListWidgetItem | None, _previous: QListWidgetItem | None = None) -> None:
        path = self.selected_path() if current is not None else None
        if path is None:
            self.photo.clear()
            self.caption.setPlainText("")
            return
        self.photo.setPixmap(QPixmap.fromImage(thumbnail(path, PREVIEW_PX)))
        txt = caption_file(path)
        self.caption.blockSignals(True)
        self.caption.setPlainText(txt.read_text(encoding="utf-8").strip() if txt.is_file() else "")
        self.caption.blockSignals(False)
        self.save.setEnabled(False)
        self._show_trained_as(path)

    def _show_trained_as(self, path: Path) -> None:
        item = next((i for i in self.scan.report.items if i.path == path), None) if self.scan else None
        self.trained_as.setText(f"Trained as: “{item.caption}”" if item else "")

    def _caption_edited(self) -> None:
        self.save.setEnabled(self.selected_path() is not None)
        text = " ".join(self.caption.toPlainText().split()) or self.prompt.text().strip()
        self.trained_as.setText(f"Trained as: “{add_trigger(text, self.trigger.text().strip())}”")

    def save_caption(self) -> None:
        """Write the caption beside the selected photo (atomically), then scan again."""
        path = self.selected_path()
        if path is None:
            return
        target = caption_file(path)
        model = self.state.pipeline_folder
        if model is not None and target.resolve().is_relative_to(Path(model).resolve()):
            self.on_task_failed(
                "caption",
                ConfigError(
                    f"{target} is inside the model's folder; captions are never written there.",
                    hint="Copy your photos to a folder of their own and choose that folder.",
                ),
                retry=False,
            )
            return
        write_text_atomic(target, self.caption.toPlainText().strip() + "\n")
        self.save.setEnabled(False)
        self.start_scan()

    def _browse(self) -> None:
        if choose_folder(self, "Choose the folder with your photos", self.folder):
            self.start_scan()

    def retry(self) -> None:
        self.banner.clear()
        self.start_scan()
