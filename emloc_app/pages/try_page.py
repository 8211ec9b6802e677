"""Page 6: the same prompt through the base model and the fine-tuned one, side by side; exports."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import QDesktopServices, QPixmap, QTextCursor
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from emloc_app.generation import GenerateRequest, generate_side_by_side, is_vision_language_folder
from emloc_app.pages.common import BasePage
from emloc_app.state import WizardState
from emloc_engine.core.errors import ConfigError, EngineError
from emloc_engine.core.layout import RunLayout
from emloc_engine.core.progress import Progress
from emloc_engine.run.options import option_help
from emloc_engine.run.orchestrator import export_record, open_run, run_facts, run_stage
from emloc_engine.run.plan import options_of
from emloc_engine.stages.export.options import GGUF_TYPES, ExportOptions

if TYPE_CHECKING:
    from emloc_engine.stages.export.exporter import ExportConfig, ExportResult

EXPORTS = (
    ("merged", "Merged model folder", "A full Hugging Face model (16-bit safetensors) with the adapter merged in."),
    ("adapter", "Adapter (peft)", "The corrected LoRA adapter alone, for peft / vLLM / transformers."),
    ("gguf", "GGUF", "One file for llama.cpp, Ollama and LM Studio."),
)
DEFAULT_PROMPT = "Write two sentences about the sea."


def export(cfg: ExportConfig, progress: Progress) -> ExportResult:
    """One export through the orchestrator's per-stage path, as ``emloc export`` does.

    ``open_run`` checks where the run folder is and holds its lock; the run's facts (for the model card)
    come from its manifest; ``run_stage`` records the export. (``run_stages(plan, stages=("export",))``
    would skip the stage once any format was exported, so a second format could not be added.)
    """
    from emloc_engine.stages.export.exporter import merge_and_export

    with open_run(cfg.run_dir, model_dir=cfg.model_dir) as session:
        final = dataclasses.replace(cfg, run_facts=run_facts(session.manifest))
        result: ExportResult = run_stage(session, "export", lambda: merge_and_export(final, progress),
                                         result_json=export_record)
    return result


class TryPage(BasePage):
    """Compare answers, then export the merged model, the adapter, or a GGUF file."""

    def __init__(self, state: WizardState, parent: QWidget | None = None) -> None:
        super().__init__(state, parent)
        self.setTitle("Try and export")
        self.setSubTitle("Ask both models the same thing; then export the fine-tuned model.")
        self.prompt = QPlainTextEdit(DEFAULT_PROMPT)
        self.prompt.setObjectName("prompt")
        self.prompt.setMaximumHeight(70)
        self.prompt.setTabChangesFocus(True)
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(1, 4096)
        self.max_tokens.setValue(128)
        self.max_tokens.setSuffix(" tokens")
        self.adapter_choice = QComboBox()
        self.adapter_choice.addItem("corrected adapter", "corrected")
        self.adapter_choice.addItem("adapter as trained (uncorrected)", "trained")
        self.adapter_choice.setToolTip("The uncorrected adapter shows what the correction step changes.")
        self.generate = QPushButton("&Generate")
        self.generate.setObjectName("generate")
        self.generate.setDefault(False)
        self.generate.clicked.connect(self.start_generation)
        self.stop = QPushButton("S&top")
        self.stop.setEnabled(False)
        self.stop.clicked.connect(self.stop_generation)
        self.outputs = {"base": QPlainTextEdit(), "tuned": QPlainTextEdit()}
        for name, w in self.outputs.items():
            w.setObjectName(f"output_{name}")
            w.setReadOnly(True)
        self.gen_status = QLabel()
        self.gen_status.setObjectName("PageHint")
        # vision-language models: the question is about this image (shown for VLMs only)
        self.image_path: Path | None = None
        self.image_button = QPushButton("&Image…")
        self.image_button.setObjectName("image_button")
        self.image_button.clicked.connect(self._choose_image)
        self.image_label = QLabel()
        self.image_label.setObjectName("image_label")
        self.image_label.setFixedSize(96, 96)
        self.image_label.setAlignment(Qt.AlignmentFlag.AlignCenter)

        chat = QGroupBox("Try it")
        cl = QVBoxLayout(chat)
        pr = QHBoxLayout()
        pr.addWidget(self.image_label)
        pr.addWidget(self.prompt, 1)
        side = QVBoxLayout()
        side.addWidget(self.generate)
        side.addWidget(self.stop)
        side.addWidget(self.image_button)
        pr.addLayout(side)
        cl.addLayout(pr)
        opts = QHBoxLayout()
        opts.addWidget(QLabel("Fine-tuned with"))
        opts.addWidget(self.adapter_choice)
        opts.addWidget(QLabel("up to"))
        opts.addWidget(self.max_tokens)
        opts.addWidget(self.gen_status, 1)
        cl.addLayout(opts)
        panes = QGridLayout()
        panes.addWidget(QLabel("<b>Base model</b>"), 0, 0)
        panes.addWidget(QLabel("<b>Fine-tuned</b>"), 0, 1)
        panes.addWidget(self.outputs["base"], 1, 0)
        panes.addWidget(self.outputs["tuned"], 1, 1)
        cl.addLayout(panes, 1)
        self.body.addWidget(chat, 1)

        # exports
        exp = QGroupBox("Export")
        grid = QGridLayout(exp)
        self.export_buttons: dict[str, QPushButton] = {}
        self.export_bars: dict[str, QProgressBar] = {}
        self.export_status: dict[str, QLabel] = {}
        self.gguf_type = QComboBox()
        self.gguf_type.setObjectName("gguf_type")
        self.gguf_type.addItems(list(GGUF_TYPES))
        self.gguf_type.setCurrentText(ExportOptions().gguf_type)
        self.gguf_type.setToolTip(option_help("export.gguf_type"))
        for i, (fmt, title, tip) in enumerate(EXPORTS):
            b = QPushButton(f"Export {title if fmt == 'gguf' else title.lower()}")
            b.setObjectName(f"export_{fmt}")
            b.setToolTip(tip)
            b.clicked.connect(lambda _=False, f=fmt: self.start_export(f))
            bar = QProgressBar()
            bar.setRange(0, 1000)
            bar.setValue(0)
            status = QLabel("")
            status.setMinimumWidth(200)
            status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            if fmt == "gguf":
                cell = QHBoxLayout()
                cell.addWidget(b, 1)
                cell.addWidget(self.gguf_type)
                grid.addLayout(cell, i, 0)
            else:
                grid.addWidget(b, i, 0)
            grid.addWidget(bar, i, 1)
            grid.addWidget(status, i, 2)
            self.export_buttons[fmt], self.export_bars[fmt], self.export_status[fmt] = b, bar, status
        self.open_folder = QPushButton("&Open run folder")
        self.open_folder.clicked.connect(self.open_run_folder)
        grid.addWidget(self.open_folder, 0, 3)
        grid.setColumnStretch(2, 1)
        self.body.addWidget(exp)
        self._exporting: str | None = None

    # -- state in ----------------------------------------------------------------------------
    def initializePage(self) -> None:
        vlm = self.state.model_dir is not None and is_vision_language_folder(self.state.model_dir)
        self.image_button.setVisible(vlm)
        self.image_label.setVisible(vlm)
        if self.state.config is not None:
            self.gguf_type.setCurrentText(self.state.config.export.gguf_type)
        layout = self.layout_()
        corrected = layout is not None and layout.adapter_corrected.exists()
        self.adapter_choice.setCurrentIndex(0 if corrected or layout is None else 1)
        for fmt, _, _ in EXPORTS:
            path = self.export_path(fmt)
            if path is not None and path.exists():
                self.export_bars[fmt].setValue(1000)
                self.export_status[fmt].setText(str(path))

    def layout_(self) -> RunLayout | None:
        return RunLayout(self.state.run_dir) if self.state.run_dir else None

    def adapter_dir(self) -> Path | None:
        layout = self.layout_()
        if layout is None:
            return None
        if self.adapter_choice.currentData() == "corrected" and layout.adapter_corrected.exists():
            return layout.adapter_corrected
        return layout.adapter

    def export_path(self, fmt: str) -> Path | None:
        layout = self.layout_()
        if layout is None:
            return None
        return {"merged": layout.merged, "adapter": layout.root / "adapter-export", "gguf": layout.gguf}.get(fmt)

    # -- generation --------------------------------------------------------------------------
    def generate_request(self) -> GenerateRequest:
        if self.state.model_dir is None:
            raise ConfigError("No model chosen.", hint="Choose one on the Model page.")
        return GenerateRequest(self.state.model_dir, self.adapter_dir(), self.prompt.toPlainText().strip(),
                               self.max_tokens.value(), self.state.device, image=self.image_path)

    def _choose_image(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose an image", "",
                                              "Images (*.png *.jpg *.jpeg *.webp *.bmp *.gif);;All files (*)")
        if path:
            self.set_image(Path(path))

    def set_image(self, path: Path) -> None:
        """Ask about this image (a thumbnail shows which)."""
        self.image_path = path
        pix = QPixmap(str(path))
        self.image_label.setPixmap(pix.scaled(96, 96, Qt.AspectRatioMode.KeepAspectRatio,
                                              Qt.TransformationMode.SmoothTransformation))
        self.image_label.setToolTip(str(path))

    def start_generation(self) -> None:
        if self.busy("generate"):
            return
        try:
            req = self.generate_request()
        except EngineError as exc:
            self.banner.show_error(exc, retry=False)
            return
        for w in self.outputs.values():
            w.clear()
        self.generate.setEnabled(False)
        self.stop.setEnabled(True)
        self.gen_status.setText("Loading…")
        self.run_task("generate", generate_side_by_side, req, self._generated, on_text=self._on_text,
                      on_progress=lambda f, m: self.gen_status.setText(m), on_cancel=self._gen_cancelled)

    def _on_text(self, side: str, chunk: str) -> None:
        pane = self.outputs.get(side)
        if pane is None:
            return
        pane.moveCursor(QTextCursor.MoveOperation.End)
        pane.insertPlainText(chunk)

    def _generated(self, result: dict[str, str]) -> None:
        self.gen_status.setText("Done.")

    def _gen_cancelled(self) -> None:
        self.gen_status.setText("Stopped.")

    def stop_generation(self) -> None:
        worker = self.workers.get("generate")
        if worker is not None:
            worker.request_cancel()

    # -- export ------------------------------------------------------------------------------
    def export_config(self, fmt: str) -> ExportConfig:
        """The run's export settings for one format, wired as ``emloc export`` wires them."""
        from emloc_engine.stages.export.exporter import ExportConfig

        s = self.state
        if s.run_dir is None or s.model_dir is None:
            raise ConfigError("No finished run to export.", hint="Run the fine-tune first.")
        base = s.config.export if s.config is not None else ExportOptions()
        options = dataclasses.replace(base, formats=(fmt,), gguf_type=self.gguf_type.currentText())
        return ExportConfig(**options_of(options), run_dir=s.run_dir, model_dir=s.model_dir, overwrite=True,
                            device=s.config.device if s.config is not None else "cpu")

    def start_export(self, fmt: str) -> None:
        if self._exporting is not None:
            return
        try:
            cfg = self.export_config(fmt)
        except EngineError as exc:
            self.banner.show_error(exc, retry=False)
            return
        self._exporting = fmt
        self.state.exports.pop(fmt, None)
        for b in self.export_buttons.values():
            b.setEnabled(False)
        self.export_bars[fmt].setValue(0)
        self.export_status[fmt].setText("starting…")
        self.run_task(f"export-{fmt}", export, cfg, lambda r: self._exported(fmt, r),
                      on_progress=lambda f, m: self._export_progress(fmt, f, m),
                      on_cancel=lambda: self.export_status[fmt].setText("cancelled"))

    def _export_progress(self, fmt: str, fraction: float, message: str) -> None:
        self.export_bars[fmt].setValue(int(fraction * 1000))
        self.export_status[fmt].setText(message)

    def _exported(self, fmt: str, result: ExportResult) -> None:
        self.state.exports[fmt] = result
        path = {"merged": result.merged_dir, "adapter": result.adapter_dir, "gguf": result.gguf_path}.get(fmt)
        check = ""
        if result.verification:
            worst = max(d for _, d in result.verification)
            check = f" · verified (max logit diff {worst:.2g})"
        self.export_bars[fmt].setValue(1000)
        self.export_status[fmt].setText(f"{path or 'done'}{check}")

    def task_finished(self, name: str) -> None:
        if name.startswith("export-"):
            fmt = name.removeprefix("export-")
            if fmt not in self.state.exports and self.export_status[fmt].text() not in ("cancelled",):
                self.export_status[fmt].setText("failed")
            self._exporting = None
            for b in self.export_buttons.values():
                b.setEnabled(True)
        if name == "generate":
            self.generate.setEnabled(True)
            self.stop.setEnabled(False)
        super().task_finished(name)

    def open_run_folder(self) -> None:
        if self.state.run_dir:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.state.run_dir)))

    def retry(self) -> None:
        self.banner.clear()

    def isComplete(self) -> bool:
        return not self.busy()
