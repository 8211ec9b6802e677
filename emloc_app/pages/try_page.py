"""Page 6: chat with the base model and the fine-tuned one side by side (multi-turn, system prompt,
temperature / top-p / max tokens, streamed, Stop), the prompts kept in the run folder; exports."""

from __future__ import annotations

import dataclasses
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import QDesktopServices, QPixmap, QTextCursor
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from emloc_app.generation import (
    ChatRequest,
    ChatSettings,
    Message,
    chat_side_by_side,
    is_vision_language_folder,
)
from emloc_app.pages.common import BasePage
from emloc_app.saved_prompts import SavedPrompts, load_prompts, save_prompts
from emloc_app.state import WizardState
from emloc_engine.core.errors import ConfigError, EngineError
from emloc_engine.core.layout import RunLayout
from emloc_engine.core.progress import Progress
from emloc_engine.run.manifest import read_manifest
from emloc_engine.run.options import option_help
from emloc_engine.run.orchestrator import export_in_run
from emloc_engine.run.plan import options_of, recorded_memory
from emloc_engine.stages.export.options import GGUF_TYPES, K_QUANT_TYPES, ExportOptions

if TYPE_CHECKING:
    from emloc_engine.stages.export.exporter import ExportConfig, ExportResult

@dataclass(frozen=True)
class ExportChoice:
    """One row of the export box: a plain name for what the user gets, and the run's export settings.

    ``gguf_type`` fixes the GGUF type of the row; ``None`` takes the type chosen in the row's menu.
    """

    key: str
    title: str
    tip: str
    formats: tuple[str, ...]
    gguf_type: str | None = None
    has_type_menu: bool = False


def four_bit_type() -> str:
    """q4_k_m when llama.cpp's llama-quantize is installed (better at the same size), else q4_0."""
    from emloc_engine.stages.export.gguf_quantize import find_llama_quantize

    return "q4_k_m" if find_llama_quantize() is not None else "q4_0"


def export_choices() -> tuple[ExportChoice, ...]:
    """The export rows, in the order people look for them (runtimes first)."""
    return (
        ExportChoice("ollama", "Add to Ollama" if shutil.which("ollama") else "Ollama Modelfile",
                     "Writes RUN/Modelfile (your base GGUF + the adapter, or the single GGUF file) and, when "
                     "Ollama is installed, runs `ollama create` for it: only when you click.", ("ollama",),
                     has_type_menu=True),
        ExportChoice("lmstudio", "Add to LM Studio", "Links the single GGUF file into LM Studio's models folder.",
                     ("lmstudio",), has_type_menu=True),
        ExportChoice("adapter-gguf", "Adapter for llama.cpp/Ollama",
                     "RUN/adapter.gguf: the small corrected adapter, loaded on top of your unchanged base GGUF "
                     "(llama-cli --lora, Ollama's ADAPTER).", ("adapter-gguf",)),
        ExportChoice("gguf4", "Single GGUF file, 4-bit", "RUN/model.gguf with the adapter merged in, 4 bits per "
                     "weight (q4_k_m with llama.cpp installed, else q4_0).", ("gguf",), four_bit_type()),
        ExportChoice("gguf", "Single GGUF file", "RUN/model.gguf for llama.cpp, Ollama and LM Studio, in the "
                     "type chosen next to it.", ("gguf",), has_type_menu=True),
        ExportChoice("merged", "Merged model folder",
                     "A full Hugging Face model (16-bit safetensors) with the adapter merged in.", ("merged",)),
        ExportChoice("adapter", "Adapter (peft)", "The corrected LoRA adapter alone, for peft / vLLM / transformers.",
                     ("adapter",)),
    )


# Plain names of the GGUF types in the type menu.
TYPE_LABELS = {"f32": "32-bit (f32, exact)", "f16": "16-bit (f16)", "bf16": "16-bit (bf16)", "q8_0": "8-bit (q8_0)",
               "q6_k": "6-bit (q6_k)", "q5_k_m": "5-bit (q5_k_m)", "q5_1": "5-bit (q5_1)", "q5_0": "5-bit (q5_0)",
               "q4_k_m": "4-bit (q4_k_m)", "q4_1": "4-bit (q4_1)", "q4_0": "4-bit (q4_0)"}
