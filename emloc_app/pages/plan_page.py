"""Page 4: the run's settings (one ``RunConfig``) and the engine's plan of it (ρ, bars against the budget, duration).

The page builds one :class:`~emloc_engine.run.config.RunConfig` from its widgets and the earlier pages and
asks :func:`~emloc_engine.run.plan.plan_run` for ρ and every stage's config; it builds no stage config
itself. Defaults and tooltips are the engine's option fields; "Show command…" is the engine's
``command_line`` of the same config.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFrame,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSlider,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from emloc_app.pages.common import GIB, BasePage, gib
from emloc_app.pages.model_page import is_demo
from emloc_app.pages.plan_words import PLAIN
from emloc_app.state import WizardState
from emloc_app.widgets.preset_cards import PresetCards, PresetEstimate, rough_duration
from emloc_app.widgets.vram_bar import VramBar
from emloc_engine.core import paths
from emloc_engine.core.errors import ConfigError, EngineError
from emloc_engine.machine.hardware import GpuInfo, MachineInfo
from emloc_engine.run.config import RunConfig
from emloc_engine.run.options import command_line, option, option_help
from emloc_engine.run.plan import eval_sequences_of, plan_run, sample_tokens_of
from emloc_engine.run.planning import MemoryPlan
from emloc_engine.run.presets import PRESETS, apply_preset, matching_preset
from emloc_engine.stages.correction.options import CorrectionOptions
from emloc_engine.stages.emulator.options import EmulatorOptions
from emloc_engine.stages.export.options import ExportOptions
from emloc_engine.stages.training.options import TrainOptions

if TYPE_CHECKING:
    from emloc_engine.run.plan import RunPlan

TRAIN_LABELS = {
    "rank": "LoRA &rank", "alpha": "LoRA &alpha", "dropout": "&Dropout", "steps": "&Steps",
    "lr": "&Learning rate", "batch_size": "&Batch size", "grad_accum": "&Gradient accumulation",
    "warmup_steps": "&Warm-up steps", "eval_every": "&Evaluate every", "save_every": "Check&point every",
}
"""The ``TrainOptions`` fields on the page, in grid order (then the run's seed and λ)."""
DEMO_PRESET = "faster"
"""The demo (SmolLM2-135M on the Shakespeare dialogue set, often on a laptop CPU) starts on Faster: 60
steps at lr 5e-4 show a visible change in minutes (measured while building the demo: 40 peft LoRA steps
at lr 5e-4 turned "The king is a just ruler…" into "King John: / I have been in the king's court…")."""
LAMBDA_CHOICES: tuple[tuple[str, float | None], ...] = (
    ("auto (chosen on held-out data)", None), ("3 (paper default)", 3.0), ("exact (∞)", math.inf), ("none (0)", 0.0))
DEFAULT_CALIB = int(option("calib").default)
SPECTRAL_BUILD_FACTOR = 2.0
"""How much longer the emulator build takes with ``allocation="spectral"``: benchmarks/RESULTS.md
measured 115.5 s vs 57.0 s (Llama-3-8B shapes, one H200; the extra streaming pass that measures the
spectra took 60.3 s), so the planner's uniform-build estimate is doubled."""
SIMILAR_MEMORY = 0.9  # GPUs whose memory differs by less than 10% count as alike


def multi_gpus(machine: MachineInfo | None, gpu_index: int | None) -> tuple[GpuInfo, ...]:
    """The GPUs the run may spread over: every CUDA GPU, when there are ≥ 2 and a GPU was chosen.

    Empty on the CPU, MPS, ROCm (untested there), a single GPU, or when the user chose the CPU.
    """
    if machine is None or machine.backend != "cuda" or gpu_index is None or len(machine.gpus) < 2:
        return ()
    return tuple(sorted(machine.gpus, key=lambda g: g.index))


def default_gpu_count(gpus: tuple[GpuInfo, ...]) -> int:
    """All of ``gpus`` when they are alike (same name, memory within 10%), else 1.

    Data-parallel training runs in step with the slowest GPU and every GPU holds the whole
    emulator, so mixed cards are left to the user's choice.
    """
    if len(gpus) < 2:
        return 1
    totals = [g.total_bytes for g in gpus]
    alike = len({g.name for g in gpus}) == 1 and min(totals) >= SIMILAR_MEMORY * max(totals)
    return len(gpus) if alike else 1


def ratio_slider_range() -> tuple[int, int]:
    """The ρ slider's range in hundredths: inside the engine's open interval (``RunConfig.ratio``'s bounds)."""
    bounds = option("ratio").bounds or (0.0, 1.0)
    return math.floor(bounds[0] * 100) + 1, math.ceil(bounds[1] * 100) - 1


def peak_bytes(plan: MemoryPlan) -> int:
    """The most memory any stage of the run is predicted to need (the export merges on the CPU: left out)."""
    return max((s.peak_bytes for s in plan.stages if s.name != "export"), default=0)


def estimated_seconds(plan: MemoryPlan, emulator_factor: float = 1.0) -> float:
    """Sum of the planner's per-stage estimates of the emulator, training and correction (export excluded).

    ``emulator_factor`` scales the emulator stage's estimate (the planner estimates the uniform
    build; :data:`SPECTRAL_BUILD_FACTOR` for per-module ranks).
    """
    return sum(v * (emulator_factor if name == "emulator" else 1.0)
               for name, v in plan.est_seconds.items() if name != "export")


def ram_note(memory: MemoryPlan, on_cpu: bool = False) -> str:
    """The RAM the run needs (anchors' share) and whether the original is streamed, as sentences that follow
    the time-and-memory sentence. ``on_cpu``: that sentence already gave the RAM (the device is the RAM),
    so only the anchors' share follows."""
    chunks = (f"{memory.anchor_chunks} chunk" + ("s" if memory.anchor_chunks != 1 else "")) if memory.anchor_chunks \
        else ""
    if on_cpu:
        text = f" The anchors take {memory.anchor_ram_bytes / GIB:.1f} GiB of it ({chunks})." if chunks else ""
    else:
        text = f" It needs <b>{memory.ram_bytes / GIB:.1f} GiB</b> of RAM"
        text += (f" (anchors {memory.anchor_ram_bytes / GIB:.1f} GiB, {chunks})" if chunks else "") + "."
    if memory.stream_original:
        text += " The model <b>runs offloaded</b>: the original streams through the GPU block by block."
    return text


class PlanPage(BasePage):
    """Shows the planner's choice and lets the user override ρ and the training settings."""

    def __init__(self, state: WizardState, parent: QWidget | None = None) -> None:
        super().__init__(state, parent)
        self.setTitle("Plan")
        self.setSubTitle("Choose how the model should train; the time and memory each choice needs are "
                         "predicted for this machine.")
        # the choice people understand first
        self.presets = PresetCards()
        self.presets.chosen.connect(self._preset_chosen)
        choice = QGroupBox("How should it train?")
        QVBoxLayout(choice).addWidget(self.presets)
        # what the chosen settings need
        self.ratio_label = QLabel()
        self.ratio_label.setObjectName("BigNumber")
        self.bars = VramBar()
        self.verdict = QLabel()
        self.verdict.setWordWrap(True)
        self.duration = QLabel()
        need = QGroupBox("What it needs")
        nl = QVBoxLayout(need)
        nl.addWidget(self.duration)
        nl.addWidget(self.verdict)
        nl.addWidget(self.bars)
        # the method's settings, on request
        self.advanced_toggle = QToolButton()
        self.advanced_toggle.setObjectName("advanced_toggle")
        self.advanced_toggle.setText("Advanced: the method's settings")
        self.advanced_toggle.setCheckable(True)
        self.advanced_toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.advanced_toggle.setArrowType(Qt.ArrowType.RightArrow)
        self.advanced_toggle.toggled.connect(self._toggle_advanced)
        self.advanced = QWidget()
        self.advanced.setObjectName("advanced")
        al = QVBoxLayout(self.advanced)
        al.setContentsMargins(0, 0, 0, 0)
        al.addWidget(self._method_box())
        al.addWidget(self._settings_box())
        self.advanced.hide()

        self.show_command = QPushButton("Show &command…")
        self.show_command.setToolTip("The equivalent `emloc run …` command, for scripts and servers.")
        self.show_command.clicked.connect(self._show_command)
        row = QHBoxLayout()
        row.addWidget(self.advanced_toggle)
        row.addStretch(1)
        row.addWidget(self.show_command)
        content = QWidget()
        cl = QVBoxLayout(content)
        cl.setContentsMargins(0, 0, 0, 0)
        cl.addWidget(choice)
        cl.addWidget(need)
        cl.addLayout(row)
        cl.addWidget(self.advanced)
        cl.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(content)
        self.body.addWidget(scroll, 1)
        self.run_plan: RunPlan | None = None
        self._loading = False
        self._calib: int = DEFAULT_CALIB  # presets set it; no widget of its own
        self._estimates_key: RunConfig | None = None
        self._run_dir = paths.runs_dir() / "run"  # named on the first visit (initializePage)
        self._named_run_dir: Path | None = None

    def _toggle_advanced(self, shown: bool) -> None:
        self.advanced.setVisible(shown)
        self.advanced_toggle.setArrowType(Qt.ArrowType.DownArrow if shown else Qt.ArrowType.RightArrow)

    # -- widgets ----------------------------------------------------------------------------
    def _method_box(self) -> QGroupBox:
        """ρ (slider or the planner's), the GPUs, per-module ranks and anchoring, each with its plain sentence."""
        self.auto_ratio = QCheckBox("Let the planner choose ρ")
        self.auto_ratio.setObjectName("auto_ratio")
        self.auto_ratio.setChecked(True)
        self.auto_ratio.toggled.connect(self._ratio_mode_changed)
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setObjectName("ratio")
        self.slider.setRange(*ratio_slider_range())
        self.slider.setPageStep(5)
        self.slider.setTickInterval(10)
        self.slider.setTickPosition(QSlider.TickPosition.TicksBelow)
        self.slider.setToolTip(option_help("ratio"))
        self.slider.valueChanged.connect(self._ratio_changed)
        box = QGroupBox("Emulator (the smaller stand-in model training runs on)")
        rl = QVBoxLayout(box)
        r1 = QHBoxLayout()
        r1.addWidget(QLabel("ρ ="))
        r1.addWidget(self.ratio_label)
        r1.addWidget(self.slider, 1)
        r1.addWidget(self.auto_ratio)
        rl.addLayout(r1)
        rl.addWidget(self.hint(PLAIN["ratio"]))
        rl.addWidget(self._gpu_row())
        rl.addWidget(self._allocation_box())
        rl.addWidget(self.hint(PLAIN["allocation"]))
        rl.addWidget(self._anchor_box())
        rl.addWidget(self.hint(PLAIN["anchor"]))
        return box

    def _settings_box(self) -> QGroupBox:
        """The training settings: ``TrainOptions`` fields (their defaults' types pick the spin box), seed, λ.

        One row each: the label, the widget and one plain sentence (the engine's help is the tooltip).
        """
        defaults = dataclasses.asdict(TrainOptions())
        self.settings: dict[str, QSpinBox | QDoubleSpinBox] = {}
        box = QGroupBox("LoRA and training")
        grid = QGridLayout(box)
        cells: list[tuple[str, str, QWidget]] = []  # (label, plain-words key, widget) in grid order
        for name, text in TRAIN_LABELS.items():
            w = _spin_for(name, defaults[name])
            w.setObjectName(name)
            w.setToolTip(option_help(f"train.{name}"))
            w.valueChanged.connect(self._settings_changed)
            self.settings[name] = w
            cells.append((text, name, w))
        self.seed = _spin_for("seed", RunConfig.__dataclass_fields__["seed"].default)
        self.seed.setToolTip(option_help("seed"))
        self.lambda_ = QComboBox()
        for text, value in LAMBDA_CHOICES:
            self.lambda_.addItem(text, value)
        self.lambda_.setToolTip(option_help("correct.lambda_"))
        self.lambda_.currentIndexChanged.connect(self._settings_changed)
        cells += [("S&eed", "seed", self.seed), ("Correction &λ", "lambda", self.lambda_)]
        self.seed.setObjectName("seed")
        self.lambda_.setObjectName("lambda")
        for i, (text, key, widget) in enumerate(cells):
            label = QLabel(text)
            label.setBuddy(widget)
            label.setToolTip(widget.toolTip())
            widget.setMinimumWidth(150)
            grid.addWidget(label, i, 0)
            grid.addWidget(widget, i, 1)
            grid.addWidget(self.hint(PLAIN[key]), i, 2)
        grid.setColumnStretch(2, 1)
        return box

    def _gpu_row(self) -> QWidget:
        """The "GPUs" control: a spin box 1..N, shown only when ≥ 2 CUDA GPUs are detected.

        A spin box rather than a "use all GPUs" checkbox: on a machine of 4 or 8 GPUs some are
        often busy, and using 2 of them must be possible; with 2 GPUs it reads as "GPUs [2] of 2".
        The GPUs used are 0..N−1, as with ``emloc run --gpus N``, so "Show command…" runs the same.
        """
        self.gpus = QSpinBox()
        self.gpus.setObjectName("gpus")
        self.gpus.setRange(1, 1)
        self.gpus.setToolTip(option_help("gpus") + " The bars show the memory of one GPU.")
        self.gpus.valueChanged.connect(self._settings_changed)
        self.gpus_of = QLabel()
        label = QLabel("&GPUs")
        label.setBuddy(self.gpus)
        label.setToolTip(self.gpus.toolTip())
        self.gpu_box = QWidget()
        self.gpu_box.setObjectName("gpu_row")
        row = QHBoxLayout(self.gpu_box)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(label)
        row.addWidget(self.gpus)
        row.addWidget(self.gpus_of, 1)
        self.gpu_box.hide()
        return self.gpu_box

    def _allocation_box(self) -> QCheckBox:
        """"Per-module ranks": the emulator's opt-in ``allocation="spectral"`` (emloc run --allocation spectral).

        Only the build time changes on this page: the spectral plan never keeps more parameters than
        the uniform one and its extra pass runs within the build's memory, so the bars stay as they are.
        """
        self.allocation = QCheckBox("Per-module ranks (slower build, measured better at ρ ≥ 0.4)")
        self.allocation.setObjectName("allocation")
        self.allocation.setToolTip(option_help("emulator.allocation"))
        self.allocation.toggled.connect(self._settings_changed)
        return self.allocation

    def allocation_choice(self) -> str:
        """``EmulatorOptions.allocation`` for the checkbox: "spectral" when checked, else "uniform"."""
        return "spectral" if self.allocation.isChecked() else "uniform"

    def _anchor_box(self) -> QCheckBox:
        """"Anchor training": ``TrainOptions.anchor`` "auto" (checked, the default) or "none" (emloc run --anchor none).

        The planner adds the anchors of the micro-batch to the train stage's bar and one pass of the
        original and of the emulator to its time, so toggling re-plans.
        """
        self.anchor = QCheckBox("Anchor training to the original (measured: far more of the gain reaches it)")
        self.anchor.setObjectName("anchor")
        self.anchor.setChecked(True)
        self._anchor_help = option_help("train.anchor")
        self.anchor.setToolTip(self._anchor_help)
        self.anchor.toggled.connect(self._settings_changed)
        return self.anchor

    def anchor_choice(self) -> str:
        """``TrainOptions.anchor`` for the checkbox: "auto" when checked, else "none".

        With several GPUs each one computes the offsets of its own examples (the engine's anchor_chunks).
        A run made with "blocks" or "linears" (the CLI's) keeps it while the box stays checked.
        """
        if not self.anchor.isChecked():
            return "none"
        recorded = self.state.config.train.anchor if self.state.config is not None else "auto"
        return recorded if recorded != "none" else "auto"

    def _update_anchor_box(self) -> None:
        """Anchoring works on any number of GPUs: the checkbox stays enabled, with the setting's help."""
        self.anchor.setEnabled(True)
        self.anchor.setToolTip(self._anchor_help)

    def _init_gpus(self, saved: int | None) -> None:
        """Offer the GPU count when the machine has several CUDA GPUs; 1 (hidden) otherwise."""
        gpus = multi_gpus(self.state.machine, self.state.gpu_index)
        n = len(gpus)
        self.gpus.setRange(1, max(1, n))
        self.gpus.setValue(min(saved, n) if saved and n else default_gpu_count(gpus))
        self.gpus_of.setText(f"of {n} ({', '.join(sorted({g.name for g in gpus}))}); "
                             "data-parallel training, memory shown per GPU" if n else "")
        self.gpu_box.setVisible(n >= 2)

    def gpu_count(self) -> int:
        """GPUs the run uses (1 unless the GPU control is offered and set higher)."""
        return int(self.gpus.value()) if multi_gpus(self.state.machine, self.state.gpu_index) else 1

    def lambda_choice(self) -> float | None:
        """λ of the combo box (None: chosen on held-out data)."""
        value: object = self.lambda_.currentData()
        return float(value) if isinstance(value, (int, float)) else None

    def _select_lambda(self, lam: float | None) -> None:
        """Select ``lam`` in the combo box, adding it when it is not one of the choices (a CLI run's)."""
        for i in range(self.lambda_.count()):
            value: object = self.lambda_.itemData(i)
            if value == lam or (isinstance(value, float) and lam is not None and math.isinf(value) and math.isinf(lam)):
                self.lambda_.setCurrentIndex(i)
                return
        self.lambda_.addItem(f"{lam:g} (this run's)", lam)
        self.lambda_.setCurrentIndex(self.lambda_.count() - 1)

    # -- state in ----------------------------------------------------------------------------
    def fresh_config(self) -> RunConfig | None:
        """The settings of a new run: the engine's defaults (Balanced), the demo's on :data:`DEMO_PRESET`.

        None until the model and the data are chosen.
        """
        s = self.state
        if s.model_dir is None or s.data_config is None:
            return None
        cfg = RunConfig(model_dir=s.model_dir, data=s.data_config, run_dir=self._run_dir)
        return apply_preset(cfg, DEMO_PRESET) if s.model is not None and is_demo(s.model) else cfg

    def _load_settings(self, cfg: RunConfig | None) -> None:
        """Show ``cfg``'s settings in the widgets (None: the engine's defaults); replans nothing."""
        train = cfg.train if cfg is not None else TrainOptions()
        for name, value in dataclasses.asdict(train).items():
            w = self.settings.get(name)
            if isinstance(w, QSpinBox):
                w.setValue(int(value))
            elif w is not None:
                w.setValue(float(value))
        self.allocation.setChecked(cfg is not None and cfg.emulator.allocation == "spectral")
        self.anchor.setChecked(cfg is None or cfg.train.anchor != "none")
        self.seed.setValue(cfg.seed if cfg is not None else 0)
        self._select_lambda(cfg.correct.lambda_ if cfg is not None else None)
        self._calib = cfg.calib if cfg is not None else DEFAULT_CALIB

    def initializePage(self) -> None:
        self._loading = True
        s, cfg = self.state, self.state.config
        self._run_dir = s.run_dir or self._pending_run_dir()
        self._init_gpus(cfg.gpus if cfg is not None else None)
        self._load_settings(cfg if cfg is not None else self.fresh_config())
        self._update_anchor_box()
        ratio = cfg.ratio if cfg is not None else None
        self.auto_ratio.setChecked(ratio is None)
        self.slider.setEnabled(ratio is not None)
        if ratio is not None:
            self.slider.setValue(round(ratio * 100))
        self._estimates_key = None
        self._loading = False
        self.replan()

    def _pending_run_dir(self) -> Path:
        """The folder the next run will use, named once: going Back and Next again keeps it, so the folder
        "Show command…" printed is the one the run then uses. A new name only for another model (the
        name starts with it) or when the folder exists by now (another run took it)."""
        s = self.state
        named = self._named_run_dir
        fresh = s.new_run_dir(paths.runs_dir())
        if named is not None and named.name.rsplit("-", 2)[0] == fresh.name.rsplit("-", 2)[0] and not named.exists():
            return named
        self._named_run_dir = fresh
        return fresh

    def _preset_chosen(self, name: str) -> None:
        """Set the widgets to the preset's settings (the engine's :func:`apply_preset`) and replan."""
        try:
            cfg = apply_preset(self.run_config(), name)
        except EngineError as exc:
            self.banner.show_error(exc, retry=False)
            return
        self._loading = True
        self._load_settings(cfg)
        self._update_anchor_box()
        self._loading = False
        self.replan()

    # -- widgets -> RunConfig -> plan_run ------------------------------------------------------
    def train_options(self, base: TrainOptions) -> TrainOptions:
        """``base`` (the run's or the defaults) with the page's settings; fields not on the page are kept."""
        w = self.settings
        return dataclasses.replace(
            base, rank=int(w["rank"].value()), alpha=float(w["alpha"].value()), dropout=float(w["dropout"].value()),
            steps=int(w["steps"].value()), lr=float(w["lr"].value()), batch_size=int(w["batch_size"].value()),
            grad_accum=int(w["grad_accum"].value()), warmup_steps=int(w["warmup_steps"].value()),
            eval_every=int(w["eval_every"].value()), save_every=int(w["save_every"].value()),
            anchor=self.anchor_choice())

    def run_config(self) -> RunConfig:
        """The run's settings: the earlier pages' answers and this page's widgets.

        Raises:
            ConfigError: a choice the engine refuses (named), or the model or data not chosen yet.
        """
        s = self.state
        if s.model_dir is None or s.data_config is None:
            raise ConfigError("The model or the data is not chosen yet.", hint="Go back to the Model and Data pages.")
        base = s.config  # what the run (or an earlier visit) set, including settings this page does not show
        auto = self.auto_ratio.isChecked()
        n = self.gpu_count()
        cfg = RunConfig(
            model_dir=s.model_dir, data=s.data_config, run_dir=self._run_dir,
            ratio=None if auto else self.slider.value() / 100, budget_bytes=s.budget_bytes,
            gpu_memory_bytes=s.gpu_memory_bytes,
            device="cuda" if n > 1 else s.device, gpus=n, seed=int(self.seed.value()),
            emulator=dataclasses.replace(base.emulator if base is not None else EmulatorOptions(),
                                         allocation=self.allocation_choice()),
            train=self.train_options(base.train if base is not None else TrainOptions()),
            correct=dataclasses.replace(base.correct if base is not None else CorrectionOptions(),
                                        lambda_=self.lambda_choice()),
            export=base.export if base is not None else ExportOptions())
        return dataclasses.replace(cfg, calib=self._calib)

    def replan(self) -> None:
        """Plan the run the widgets describe (pure arithmetic and file headers: fast enough for the GUI thread)."""
        if self._loading:
            return
        self.banner.clear()
        try:
            cfg = self.run_config()
            machine = self.state.machine
            plan = self.plan_of(cfg, machine)
        except EngineError as exc:  # InsufficientMemory lists the settings that would fit
            self.run_plan = None
            self.bars.set_rows([], None)
            self.verdict.setText("")
            self.duration.setText("")
            self.banner.show_error(exc, retry=not isinstance(exc, ConfigError))
            self.completeChanged.emit()
            return
        self.run_plan = plan
        self._show_plan(plan)
        self.presets.set_current(matching_preset(cfg))
        self._update_estimates(cfg)
        self.completeChanged.emit()

    def plan_of(self, cfg: RunConfig, machine: MachineInfo | None) -> RunPlan:
        """``plan_run`` with what the Data page's report knows: the typical sample length (the time
        estimate) and the held-out sequences (the λ search's memory)."""
        return plan_run(cfg, machine, sample_tokens=self.sample_tokens(cfg),
                        eval_sequences=eval_sequences_of(self.state.data_report))

    def sample_tokens(self, cfg: RunConfig) -> int | None:
        """The inspected data's typical padded sample length (the Data page's report), for the time estimate."""
        return sample_tokens_of(self.state.data_report, cfg.train.batch_size)

    def _update_estimates(self, cfg: RunConfig) -> None:
        """Each preset's predicted time and memory on this machine, re-planned only when a setting no
        preset sets has changed (ρ, the GPUs, the batch, …): three plans per keystroke would lag."""
        key = apply_preset(cfg, "balanced")
        if key == self._estimates_key:
            return
        self._estimates_key = key
        for p in PRESETS:
            try:
                preset_cfg = apply_preset(cfg, p.name)
                plan = self.plan_of(preset_cfg, self.state.machine)
            except EngineError:
                self.presets.set_estimate(p.name, PresetEstimate(None, None, None, False))
                continue
            self.presets.set_estimate(p.name, self.estimate(plan))

    def estimate(self, plan: RunPlan) -> PresetEstimate:
        """Time and memory of a plan: the peak of its stages, and what the device then has left free."""
        peak = peak_bytes(plan.memory)
        on_cpu = plan.record.device == "cpu"
        if on_cpu:  # the device is the RAM: what the whole run holds (the original, anchors), not one stage's tensors
            peak = max(peak, plan.memory.ram_bytes)
        spectral = plan.config.emulator.allocation == "spectral"
        seconds = estimated_seconds(plan.memory, emulator_factor=SPECTRAL_BUILD_FACTOR if spectral else 1.0)
        gpu, machine = self.state.gpu, self.state.machine
        free = gpu.free_bytes if gpu is not None else (machine.ram_available_bytes if machine is not None else None)
        return PresetEstimate(seconds, peak, free - peak if free is not None else None, plan.memory.fits,
                              "RAM" if on_cpu else "GPU memory", plan.ratio)

    def _show_plan(self, plan: RunPlan) -> None:
        memory = plan.memory
        if self.auto_ratio.isChecked():
            self.slider.blockSignals(True)
            self.slider.setValue(round(plan.ratio * 100))
            self.slider.blockSignals(False)
        self.ratio_label.setText(f"{plan.ratio:.2f}")
        self.bars.set_plan(memory)
        if memory.fits:
            text = (f"<span style='color:#22a06b'><b>Fits</b></span> in the budget of {gib(memory.budget_bytes)}. "
                    f"{memory.reason}")
        else:
            tips = "; ".join(memory.suggestions)
            text = (f"<span style='color:#d9534f'><b>Predicted to exceed the budget</b></span> "
                    f"({gib(memory.budget_bytes)}). {memory.reason}" + (f"<br>Try: {tips}" if tips else ""))
        notes = list(dict.fromkeys([*memory.notes, *plan.notes]))
        if plan.budget_note not in ("user budget", "inference peak"):
            notes.append(f"Budget: {plan.budget_note}.")
        if self.gpu_count() > 1:
            notes.insert(0, f"Memory per GPU: {self.gpu_count()} GPUs train data-parallel, each on a share "
                            "of every batch.")
        if notes:
            text += "<br>" + "<br>".join(notes)
        self.verdict.setText(text)
        est = self.estimate(plan)
        free = (f", leaving {max(0, est.left_free_bytes) / GIB:.1f} GiB free" if est.left_free_bytes is not None
                else "")
        self.duration.setText(f"Takes <b>{rough_duration(est.seconds or 0.0)}</b> on this machine and at most "
                              f"<b>{gib(est.peak_bytes)}</b> of {est.memory_word}{free}."
                              + ram_note(memory, on_cpu=plan.record.device == "cpu"))

    def _ratio_mode_changed(self, auto: bool) -> None:
        self.slider.setEnabled(not auto)
        self.replan()

    def _ratio_changed(self, value: int) -> None:
        self.ratio_label.setText(f"{value / 100:.2f}")
        if not self.auto_ratio.isChecked():
            self.replan()

    def _settings_changed(self) -> None:
        if not self._loading:
            self._update_anchor_box()
            self.replan()

    # -- "Show command…" ----------------------------------------------------------------------
    def command(self) -> str:
        """The ``emloc run`` command of the planned settings (the engine's ``command_line``)."""
        cfg = self.run_plan.config if self.run_plan is not None else self.run_config()
        return shlex.join(command_line(cfg))

    def _show_command(self) -> None:
        try:
            command = self.command()
        except EngineError as exc:
            self.banner.show_error(exc, retry=False)
            return
        dlg = QDialog(self)
        dlg.setWindowTitle("Equivalent command")
        text = QPlainTextEdit(command)
        text.setReadOnly(True)
        text.setObjectName("Preview")
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        copy = buttons.addButton("&Copy", QDialogButtonBox.ButtonRole.ActionRole)
        copy.clicked.connect(lambda: QGuiApplication.clipboard().setText(text.toPlainText()))
        buttons.rejected.connect(dlg.reject)
        lay = QVBoxLayout(dlg)
        lay.addWidget(QLabel("Run the same fine-tune from a terminal (resumable; the app can open the run folder):"))
        lay.addWidget(text)
        lay.addWidget(buttons)
        dlg.resize(720, 200)
        self._command_dialog = dlg
        dlg.open()

    # -- wizard protocol ---------------------------------------------------------------------
    def isComplete(self) -> bool:
        return self.run_plan is not None

    def validatePage(self) -> bool:
        self.replan()  # the plan of exactly what the widgets show now
        if self.run_plan is None:
            return False
        s = self.state
        s.config, s.run_plan, s.run_dir = self.run_plan.config, self.run_plan, self.run_plan.config.run_dir
        return True


def _spin_for(name: str, default: object) -> QSpinBox | QDoubleSpinBox:
    """A spin box for an option: integer or decimal after its default's type, with a sensible range."""
    if isinstance(default, int):
        w = QSpinBox()
        w.setRange(0 if name in ("warmup_steps", "seed") else 1, 2**31 - 1)
        w.setValue(default)
        return w
    d = QDoubleSpinBox()
    if name == "lr":
        d.setDecimals(6)
        d.setRange(1e-7, 1.0)
        d.setSingleStep(1e-5)
    elif name == "dropout":
        d.setRange(0.0, 0.9)
        d.setSingleStep(0.05)
    else:
        d.setRange(0.01, 10_000.0)
    d.setValue(float(default) if isinstance(default, float) else 0.0)
    return d
