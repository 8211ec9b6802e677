"""Page 3: the training data: file, format, rendered preview, every problem with file:line, split."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QSize, Qt, QTimer
from PySide6.QtGui import QIcon, QPixmap
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from emloc_app.pages.common import BasePage, choose_folder
from emloc_app.state import WizardState
from emloc_engine.catalog.demo import DemoDataset, ensure_demo_datasets
from emloc_engine.core.progress import Progress
from emloc_engine.data import FORMATS, DataConfig, DataReport, inspect_dataset, load_tokenizer
from emloc_engine.data.config import DATA_DEFAULTS
from emloc_engine.data.images import is_image_dataset, preview_images
from emloc_engine.data.vision_pipeline import inspect_vision_dataset
from emloc_engine.run.options import option_help
from emloc_engine.vision.processor import load_processor

PREVIEWS = 8
THUMB_PX = 96

FILE_FILTER = "Datasets (*.jsonl *.json *.csv *.parquet *.txt);;All files (*)"


@dataclass(frozen=True)
class DataSettings:
    """The page's widgets: the :class:`~emloc_engine.data.DataConfig` fields the page sets.

    The path comes from the file box, the split's seed is the run's (``RunConfig.seed``, on the Plan page).
    """

    format: str = DATA_DEFAULTS.format
    max_length: int = DATA_DEFAULTS.max_length
    eval_fraction: float = DATA_DEFAULTS.eval_fraction
    train_on: str = DATA_DEFAULTS.train_on
    max_samples: int | None = DATA_DEFAULTS.max_samples

    def config(self, path: Path, seed: int = 0) -> DataConfig:
        """The engine's config for ``path`` (raises ``ConfigError`` for bad settings)."""
        return DataConfig(path=path, format=self.format, max_length=self.max_length,
                          eval_fraction=self.eval_fraction, train_on=self.train_on, seed=seed,
                          max_samples=self.max_samples)


@dataclass(frozen=True)
class InspectRequest:
    """What the inspection worker needs (a plain value: it crosses threads)."""

    model_dir: Path | None
    data_path: Path | None  # None: use the default demo dataset
    settings: DataSettings
    seed: int = 0


@dataclass(frozen=True)
class Inspection:
    data_path: Path
    config: DataConfig
    report: DataReport
    demo: tuple[DemoDataset, ...] = ()
    images: tuple[tuple[Path, ...], ...] = ()  # per previewed sample, its image files (image datasets)


def inspect(req: InspectRequest, progress: Progress) -> Inspection:
    """Load the model's tokenizer and check every sample of the file, rendered as the model will see it.

    The calibration samples are taken by the run itself (``RunConfig.calib``), from the same data.
    """
    demo: tuple[DemoDataset, ...] = ()
    path = req.data_path
    if path is None:
        progress.update(0.05, "Preparing the demo datasets…")
        demo = tuple(ensure_demo_datasets())
        default = next((d for d in demo if d.default), demo[0] if demo else None)
        if default is None:
            raise FileNotFoundError("no demo dataset")
        path = default.path
    config = req.settings.config(path, req.seed)
    if is_image_dataset(config):  # conversations with images: the model's processor renders them
        progress.update(0.2, "Loading the processor…")
        processor = load_processor(req.model_dir) if req.model_dir else None
        progress.update(0.4, "Checking every sample and image…")
        report = inspect_vision_dataset(config, processor)
        progress.update(1.0, "Done")
        return Inspection(path, config, report, demo, preview_images(config, PREVIEWS))
    progress.update(0.2, "Loading the tokenizer…")
    tokenizer = load_tokenizer(req.model_dir) if req.model_dir else None
    progress.check_cancelled()
    progress.update(0.4, "Checking every sample…")
    report = inspect_dataset(config, tokenizer)
    progress.update(1.0, "Done")
    return Inspection(path, config, report, demo)