EXPORTS = tuple((c.key, c.title, c.tip) for c in export_choices())
DEFAULT_PROMPT = "Write two sentences about the sea."
log = logging.getLogger(__name__)


def export(cfg: ExportConfig, progress: Progress) -> ExportResult:
    """One export through the orchestrator's per-stage path, as ``emloc export`` does
    (:func:`~emloc_engine.run.orchestrator.export_in_run`; a VLM's result has the same path fields)."""
    result: ExportResult = export_in_run(cfg, progress)
    return result


class TryPage(BasePage):
    """Compare answers, then export the merged model, the adapter, or a GGUF file."""

    def __init__(self, state: WizardState, parent: QWidget | None = None) -> None:
        super().__init__(state, parent)
        self.setTitle("Try and export")
        self.setSubTitle("Chat with the base and the fine-tuned model side by side; then export the fine-tuned model.")
        defaults = ChatSettings()
        self.system_prompt = QLineEdit()
        self.system_prompt.setObjectName("system_prompt")
        self.system_prompt.setPlaceholderText("System prompt (optional): how the assistant should behave")
        self.temperature = QDoubleSpinBox()
        self.temperature.setObjectName("temperature")
        self.temperature.setRange(0.0, 2.0)
        self.temperature.setSingleStep(0.1)
        self.temperature.setDecimals(2)
        self.temperature.setSpecialValueText("0 (fixed)")
        self.temperature.setValue(defaults.temperature)
        self.temperature.setToolTip("Randomness of the answers: 0 always picks the most likely word (the same "
                                    "answer every time); higher is more varied (0.7 is usual).")
        self.top_p = QDoubleSpinBox()
        self.top_p.setObjectName("top_p")
        self.top_p.setRange(0.05, 1.0)
        self.top_p.setSingleStep(0.05)
        self.top_p.setValue(defaults.top_p)
        self.top_p.setToolTip("Sample only among the most likely words that together make this share of the "
                              "probability (1 = all words). Not used at temperature 0.")
        self.max_tokens = QSpinBox()
        self.max_tokens.setObjectName("max_tokens")
        self.max_tokens.setRange(1, 8192)
        self.max_tokens.setValue(defaults.max_new_tokens)
        self.max_tokens.setSuffix(" tokens")
        self.max_tokens.setToolTip("The longest answer, in tokens (about ¾ of a word each).")
        self.adapter_choice = QComboBox()
        self.adapter_choice.addItem("corrected adapter", "corrected")
        self.adapter_choice.addItem("adapter as trained (uncorrected)", "trained")
        self.adapter_choice.setToolTip("The uncorrected adapter shows what the correction step changes.")
        self.prompt = QPlainTextEdit(DEFAULT_PROMPT)
        self.prompt.setObjectName("prompt")
        self.prompt.setMaximumHeight(64)
        self.prompt.setTabChangesFocus(True)
        self.prompt.setPlaceholderText("Your message to both models")
        self.saved = QComboBox()
        self.saved.setObjectName("saved_prompts")
        self.saved.setToolTip("Prompts asked of this run before (kept in the run folder, prompts.json).")
        self.saved.activated.connect(self._saved_chosen)
        self.generate = QPushButton("&Send")
        self.generate.setObjectName("generate")
        self.generate.setDefault(False)
        self.generate.clicked.connect(self.start_generation)
        self.stop = QPushButton("S&top")
        self.stop.setObjectName("stop")
        self.stop.setEnabled(False)
        self.stop.clicked.connect(self.stop_generation)
        self.new_chat = QPushButton("New &chat")
        self.new_chat.setObjectName("new_chat")
        self.new_chat.setToolTip("Forget the conversation so far (the saved prompts stay).")
        self.new_chat.clicked.connect(self.clear_chat)
        self.outputs = {"base": QPlainTextEdit(), "tuned": QPlainTextEdit()}
        for name, w in self.outputs.items():
            w.setObjectName(f"output_{name}")
            w.setReadOnly(True)
        self.gen_status = QLabel()
        self.gen_status.setObjectName("PageHint")
        # vision-language models: the conversation is about this image (shown for VLMs only)
        self.image_path: Path | None = None
        self.image_button = QPushButton("&Image…")
        self.image_button.setObjectName("image_button")
        self.image_button.setToolTip("The image the conversation is about (its first message shows it).")
        self.image_button.clicked.connect(self._choose_image)
        self.image_label = QLabel()
        self.image_label.setObjectName("image_label")
        self.image_label.setFixedSize(64, 64)
        self.image_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.conversations: dict[str, list[Message]] = {"base": [], "tuned": []}
        self._streamed: dict[str, str] = {}
        self._saved_prompts = SavedPrompts()
        self._pending: ChatRequest | None = None
        self._chat_run: Path | None = None

        chat = QGroupBox("Chat with both models")
        cl = QVBoxLayout(chat)
        settings_row = QHBoxLayout()
        settings_row.addWidget(self.system_prompt, 3)
        knobs: tuple[tuple[str, QWidget], ...] = (
            ("Temperature", self.temperature), ("Top-p", self.top_p), ("Up to", self.max_tokens))
        for text, knob in knobs:
            settings_row.addWidget(QLabel(text))
            settings_row.addWidget(knob)
        cl.addLayout(settings_row)
        panes = QGridLayout()
        panes.addWidget(QLabel("<b>Base model</b>"), 0, 0)
        tuned_head = QHBoxLayout()
        tuned_head.addWidget(QLabel("<b>Fine-tuned</b> with"))
        tuned_head.addWidget(self.adapter_choice)
        tuned_head.addStretch(1)
        panes.addLayout(tuned_head, 0, 1)
        panes.addWidget(self.outputs["base"], 1, 0)
        panes.addWidget(self.outputs["tuned"], 1, 1)
        cl.addLayout(panes, 1)
        pr = QHBoxLayout()
        pr.addWidget(self.image_label)
        pr.addWidget(self.prompt, 1)
        side = QVBoxLayout()
        side.addWidget(self.generate)
        side.addWidget(self.stop)
        side.addWidget(self.image_button)
        pr.addLayout(side)
        cl.addLayout(pr)
        below = QHBoxLayout()
        below.addWidget(QLabel("Earlier prompts"))
        below.addWidget(self.saved, 2)
        below.addWidget(self.new_chat)
        below.addWidget(self.gen_status, 1)
        cl.addLayout(below)
        self.body.addWidget(chat, 1)

        # exports
        exp = QGroupBox("Export")
        grid = QGridLayout(exp)
        self.export_buttons: dict[str, QPushButton] = {}
        self.export_bars: dict[str, QProgressBar] = {}
        self.export_status: dict[str, QLabel] = {}
        self.export_sizes: dict[str, QLabel] = {}
        self.choices = {c.key: c for c in export_choices()}
        self.gguf_type = QComboBox()
        self.gguf_type.setObjectName("gguf_type")
        from emloc_engine.stages.export.gguf_quantize import find_llama_quantize

        k_quants = find_llama_quantize() is not None
        for t in GGUF_TYPES:
            if t in TYPE_LABELS and (k_quants or t not in K_QUANT_TYPES):
                self.gguf_type.addItem(TYPE_LABELS[t], t)
        self.set_gguf_type(ExportOptions().gguf_type)
        self.gguf_type.setToolTip(option_help("export.gguf_type"))
        self.gguf_type.currentIndexChanged.connect(self.update_sizes)
        for i, choice in enumerate(self.choices.values()):
            fmt = choice.key
            b = QPushButton(choice.title)
            b.setObjectName(f"export_{fmt}")
            b.setToolTip(choice.tip)
            b.clicked.connect(lambda _=False, f=fmt: self.start_export(f))
            size = QLabel("")
            size.setObjectName(f"size_{fmt}")
            size.setToolTip("Size of the file(s) this writes, predicted before writing.")
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
            grid.addWidget(size, i, 1)
            grid.addWidget(bar, i, 2)
            grid.addWidget(status, i, 3)
            self.export_buttons[fmt], self.export_bars[fmt], self.export_status[fmt] = b, bar, status
            self.export_sizes[fmt] = size
        self.open_folder = QPushButton("&Open run folder")
        self.open_folder.clicked.connect(self.open_run_folder)
        grid.addWidget(self.open_folder, 0, 4)
        grid.setColumnStretch(3, 1)
        self.body.addWidget(exp)
        self._exporting: str | None = None
        self._unavailable: dict[str, str] = {}  # export rows this model cannot have -> why (VLMs)
        self.ollama_command: tuple[str, ...] | None = None

    # -- state in ----------------------------------------------------------------------------
    def set_gguf_type(self, gguf_type: str) -> None:
        i = self.gguf_type.findData(gguf_type)
        if i >= 0:
            self.gguf_type.setCurrentIndex(i)

    def chosen_type(self, key: str) -> str:
        choice = self.choices[key]
        return choice.gguf_type or str(self.gguf_type.currentData() or ExportOptions().gguf_type)

    def update_sizes(self) -> None:
        """The predicted size of each row's files (engine arithmetic on the model's headers)."""
        from emloc_engine.stages.export.sizes import human_bytes, predicted_export_bytes

        for key, choice in self.choices.items():
            label = self.export_sizes[key]
            if self.state.model_dir is None:
                label.setText("")
                continue
            try:
                n = predicted_export_bytes(choice.formats[0], self.state.model_dir, self.adapter_dir(),
                                           self.chosen_type(key))
            except (EngineError, OSError, KeyError, ValueError):
                label.setText("")
                continue
            approx = "≈ " if self.chosen_type(key) in K_QUANT_TYPES and choice.formats[0] != "adapter-gguf" else ""
            label.setText(f"{approx}{human_bytes(n)}")

    def initializePage(self) -> None:
        vlm = self.state.model_dir is not None and is_vision_language_folder(self.state.model_dir)
        self.image_button.setVisible(vlm)
        self.image_label.setVisible(vlm)
        self._unavailable = self.unavailable_exports() if vlm else {}
        self._enable_exports()
        if self.state.run_dir != self._chat_run:  # another run: its own prompts, a new conversation
            self._chat_run = self.state.run_dir
            self.clear_chat()
            self.load_saved()
        if self.state.config is not None:
            self.set_gguf_type(self.state.config.export.gguf_type)
        layout = self.layout_()
        corrected = layout is not None and layout.adapter_corrected.exists()
        self.adapter_choice.setCurrentIndex(0 if corrected or layout is None else 1)
        for fmt, _, _ in EXPORTS:
            path = self.export_path(fmt)
            if path is not None and path.exists():
                self.export_bars[fmt].setValue(1000)
                self.export_status[fmt].setText(str(path))
        self.update_sizes()

    def unavailable_exports(self) -> dict[str, str]:
        """Export rows a vision-language model cannot have, and why (the engine's own refusal)."""
        from emloc_engine.vision.export import vlm_export_problem

        assert self.state.model_dir is not None
        out = {}
        for key, choice in self.choices.items():
            problem = vlm_export_problem(choice.formats, self.state.model_dir)
            if problem:
                out[key] = problem
        return out

    def _enable_exports(self) -> None:
        """Every export button on, except the rows this model cannot have (their tooltip says why)."""
        for key, b in self.export_buttons.items():
            why = self._unavailable.get(key)
            b.setEnabled(why is None)
            b.setToolTip(f"Not for this model: {why}." if why else self.choices[key].tip)

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
        return {"merged": layout.merged, "adapter": layout.root / "adapter-export", "gguf": layout.gguf,
                "adapter-gguf": layout.adapter_gguf, "ollama": layout.modelfile}.get(fmt)

    # -- chat ------------------------------------------------------------------------------
    def chat_settings(self) -> ChatSettings:
        return ChatSettings(self.system_prompt.text(), self.temperature.value(), self.top_p.value(),
                            self.max_tokens.value())

    def load_saved(self) -> None:
        """The run's saved prompts and settings (``RUN_DIR/prompts.json``) into the widgets."""
        if self.state.run_dir is None:
            return
        self._saved_prompts = saved = load_prompts(self.state.run_dir)
        st = saved.settings
        self.system_prompt.setText(st.system_prompt)
        self.temperature.setValue(st.temperature)
        self.top_p.setValue(st.top_p)
        self.max_tokens.setValue(st.max_new_tokens)
        self.saved.clear()
        for prompt in reversed(saved.prompts):  # newest first
            self.saved.addItem(prompt.replace("\n", " ⏎ ")[:120], prompt)
        self.saved.setEnabled(bool(saved.prompts))
        if saved.prompts:
            self.prompt.setPlainText(saved.prompts[-1])

    def _saved_chosen(self, index: int) -> None:
        prompt = self.saved.itemData(index)
        if isinstance(prompt, str):
            self.prompt.setPlainText(prompt)

    def _remember(self, prompt: str) -> None:
        if self.state.run_dir is None or not self.state.run_dir.is_dir():
            return
        saved = dataclasses.replace(self._saved_prompts.with_prompt(prompt), settings=self.chat_settings())
        try:
            save_prompts(self.state.run_dir, saved)
        except OSError as exc:  # a read-only run folder: the chat works, the prompts are not kept
            log.warning("Could not save the prompts in %s: %s", self.state.run_dir, exc)
            return
        self._saved_prompts = saved
        self.saved.clear()
        for p in reversed(saved.prompts):
            self.saved.addItem(p.replace("\n", " ⏎ ")[:120], p)
        self.saved.setEnabled(True)

    def chat_request(self, prompt: str) -> ChatRequest:
        """The next turn: each side's conversation so far plus ``prompt``."""
        if self.state.model_dir is None:
            raise ConfigError("No model chosen.", hint="Choose one on the Model page.")
        turn: Message = {"role": "user", "content": prompt}
        histories = {side: (*conv, turn) for side, conv in self.conversations.items()}
        return ChatRequest(self.state.model_dir, self.adapter_dir(), histories, self.chat_settings(),
                           self.state.device, seed=random.randrange(2**31), image=self.image_path)

    def _choose_image(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose an image", "",
                                              "Images (*.png *.jpg *.jpeg *.webp *.bmp *.gif);;All files (*)")
        if path:
            self.set_image(Path(path))

    def set_image(self, path: Path) -> None:
        """Talk about this image (a thumbnail shows which); a new image starts a new chat."""
        self.clear_chat()
        self.image_path = path
        pix = QPixmap(str(path))
        self.image_label.setPixmap(pix.scaled(64, 64, Qt.AspectRatioMode.KeepAspectRatio,
                                              Qt.TransformationMode.SmoothTransformation))
        self.image_label.setToolTip(str(path))

    def start_generation(self) -> None:
        if self.busy("generate"):
            return
        prompt = self.prompt.toPlainText().strip()
        if not prompt:
            return
        try:
            req = self.chat_request(prompt)
        except EngineError as exc:
            self.banner.show_error(exc, retry=False)
            return
        self._pending = req
        self._streamed = {side: "" for side in req.sides}
        for side, pane in self.outputs.items():
            sep = "\n\n" if pane.toPlainText() else ""
            self._append(side, f"{sep}You: {prompt}\n\n{'Base' if side == 'base' else 'Fine-tuned'}: ")
        self._remember(prompt)
        self.prompt.clear()
        self.generate.setEnabled(False)
        self.stop.setEnabled(True)
        self.new_chat.setEnabled(False)
        self.gen_status.setText("Loading…")
        self.run_task("generate", chat_side_by_side, req, self._generated, on_text=self._on_text,
                      on_progress=lambda f, m: self.gen_status.setText(m), on_cancel=self._gen_cancelled)

    def _append(self, side: str, text: str) -> None:
        pane = self.outputs[side]
        pane.moveCursor(QTextCursor.MoveOperation.End)
        pane.insertPlainText(text)
        pane.ensureCursorVisible()

    def _on_text(self, side: str, chunk: str) -> None:
        if side not in self.outputs:
            return
        self._streamed[side] = self._streamed.get(side, "") + chunk
        self._append(side, chunk)

    def _finish_turn(self, replies: dict[str, str]) -> None:
        """Add the turn to each side's conversation (a stopped reply as far as it came)."""
        req = self._pending
        if req is None:
            return
        for side, history in req.histories.items():
            self.conversations[side] = [*history, {"role": "assistant", "content": replies.get(side, "")}]
        self._pending = None

    def _generated(self, result: dict[str, str]) -> None:
        self._finish_turn(result)
        self.gen_status.setText("Done.")

    def _gen_cancelled(self) -> None:
        self._finish_turn(self._streamed)
        for side in self.outputs:
            self._append(side, " [stopped]")
        self.gen_status.setText("Stopped.")

    def stop_generation(self) -> None:
        self.cancel_task("generate")

    def clear_chat(self) -> None:
        if self.busy("generate"):
            return
        self.conversations = {side: [] for side in self.outputs}
        for pane in self.outputs.values():
            pane.clear()
        self.gen_status.setText("")

    # -- export ------------------------------------------------------------------------------
    def export_config(self, fmt: str) -> ExportConfig:
        """The run's export settings for one row, wired as ``emloc export`` wires them."""
        from emloc_engine.stages.export.exporter import ExportConfig

        s = self.state
        if s.run_dir is None or s.model_dir is None:
            raise ConfigError("No finished run to export.", hint="Run the fine-tune first.")
        base = s.config.export if s.config is not None else ExportOptions()
        choice = self.choices[fmt]
        options = dataclasses.replace(base, formats=choice.formats, gguf_type=self.chosen_type(fmt))
        device = s.config.device if s.config is not None else "cpu"
        # As the run planned it: the verification keeps to the run's budget, and streams a model that does not fit.
        budget: int | None
        if s.run_plan is not None:
            budget, stream = s.run_plan.memory.budget_bytes, s.run_plan.stream_original
        else:
            manifest = read_manifest(s.run_dir)
            budget, stream = recorded_memory(manifest.plan if manifest is not None else None)
        return ExportConfig(**options_of(options), run_dir=s.run_dir, model_dir=s.model_dir, overwrite=True,
                            device=device, memory_budget_bytes=budget if device != "cpu" else None,
                            stream_original=stream)

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
        path = {"merged": result.merged_dir, "adapter": result.adapter_dir, "gguf": result.gguf_path,
                "gguf4": result.gguf_path, "adapter-gguf": result.adapter_gguf_path,
                "ollama": result.modelfile_path, "lmstudio": result.lmstudio_path}.get(fmt)
        check = ""
        if result.verification:
            worst = max(d for _, d in result.verification)
            check = f" · verified (max logit diff {worst:.2g})"
        self.export_bars[fmt].setValue(1000)
        self.export_status[fmt].setText(f"{path or 'done'}{check}")
        if fmt == "ollama":
            self._offer_ollama(result)

    def _offer_ollama(self, result: ExportResult) -> None:
        """The user clicked "Add to Ollama": run the offered ``ollama create`` now (or say how, without Ollama)."""
        from emloc_engine.stages.export.modelfile import add_to_ollama, command_text

        if not result.ollama_command:
            self.export_status["ollama"].setText(
                f"{result.modelfile_path} · Ollama not found; install it, then: "
                f"ollama create NAME -f {result.modelfile_path}")
            return
        self.ollama_command = result.ollama_command
        self.export_status["ollama"].setText(f"running: {command_text(result.ollama_command)}")
        self.run_task("ollama-create", add_to_ollama, result.ollama_command, self._added_to_ollama)

    def _added_to_ollama(self, message: str) -> None:
        assert self.ollama_command is not None
        self.export_status["ollama"].setText(f"Added to Ollama as {self.ollama_command[2]} ({message})")

    def task_finished(self, name: str) -> None:
        if name.startswith("export-"):
            fmt = name.removeprefix("export-")
            if fmt not in self.state.exports and self.export_status[fmt].text() not in ("cancelled",):
                self.export_status[fmt].setText("failed")
            self._exporting = None
            self._enable_exports()
        if name == "generate":
            if self._pending is not None:  # failed: the turn is kept as far as it came
                self._finish_turn(self._streamed)
            self.generate.setEnabled(True)
            self.stop.setEnabled(False)
            self.new_chat.setEnabled(True)
        super().task_finished(name)

    def open_run_folder(self) -> None:
        if self.state.run_dir:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.state.run_dir)))

    def retry(self) -> None:
        self.banner.clear()

    def isComplete(self) -> bool:
        return not self.busy()

    def nextId(self) -> int:
        return -1  # the last page (the Runs page has a higher id but comes first)
