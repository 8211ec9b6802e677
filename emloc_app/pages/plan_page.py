"""Page 4: the memory plan (ρ, bars against the budget), LoRA and training settings, duration."""

from __future__ import annotations

import math
import shlex
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from emloc_app.pages.common import GIB, BasePage, field_defaults, field_help, gib
from emloc_app.pages.model_page import is_demo
from emloc_app.state import StageConfigs, WizardState
from emloc_app.widgets.vram_bar import VramBar
from emloc_engine.core import paths
from emloc_engine.core.errors import ConfigError, EngineError
from emloc_engine.core.layout import RunLayout
from emloc_engine.core.progress import format_seconds
from emloc_engine.machine.hardware import GpuInfo, MachineInfo
from emloc_engine.run.planning import MemoryPlan, PlanConfig, model_facts, plan_memory

LABELS = {
    "rank": "LoRA &rank", "alpha": "LoRA &alpha", "dropout": "&Dropout", "steps": "&Steps",
    "lr": "&Learning rate", "batch_size": "&Batch size", "grad_accum": "&Gradient accumulation",
    "warmup_steps": "&Warm-up steps", "eval_every": "&Evaluate every", "save_every": "Check&point every",
    "seed": "S&eed",
}
"""The training settings on the page (``TrainConfig`` fields, in grid order); defaults and tooltips are the engine's."""
DEMO_OVERRIDES: dict[str, int | float] = {"steps": 60, "lr": 5e-4, "eval_every": 20, "save_every": 20}
"""The demo (SmolLM2-135M on the Shakespeare dialogue set, often on a laptop CPU) should show a visible
change in minutes: fewer, larger steps. Measured while building the demo: 40 peft LoRA steps at lr 5e-4
turned "The king is a just ruler…" into "King John: / I have been in the king's court…". Applied only
while the user has not changed the engine's defaults."""
LAMBDA_CHOICES = (("auto (chosen on held-out data)", None), ("3 (paper default)", 3.0),
                  ("exact (∞)", math.inf), ("none (0)", 0.0))
ANCHOR_ONE_GPU = ("Anchored training runs on one GPU: with several GPUs the trainer's auto turns it off "
                  "(emloc run --gpus N). Set GPUs to 1 to anchor.")
SPECTRAL_BUILD_FACTOR = 2.0
"""How much longer the emulator build takes with ``allocation="spectral"``: benchmarks/RESULTS.md
measured 115.5 s vs 57.0 s (Llama-3-8B shapes, one H200; the extra streaming pass that measures the
spectra took 60.3 s), so the planner's uniform-build estimate is doubled."""
SIMILAR_MEMORY = 0.9  # GPUs whose memory differs by less than 10% count as alike


def train_defaults() -> dict[str, int | float]:
    """``TrainConfig``'s defaults of the settings on the page (imports the trainer, hence torch)."""
    from emloc_engine.stages.training.trainer import TrainConfig

    defaults = field_defaults(TrainConfig)
    out: dict[str, int | float] = {}
    for name in LABELS:
        value = defaults[name]
        if not isinstance(value, (int, float)):
            raise TypeError(f"TrainConfig.{name} has a non-numeric default {value!r}")
        out[name] = value
    return out


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


def lambda_text(lam: float | None) -> str:
    if lam is None:
        return "auto"
    return "inf" if math.isinf(lam) else f"{lam:g}"