class DataPage(BasePage):
    """Pick a dataset, see it rendered with the model's chat template, fix what is wrong."""

    def __init__(self, state: WizardState, parent: QWidget | None = None) -> None:
        super().__init__(state, parent)
        self.setTitle("Training data")
        self.setSubTitle("JSONL/JSON/CSV/Parquet files or Hugging Face datasets folders with messages, ShareGPT, Alpaca or prompt/completion "
                         "records, or plain text. Every problem is listed with its line before any training.")
        self.path = QLineEdit()
        self.path.setObjectName("path")
        self.path.setPlaceholderText("Dataset file, datasets folder or cached dataset name (the demo dataset when empty)")
        self.path.editingFinished.connect(self.schedule_inspect)
        self.browse = QPushButton("&Browse…")
        self.browse.clicked.connect(self._browse)
        self.browse_folder = QPushButton("Fol&der…")
        self.browse_folder.setObjectName("browse_folder")
        self.browse_folder.setToolTip("A Hugging Face datasets folder (save_to_disk) or a folder of Parquet/Arrow "
                                      "files. A dataset in your local datasets cache: type its name (org/name).")
        self.browse_folder.clicked.connect(self._browse_folder)
        self.demo_combo = QComboBox()
        self.demo_combo.setToolTip("Demo datasets built from text shipped with the app")
        self.demo_combo.activated.connect(self._demo_chosen)
        self.demo_combo.hide()
        self.format = QComboBox()
        self.format.setObjectName("format")
        self.format.addItems(["auto", *FORMATS])
        for i in range(self.format.count()):
            text = FORMATS.get(self.format.itemText(i), "detect from the first record's fields")
            self.format.setItemData(i, text, Qt.ItemDataRole.ToolTipRole)
        self.format.setToolTip(option_help("data.format"))
        self.format.currentIndexChanged.connect(self.schedule_inspect)
        self.detected = QLabel()
        self.eval_fraction = _double(0.0, 0.5, 0.01, state.eval_fraction)
        self.max_length = _int(16, 32768, state.max_length, step=64)
        self.max_samples = _int(0, 10_000_000, state.max_samples or 0)
        self.max_samples.setSpecialValueText("all")
        self.train_on = QComboBox()
        self.train_on.addItem("assistant replies only", "assistant")
        self.train_on.addItem("every token", "all")
        widgets: tuple[tuple[str, QDoubleSpinBox | QSpinBox | QComboBox], ...] = (
            ("eval_fraction", self.eval_fraction), ("max_length", self.max_length),
            ("max_samples", self.max_samples), ("train_on", self.train_on))
        for name, w in widgets:
            w.setObjectName(name)
            w.setToolTip(option_help(f"data.{name}"))
            if isinstance(w, QComboBox):
                w.currentIndexChanged.connect(self.schedule_inspect)
            else:
                w.valueChanged.connect(self.schedule_inspect)

        file_row = QHBoxLayout()
        file_row.addWidget(self.path, 1)
        file_row.addWidget(self.demo_combo)
        file_row.addWidget(self.browse)
        file_row.addWidget(self.browse_folder)
        top = QFormLayout()
        top.addRow(_buddy("&File:", self.path), file_row)
        fmt_row = QHBoxLayout()
        fmt_row.addWidget(self.format)
        fmt_row.addWidget(self.detected, 1)
        top.addRow(_buddy("F&ormat:", self.format), fmt_row)
        self.body.addLayout(top)

        split = QGroupBox("Split and length")
        sform = QHBoxLayout(split)
        for text, w in (("E&val fraction", self.eval_fraction), ("Max &tokens", self.max_length),
                        ("Max sa&mples", self.max_samples), ("Loss o&n", self.train_on)):
            sform.addWidget(_buddy(text, w))
            sform.addWidget(w)
        sform.addStretch(1)
        self.body.addWidget(split)

        self.summary = QLabel("No dataset checked yet.")
        self.summary.setWordWrap(True)
        self.preview = QPlainTextEdit()
        self.preview.setObjectName("Preview")
        self.preview.setReadOnly(True)
        self.preview.setPlaceholderText("Rendered samples appear here, exactly as the model will see them.")
        self.problems = QTableWidget(0, 3)
        self.problems.setObjectName("problems")
        self.problems.setHorizontalHeaderLabels(["Where", "Kind", "Problem"])
        self.problems.verticalHeader().hide()
        self.problems.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        self.problems.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        self.problems.horizontalHeader().setStretchLastSection(True)
        self.problems.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        left = QWidget()
        lv = QVBoxLayout(left)
        lv.setContentsMargins(0, 0, 0, 0)
        lv.addWidget(QLabel("<b>Preview</b> (rendered with the model's chat template)"))
        lv.addWidget(self.preview)
        self.thumbs = QListWidget()  # image datasets: the previewed samples' images, in order
        self.thumbs.setObjectName("thumbs")
        self.thumbs.setViewMode(QListWidget.ViewMode.IconMode)
        self.thumbs.setIconSize(QSize(THUMB_PX, THUMB_PX))
        self.thumbs.setFlow(QListWidget.Flow.LeftToRight)
        self.thumbs.setWrapping(False)
        self.thumbs.setFixedHeight(THUMB_PX + 40)
        self.thumbs.hide()
        lv.addWidget(self.thumbs)
        right = QWidget()
        rv = QVBoxLayout(right)
        rv.setContentsMargins(0, 0, 0, 0)
        self.report_heading = QLabel("<b>Validation report</b>")
        rv.addWidget(self.report_heading)
        rv.addWidget(self.summary)
        rv.addWidget(self.problems, 1)
        rv.addStretch(0)  # takes the height when the problem table is hidden, so the report stays on top
        self._report_layout = rv
        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.addWidget(left)
        splitter.addWidget(right)
        splitter.setSizes([560, 440])
        self.body.addWidget(splitter, 1)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(300)
        self._timer.timeout.connect(self.start_inspect)
        self._generation = 0
        self._pending = False
        self.inspection: Inspection | None = None
        self._loading = False

    # -- state in ----------------------------------------------------------------------------
    def initializePage(self) -> None:
        self._loading = True
        s = self.state
        self.path.setText(str(s.data_path) if s.data_path else "")
        i = self.format.findText(s.data_format)
        self.format.setCurrentIndex(max(0, i))
        self.eval_fraction.setValue(s.eval_fraction)
        self.max_length.setValue(s.max_length)
        self.max_samples.setValue(s.max_samples or 0)
        self.train_on.setCurrentIndex(max(0, self.train_on.findData(s.train_on)))
        self._loading = False
        if s.data_report is not None and s.data_config is not None:
            self._show(Inspection(s.data_config.path, s.data_config, s.data_report))
        else:
            self.start_inspect()

    # -- widgets -> config -------------------------------------------------------------------
    def settings(self) -> DataSettings:
        """The DataConfig settings the widgets show."""
        return DataSettings(format=self.format.currentText(), max_length=self.max_length.value(),
                            eval_fraction=self.eval_fraction.value(), train_on=str(self.train_on.currentData()),
                            max_samples=self.max_samples.value() or None)

    def request(self) -> InspectRequest:
        text = self.path.text().strip()
        seed = self.state.config.seed if self.state.config is not None else 0
        return InspectRequest(self.state.model_dir, Path(text).expanduser() if text else None, self.settings(), seed)

    def schedule_inspect(self) -> None:
        if not self._loading:
            self.inspection = None
            self.completeChanged.emit()
            self._timer.start()

    def start_inspect(self) -> None:
        """Inspect in a worker; a change during inspection re-runs it when this one ends."""
        if self.busy("inspect"):
            self._pending = True
            return
        self._generation += 1
        gen = self._generation
        self.summary.setText("Checking the dataset…")
        self.run_task("inspect", inspect, self.request(), lambda r: self._inspected(gen, r))
        self.completeChanged.emit()

    def _inspected(self, gen: int, result: Inspection) -> None:
        if gen != self._generation or self._pending:
            return
        self._show(result)

    def task_finished(self, name: str) -> None:
        if name == "inspect" and self._pending:
            self._pending = False
            self.start_inspect()
        super().task_finished(name)

    def _show(self, result: Inspection) -> None:
        self.inspection = result
        if result.demo and self.demo_combo.count() == 0:
            for d in result.demo:
                self.demo_combo.addItem(d.name, str(d.path))
                self.demo_combo.setItemData(self.demo_combo.count() - 1, d.description, Qt.ItemDataRole.ToolTipRole)
            self.demo_combo.show()
        if not self.path.text().strip():
            self.path.setText(str(result.data_path))
        r = result.report
        self.detected.setText(f"detected: <b>{r.format}</b>" if self.format.currentText() == "auto"
                              else f"using <b>{r.format}</b>")
        stats = r.token_stats or r.char_stats
        tokens = ""
        if stats is not None:
            tokens = (f"<br>{stats.unit} per sample: min {stats.min}, mean {stats.mean:.0f}, p95 {stats.p95}, "
                      f"max {stats.max}")
        problems = r.problems
        fatal = len(r.fatal_problems)
        text = f"<b>{r.n_samples}</b> samples → {r.n_train} train, {r.n_eval} eval{tokens}"
        if r.n_truncated:
            text += (f"<br>{r.n_truncated} samples are longer than {self.max_length.value()} tokens and will be "
                     "truncated.")
        if fatal:
            text += f"<br><span style='color:#d9534f'><b>{fatal} problem(s) must be fixed before training.</b></span>"
        elif problems:
            text += f"<br>{len(problems)} warning(s); training can go ahead."
        else:
            text += "<br><span style='color:#22a06b'>No problems found.</span>"
        self.summary.setText(text)
        self.problems.setRowCount(len(problems))
        for i, p in enumerate(problems):
            where = dataclasses.replace(p, file=Path(p.file).name).where()  # name:line, or name: row N
            item = QTableWidgetItem(where)
            item.setToolTip(p.file)
            self.problems.setItem(i, 0, item)
            self.problems.setItem(i, 1, QTableWidgetItem("error" if p.fatal else "warning"))
            self.problems.setItem(i, 2, QTableWidgetItem(p.message))
        self.problems.setVisible(bool(problems))
        self._report_layout.setStretch(self._report_layout.count() - 1, 0 if problems else 1)
        samples = r.rendered_examples[:PREVIEWS]
        self.preview.setPlainText("\n\n".join(f"──── sample {i + 1} ────\n{s}" for i, s in enumerate(samples)))
        self._show_images(result.images)
        self.completeChanged.emit()

    def _show_images(self, images: tuple[tuple[Path, ...], ...]) -> None:
        """Thumbnails of the previewed samples' images, labelled with their sample number."""
        self.thumbs.clear()
        for i, paths in enumerate(images):
            for p in paths:
                pix = QPixmap(str(p))
                item = QListWidgetItem(QIcon(pix.scaled(THUMB_PX, THUMB_PX, Qt.AspectRatioMode.KeepAspectRatio,
                                                        Qt.TransformationMode.SmoothTransformation)),
                                       f"sample {i + 1}")
                item.setToolTip(str(p))
                self.thumbs.addItem(item)
        self.thumbs.setVisible(self.thumbs.count() > 0)

    def _demo_chosen(self) -> None:
        self.path.setText(str(self.demo_combo.currentData()))
        self.schedule_inspect()

    def _browse(self) -> None:
        start = self.path.text() or str(Path.home())
        name, _ = QFileDialog.getOpenFileName(self, "Choose a dataset", start, FILE_FILTER)
        if name:
            self.path.setText(name)
            self.schedule_inspect()

    def _browse_folder(self) -> None:
        if choose_folder(self, "Choose a dataset folder", self.path):
            self.schedule_inspect()

    def retry(self) -> None:
        self.banner.clear()
        self.start_inspect()

    # -- wizard protocol ---------------------------------------------------------------------
    def isComplete(self) -> bool:
        return (self.inspection is not None and not self.busy("inspect") and not self._timer.isActive()
                and self.inspection.report.ok and self.inspection.report.n_train > 0)

    def validatePage(self) -> bool:
        if self.inspection is None:
            return False
        s, f = self.state, self.settings()
        s.data_path = self.inspection.data_path
        s.data_format = f.format
        s.max_length, s.eval_fraction = f.max_length, f.eval_fraction
        s.train_on, s.max_samples = f.train_on, f.max_samples
        s.data_config = self.inspection.config
        s.data_report = self.inspection.report
        return True


def _buddy(text: str, w: QWidget) -> QLabel:
    label = QLabel(text)
    label.setBuddy(w)
    return label


def _int(lo: int, hi: int, value: int, step: int = 1) -> QSpinBox:
    w = QSpinBox()
    w.setRange(lo, hi)
    w.setSingleStep(step)
    w.setValue(value)
    return w


def _double(lo: float, hi: float, step: float, value: float) -> QDoubleSpinBox:
    w = QDoubleSpinBox()
    w.setRange(lo, hi)
    w.setSingleStep(step)
    w.setDecimals(2)
    w.setValue(value)
    return w