class PlanPage(BasePage):
    """Shows the planner's choice and lets the user override ρ and the training settings."""

    def __init__(self, state: WizardState, parent: QWidget | None = None) -> None:
        super().__init__(state, parent)
        self.setTitle("Plan")
        self.setSubTitle("How much of each layer the emulator keeps (ρ), what every stage will need, "
                         "and how training runs.")
        # ρ
        self.auto_ratio = QCheckBox("Let the planner choose ρ")
        self.auto_ratio.setObjectName("auto_ratio")
        self.auto_ratio.setChecked(True)
        self.auto_ratio.toggled.connect(self._ratio_mode_changed)
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setObjectName("ratio")
        self.slider.setRange(5, 100)
        self.slider.setPageStep(5)
        self.slider.setTickInterval(10)
        self.slider.setTickPosition(QSlider.TickPosition.TicksBelow)
        self.slider.setToolTip("ρ: fraction of each compressed layer's parameters the emulator keeps. "
                               "Lower needs less memory; higher trains on a more faithful emulator.")
        self.slider.valueChanged.connect(self._ratio_changed)
        self.ratio_label = QLabel()
        self.ratio_label.setObjectName("BigNumber")
        self.bars = VramBar()
        self.verdict = QLabel()
        self.verdict.setWordWrap(True)
        self.duration = QLabel()
        rho_box = QGroupBox("Emulator and memory")
        rl = QVBoxLayout(rho_box)
        r1 = QHBoxLayout()
        r1.addWidget(QLabel("ρ ="))
        r1.addWidget(self.ratio_label)
        r1.addWidget(self.slider, 1)
        r1.addWidget(self.auto_ratio)
        rl.addLayout(r1)
        rl.addWidget(self.bars)
        rl.addWidget(self._gpu_row())
        rl.addWidget(self._allocation_box())
        rl.addWidget(self._anchor_box())
        rl.addWidget(self.verdict)
        rl.addWidget(self.duration)
        self.body.addWidget(rho_box)

        # training settings: widgets made on the first visit, from TrainConfig's fields (defaults, help)
        self.settings: dict[str, QSpinBox | QDoubleSpinBox] = {}
        self.settings_box = QGroupBox("LoRA and training")
        self.settings_grid = QGridLayout(self.settings_box)
        self.lambda_ = QComboBox()
        self.lambda_.setObjectName("lambda")
        for text, value in LAMBDA_CHOICES:
            self.lambda_.addItem(text, value)
        self.lambda_.currentIndexChanged.connect(self._settings_changed)
        self.body.addWidget(self.settings_box)

        self.show_command = QPushButton("Show &command…")
        self.show_command.setToolTip("The equivalent `emloc run …` command, for scripts and servers.")
        self.show_command.clicked.connect(self._show_command)
        row = QHBoxLayout()
        row.addWidget(self.hint("Hover any setting for what it does."), 1)
        row.addWidget(self.show_command)
        self.body.addLayout(row)
        self.body.addStretch(1)
        self.plan: MemoryPlan | None = None
        self._loading = False
        self._anchor_help = ""
        self._defaults: dict[str, int | float] = {}

    def _gpu_row(self) -> QWidget:
        """The "GPUs" control: a spin box 1..N, shown only when ≥ 2 CUDA GPUs are detected.

        A spin box rather than a "use all GPUs" checkbox: on a machine of 4 or 8 GPUs some are
        often busy, and using 2 of them must be possible; with 2 GPUs it reads as "GPUs [2] of 2".
        The GPUs used are 0..N−1, as with ``emloc run --gpus N``, so "Show command…" runs the same.
        """
        self.gpus = QSpinBox()
        self.gpus.setObjectName("gpus")
        self.gpus.setRange(1, 1)
        self.gpus.setToolTip("GPUs that train the LoRA data-parallel (emloc run --gpus N): each holds the "
                             "whole emulator and a share of every batch, so the bars show the memory of one "
                             "GPU and training takes about 1/N of the time. The emulator build also "
                             "factorises on the extra GPUs.")
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
        self.allocation.toggled.connect(self._settings_changed)
        return self.allocation

    def allocation_choice(self) -> str:
        """``EmulatorConfig.allocation`` for the checkbox: "spectral" when checked, else "uniform"."""
        return "spectral" if self.allocation.isChecked() else "uniform"

    def _anchor_box(self) -> QCheckBox:
        """"Anchor training": ``TrainConfig.anchor`` "auto" (checked, the default) or "none" (emloc run --anchor none).

        The planner adds the anchors of the micro-batch to the train stage's bar and one pass of the
        original and of the emulator to its time (``PlanConfig.anchored``), so toggling re-plans.
        """
        self.anchor = QCheckBox("Anchor training to the original (measured: far more of the gain reaches it)")
        self.anchor.setObjectName("anchor")
        self.anchor.setChecked(True)
        self.anchor.toggled.connect(self._settings_changed)
        return self.anchor

    def anchor_choice(self) -> str:
        """``TrainConfig.anchor`` for the checkbox: "auto" when checked, else "none".

        Checked stays "auto" with several GPUs too: the trainer's auto turns anchoring off there.
        """
        return "auto" if self.anchor.isChecked() else "none"

    def _update_anchor_box(self) -> None:
        """Anchoring runs on one GPU: the checkbox is disabled (its choice kept) while GPUs > 1."""
        several = self.gpu_count() > 1
        self.anchor.setEnabled(not several)
        self.anchor.setToolTip(f"{ANCHOR_ONE_GPU}\n\n{self._anchor_help}" if several else self._anchor_help)

    def _init_gpus(self) -> None:
        """Offer the GPU count when the machine has several CUDA GPUs; 1 (hidden) otherwise."""
        gpus = multi_gpus(self.state.machine, self.state.gpu_index)
        n = len(gpus)
        saved = self.state.gpus
        self.gpus.setRange(1, max(1, n))
        self.gpus.setValue(min(saved, n) if saved and n else default_gpu_count(gpus))
        self.gpus_of.setText(f"of {n} ({', '.join(sorted({g.name for g in gpus}))}); "
                             "data-parallel training, memory shown per GPU" if n else "")
        self.gpu_box.setVisible(n >= 2)

    def gpu_count(self) -> int:
        """GPUs the run uses (1 unless the GPU control is offered and set higher)."""
        return int(self.gpus.value()) if multi_gpus(self.state.machine, self.state.gpu_index) else 1

    # -- the engine's fields -----------------------------------------------------------------
    def _load_engine_fields(self) -> None:
        """On the first visit: the training settings' widgets and every tooltip, from the engine's config fields.

        Not in ``__init__``: the stage modules import torch, and the wizard builds every page at start-up.
        """
        if self.settings:
            return
        from emloc_engine.stages.correction.corrector import CorrectionConfig
        from emloc_engine.stages.emulator.builder import EmulatorConfig
        from emloc_engine.stages.training.trainer import TrainConfig

        self._defaults = train_defaults()
        help_ = field_help(TrainConfig)
        for i, (name, default) in enumerate(self._defaults.items()):
            w = _spin_for(name, default)
            w.setObjectName(name)
            w.setToolTip(help_[name])
            w.valueChanged.connect(self._settings_changed)
            label = QLabel(LABELS[name])
            label.setBuddy(w)
            label.setToolTip(w.toolTip())
            self.settings_grid.addWidget(label, i // 3, (i % 3) * 2)
            self.settings_grid.addWidget(w, i // 3, (i % 3) * 2 + 1)
            self.settings[name] = w
        self.lambda_.setToolTip(field_help(CorrectionConfig)["lambda_"])
        n = len(self._defaults)
        lam_label = QLabel("Correction &λ")
        lam_label.setBuddy(self.lambda_)
        self.settings_grid.addWidget(lam_label, n // 3, (n % 3) * 2)
        self.settings_grid.addWidget(self.lambda_, n // 3, (n % 3) * 2 + 1)
        for c in (1, 3, 5):
            self.settings_grid.setColumnStretch(c, 1)
        self.allocation.setToolTip(field_help(EmulatorConfig)["allocation"])
        self._anchor_help = help_["anchor"]
        self.anchor.setToolTip(self._anchor_help)

    def initial_settings(self) -> dict[str, int | float]:
        """The engine's defaults, the demo's quicker ones while untouched, then what the user set before."""
        s, defaults = self.state, self._defaults
        untouched = not s.train_settings or s.train_settings == defaults
        if untouched and s.model is not None and is_demo(s.model):
            return {**defaults, **DEMO_OVERRIDES}
        return {**defaults, **s.train_settings}

    # -- state in ----------------------------------------------------------------------------
    def initializePage(self) -> None:
        self._loading = True
        self._load_engine_fields()
        s = self.state
        self._init_gpus()
        self.allocation.setChecked(s.allocation == "spectral")
        self.anchor.setChecked(s.anchor != "none")
        self._update_anchor_box()
        for name, value in self.initial_settings().items():
            w = self.settings[name]
            if isinstance(w, QSpinBox):
                w.setValue(int(value))
            else:
                w.setValue(value)
        idx = next((i for i, (_, v) in enumerate(LAMBDA_CHOICES) if v == s.lambda_ or (
            v is not None and s.lambda_ is not None and math.isinf(v) and math.isinf(s.lambda_))), 0)
        self.lambda_.setCurrentIndex(idx)
        self.auto_ratio.setChecked(s.ratio is None)
        self.slider.setEnabled(s.ratio is not None)
        if s.ratio is not None:
            self.slider.setValue(round(s.ratio * 100))
        self._loading = False
        self.replan()

    # -- planning (pure arithmetic in the engine: fast enough for the GUI thread) --------------
    def lambda_choice(self) -> float | None:
        """λ of the combo box (None: chosen on held-out data)."""
        value: object = self.lambda_.currentData()
        return float(value) if isinstance(value, (int, float)) else None

    def plan_config(self) -> PlanConfig:
        s = self.state
        gpu = s.gpu
        ratio = None if self.auto_ratio.isChecked() else self.slider.value() / 100
        n = self.gpu_count()
        total = gpu.total_bytes if gpu is not None else None
        if n > 1:  # GPUs 0..n-1; the smallest of them bounds every one's share
            total = min(g.total_bytes for g in multi_gpus(s.machine, s.gpu_index)[:n])
        return PlanConfig(
            budget_bytes=s.budget_bytes, gpu_total_bytes=total, num_gpus=n, context_length=s.max_length,
            batch_size=int(self.settings["batch_size"].value()), lora_rank=int(self.settings["rank"].value()),
            ratio=ratio, device=s.plan_device, gpu_name=gpu.name if gpu is not None else None,
            calibration_samples=s.n_calibration, train_steps=int(self.settings["steps"].value()),
            auto_lambda=self.lambda_choice() is None, anchored=self.anchor.isChecked())

    def replan(self) -> None:
        if self._loading or not self.settings:  # not shown yet
            return
        self.banner.clear()
        try:
            if self.state.facts is None:
                if self.state.model_dir is None:
                    raise ConfigError("No model chosen.", hint="Choose one on the Model page.")
                self.state.facts = model_facts(self.state.model_dir)
            plan = plan_memory(self.state.facts, self.plan_config())
        except EngineError as exc:
            self.plan = None
            self.banner.show_error(exc)
            self.completeChanged.emit()
            return
        self.plan = plan
        ratio = plan.ratio if plan.ratio is not None else 0.5
        if self.auto_ratio.isChecked():
            self.slider.blockSignals(True)
            self.slider.setValue(round(ratio * 100))
            self.slider.blockSignals(False)
        self.ratio_label.setText(f"{ratio:.2f}")
        self.bars.set_plan(plan)
        if plan.fits:
            text = f"<span style='color:#22a06b'><b>Fits</b></span> in {gib(plan.budget_bytes)}. {plan.reason}"
        else:
            tips = "; ".join(plan.suggestions)
            text = (f"<span style='color:#d9534f'><b>Predicted to exceed the budget</b></span> "
                    f"({gib(plan.budget_bytes)}). {plan.reason}" + (f"<br>Try: {tips}" if tips else ""))
        notes = list(plan.notes)
        if self.gpu_count() > 1:
            notes.insert(0, f"Memory per GPU: {self.gpu_count()} GPUs train data-parallel, each on a share "
                            "of every batch.")
        if notes:
            text += "<br>" + "<br>".join(notes)
        self.verdict.setText(text)
        spectral = self.allocation.isChecked()
        seconds = estimated_seconds(plan, emulator_factor=SPECTRAL_BUILD_FACTOR if spectral else 1.0)
        self.duration.setText(f"Estimated duration: <b>{format_seconds(seconds)}</b> (emulator"
                              + (" ×2 for per-module ranks" if spectral else "") + ", training, correction)")
        self.completeChanged.emit()

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

    # -- widgets -> configs ------------------------------------------------------------------
    def train_settings(self) -> dict[str, int | float]:
        return {name: (int(w.value()) if isinstance(w, QSpinBox) else float(w.value()))
                for name, w in self.settings.items()}

    def build_configs(self, run_dir: Path) -> StageConfigs:
        """The engine configs of the three stages (raises ``ConfigError`` for bad settings).

        With N > 1 GPUs, as ``emloc run --gpus N`` does: the emulator builds on ``cuda:0`` and
        factorises on ``cuda:1..N-1``, training runs on GPUs 0..N−1, correction stays on one GPU.
        """
        from emloc_engine.stages.correction.corrector import CorrectionConfig
        from emloc_engine.stages.emulator.builder import EmulatorConfig
        from emloc_engine.stages.training.trainer import TrainConfig

        s = self.state
        if s.model_dir is None or s.data_config is None:
            raise ConfigError("The model or the data is not chosen yet.", hint="Go back to the Model and Data pages.")
        layout = RunLayout(run_dir)
        ratio = self.plan.ratio if self.plan is not None and self.plan.ratio is not None else self.slider.value() / 100
        n = self.gpu_count()
        emulator = EmulatorConfig(model_dir=s.model_dir, out_dir=layout.emulator, calibration_ids=s.calibration_ids,
                                  ratio=ratio, device="cuda:0" if n > 1 else s.device,
                                  memory_budget_bytes=s.budget_bytes,
                                  factor_devices=tuple(f"cuda:{i}" for i in range(1, n)),
                                  allocation=self.allocation_choice())
        t = self.train_settings()
        train = TrainConfig(run_dir=run_dir, data=s.data_config, emulator_dir=layout.emulator,
                            device="cuda" if n > 1 else s.device, anchor=self.anchor_choice(),
                            rank=int(t["rank"]), alpha=t["alpha"], dropout=t["dropout"], steps=int(t["steps"]),
                            lr=t["lr"], batch_size=int(t["batch_size"]), grad_accum=int(t["grad_accum"]),
                            warmup_steps=int(t["warmup_steps"]), eval_every=int(t["eval_every"]),
                            save_every=int(t["save_every"]), seed=int(t["seed"]))
        correct = CorrectionConfig(run_dir=run_dir, model_dir=s.model_dir, adapter_dir=layout.adapter,
                                   emulator_dir=layout.emulator, data=s.data_config, lambda_=self.lambda_choice(),
                                   device=s.device)
        return StageConfigs(emulator, train, correct, gpus=n)

    def command(self) -> str:
        """The ``emloc run`` command that does what the wizard is about to do."""
        s, t = self.state, self.train_settings()
        run_dir = s.run_dir or s.new_run_dir(paths.runs_dir())
        args = ["emloc", "run", str(s.model_dir), str(s.data_path), "--out", str(run_dir)]
        if self.auto_ratio.isChecked() and s.budget_bytes:
            args += ["--budget-gib", f"{s.budget_bytes / GIB:.1f}"]
        else:
            args += ["--ratio", f"{self.slider.value() / 100:.2f}"]
        args += ["--rank", str(t["rank"]), "--alpha", f"{t['alpha']:g}", "--steps", str(t["steps"]),
                 "--lr", f"{t['lr']:g}", "--lambda", lambda_text(self.lambda_choice()),
                 "--calib", str(s.n_calibration), "--max-length", str(s.max_length),
                 "--device", "cpu" if s.device == "cpu" else ("cuda" if s.device.startswith("cuda") else "auto"),
                 "--seed", str(t["seed"])]
        if self.gpu_count() > 1:
            args += ["--gpus", str(self.gpu_count())]
        if self.allocation.isChecked():
            args += ["--allocation", "spectral"]
        if not self.anchor.isChecked():  # auto is the default
            args += ["--anchor", "none"]
        return shlex.join(args)

    def _show_command(self) -> None:
        dlg = QDialog(self)
        dlg.setWindowTitle("Equivalent command")
        text = QPlainTextEdit(self.command())
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
        return self.plan is not None

    def validatePage(self) -> bool:
        s = self.state
        run_dir = s.run_dir or s.new_run_dir(paths.runs_dir())
        s.train_settings = self.train_settings()
        s.lambda_ = self.lambda_choice()
        s.ratio = None if self.auto_ratio.isChecked() else self.slider.value() / 100
        s.plan = self.plan
        s.gpus = self.gpu_count()
        s.allocation = self.allocation_choice()
        s.anchor = self.anchor_choice()
        try:
            configs = self.build_configs(run_dir)
        except ConfigError as exc:
            self.banner.show_error(exc, retry=False)
            return False
        except EngineError as exc:
            self.banner.show_error(exc)
            return False
        s.configs = configs
        s.run_dir = run_dir
        return True


def estimated_seconds(plan: MemoryPlan, emulator_factor: float = 1.0) -> float:
    """Sum of the planner's per-stage estimates of the emulator, training and correction (export excluded).

    ``emulator_factor`` scales the emulator stage's estimate (the planner estimates the uniform
    build; :data:`SPECTRAL_BUILD_FACTOR` for per-module ranks).
    """
    return sum(v * (emulator_factor if name == "emulator" else 1.0)
               for name, v in plan.est_seconds.items() if name != "export")


def _spin_for(name: str, default: int | float) -> QSpinBox | QDoubleSpinBox:
    if isinstance(default, int):
        w = QSpinBox()
        w.setRange(0 if name in ("warmup_steps", "seed") else 1, 10_000_000)
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
    d.setValue(float(default))
    return d


