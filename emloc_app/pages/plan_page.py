"""Page 4: the memory plan (ρ, bars against the budget), LoRA and training settings, duration."""

from __future__ import annotations

import math
import shlex
from typing import Any

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

from emloc_app.engine_facade import EngineFacade
from emloc_app.pages.common import GIB, BasePage, gib
from emloc_app.state import TRAIN_DEFAULTS, WizardState, apply_demo_defaults
from emloc_app.widgets.vram_bar import VramBar
from emloc_engine.core import paths
from emloc_engine.core.errors import ConfigError, EngineError
from emloc_engine.core.layout import RunLayout
from emloc_engine.core.progress import format_seconds

LABELS = {
    "rank": "LoRA &rank", "alpha": "LoRA &alpha", "dropout": "&Dropout", "steps": "&Steps",
    "lr": "&Learning rate", "batch_size": "&Batch size", "grad_accum": "&Gradient accumulation",
    "warmup_steps": "&Warm-up steps", "eval_every": "&Evaluate every", "save_every": "Check&point every",
    "seed": "S&eed",
}
LAMBDA_CHOICES = (("auto (chosen on held-out data)", None), ("3 (paper default)", 3.0),
                  ("exact (∞)", math.inf), ("none (0)", 0.0))
PARALLEL_KEY = "parallel"
"""``state.configs[PARALLEL_KEY]``: keyword arguments of the engine's ``ParallelConfig`` (``processes``,
``gpu_ids``); the Run page trains data-parallel when ``processes`` > 1. Also how the Plan page
remembers the GPU count between visits."""
ALLOCATION_KEY = "allocation"
"""``state.configs[ALLOCATION_KEY]``: the emulator's rank allocation, ``"uniform"`` or ``"spectral"``
(``EmulatorConfig.allocation``); how the Plan page remembers the "Per-module ranks" choice between
visits and when a run is reopened, and what the Run page records in the manifest."""
ANCHOR_KEY = "anchor"
"""``state.configs[ANCHOR_KEY]``: the trainer's anchoring, ``"auto"`` or ``"none"`` (``TrainConfig.anchor``);
how the Plan page remembers the "Anchor training" choice between visits and when a run is reopened, and
what the Run page records in the manifest. ``"blocks"`` (anchor or fail) is left to the command line."""
ANCHOR_ONE_GPU = ("Anchored training runs on one GPU: with several GPUs the trainer's auto turns it off "
                  "(emloc run --gpus N). Set GPUs to 1 to anchor.")
SPECTRAL_BUILD_FACTOR = 2.0
"""How much longer the emulator build takes with ``allocation="spectral"``: benchmarks/RESULTS.md
measured 115.5 s vs 57.0 s (Llama-3-8B shapes, one H200; the extra streaming pass that measures the
spectra took 60.3 s), so the planner's uniform-build estimate is doubled."""
SIMILAR_MEMORY = 0.9  # GPUs whose memory differs by less than 10% count as alike


def multi_gpus(machine: Any, gpu_index: int | None) -> tuple[Any, ...]:
    """The GPUs the run may spread over: every CUDA GPU, when there are ≥ 2 and a GPU was chosen.

    Empty on the CPU, MPS, ROCm (untested there), a single GPU, or when the user chose the CPU.
    """
    gpus = tuple(getattr(machine, "gpus", ()) or ())
    if getattr(machine, "backend", None) != "cuda" or gpu_index is None or len(gpus) < 2:
        return ()
    return tuple(sorted(gpus, key=lambda g: g.index))


def default_gpu_count(gpus: tuple[Any, ...]) -> int:
    """All of ``gpus`` when they are alike (same name, memory within 10%), else 1.

    Data-parallel training runs in step with the slowest GPU and every GPU holds the whole
    emulator, so mixed cards are left to the user's choice.
    """
    if len(gpus) < 2:
        return 1
    totals = [int(g.total_bytes) for g in gpus]
    alike = len({str(g.name) for g in gpus}) == 1 and min(totals) >= SIMILAR_MEMORY * max(totals)
    return len(gpus) if alike else 1


def lambda_text(lam: float | None) -> str:
    if lam is None:
        return "auto"
    return "inf" if math.isinf(lam) else f"{lam:g}"


class PlanPage(BasePage):
    """Shows the planner's choice and lets the user override ρ and the training settings."""

    def __init__(self, state: WizardState, engine: EngineFacade, parent: QWidget | None = None) -> None:
        super().__init__(state, engine, parent)
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

        # training settings, tooltips from the engine's help metadata
        help_ = engine.field_help("TrainConfig")
        self.settings: dict[str, QSpinBox | QDoubleSpinBox] = {}
        box = QGroupBox("LoRA and training")
        grid = QGridLayout(box)
        for i, (name, default) in enumerate(TRAIN_DEFAULTS.items()):
            w = _spin_for(name, default)
            w.setObjectName(name)
            w.setToolTip(help_.get(name, ""))
            w.valueChanged.connect(self._settings_changed)
            label = QLabel(LABELS.get(name, name))
            label.setBuddy(w)
            label.setToolTip(w.toolTip())
            grid.addWidget(label, i // 3, (i % 3) * 2)
            grid.addWidget(w, i // 3, (i % 3) * 2 + 1)
            self.settings[name] = w
        self.lambda_ = QComboBox()
        self.lambda_.setObjectName("lambda")
        for text, value in LAMBDA_CHOICES:
            self.lambda_.addItem(text, value)
        self.lambda_.currentIndexChanged.connect(self._settings_changed)
        self.lambda_.setToolTip(engine.field_help("CorrectionConfig").get(
            "lambda_", "Damping λ of the LoRA correction: auto picks it on held-out data."))
        n = len(TRAIN_DEFAULTS)
        lam_label = QLabel("Correction &λ")
        lam_label.setBuddy(self.lambda_)
        grid.addWidget(lam_label, n // 3, (n % 3) * 2)
        grid.addWidget(self.lambda_, n // 3, (n % 3) * 2 + 1)
        for c in (1, 3, 5):
            grid.setColumnStretch(c, 1)
        self.body.addWidget(box)

        self.show_command = QPushButton("Show &command…")
        self.show_command.setToolTip("The equivalent `emloc run …` command, for scripts and servers.")
        self.show_command.clicked.connect(self._show_command)
        row = QHBoxLayout()
        row.addWidget(self.hint("Hover any setting for what it does."), 1)
        row.addWidget(self.show_command)
        self.body.addLayout(row)
        self.body.addStretch(1)
        self.plan: Any = None
        self._loading = False

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
        self.allocation.setToolTip(self.engine.field_help("EmulatorConfig").get(
            "allocation", "A first pass measures each module's spectrum and redistributes the same parameter "
                          "budget between modules; about twice the emulator build time."))
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
        self._anchor_help = self.engine.field_help("TrainConfig").get(
            "anchor", "The emulator is anchored to the original's hidden states on the training examples, so the "
                      "LoRA learns the task rather than repairs of the emulator; costs one pass of the original "
                      "over the examples and their offsets in RAM. auto turns it off when they do not fit.")
        self.anchor.setToolTip(self._anchor_help)
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
        saved = (self.state.configs.get(PARALLEL_KEY) or {}).get("processes")
        self.gpus.setRange(1, max(1, n))
        self.gpus.setValue(min(int(saved), n) if saved and n else default_gpu_count(gpus))
        self.gpus_of.setText(f"of {n} ({', '.join(sorted({str(g.name) for g in gpus}))}); "
                             "data-parallel training, memory shown per GPU" if n else "")
        self.gpu_box.setVisible(n >= 2)

    def gpu_count(self) -> int:
        """GPUs the run uses (1 unless the GPU control is offered and set higher)."""
        return int(self.gpus.value()) if multi_gpus(self.state.machine, self.state.gpu_index) else 1

    # -- state in ----------------------------------------------------------------------------
    def initializePage(self) -> None:
        self._loading = True
        s = self.state
        apply_demo_defaults(s)
        self._init_gpus()
        self.allocation.setChecked(s.configs.get(ALLOCATION_KEY) == "spectral")
        self.anchor.setChecked(s.configs.get(ANCHOR_KEY) != "none")
        self._update_anchor_box()
        for name, w in self.settings.items():
            w.setValue(s.train_settings.get(name, TRAIN_DEFAULTS[name]))
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
    def plan_config(self) -> Any:
        gpu = next((g for g in getattr(self.state.machine, "gpus", ()) or ()
                    if g.index == self.state.gpu_index), None)
        backend = getattr(self.state.machine, "backend", "cuda")
        device = "cpu" if gpu is None and self.state.machine is not None else (
            backend if backend in ("cuda", "rocm", "mps") else "cuda")
        ratio = None if self.auto_ratio.isChecked() else self.slider.value() / 100
        n = self.gpu_count()
        total = gpu.total_bytes if gpu is not None else None
        if n > 1:  # GPUs 0..n-1; the smallest of them bounds every one's share
            total = min(g.total_bytes for g in multi_gpus(self.state.machine, self.state.gpu_index)[:n])
        return self.engine.make(
            "PlanConfig", budget_bytes=self.state.budget_bytes, gpu_total_bytes=total, num_gpus=n,
            context_length=self.state.max_length, batch_size=int(self.settings["batch_size"].value()),
            lora_rank=int(self.settings["rank"].value()), ratio=ratio, device=device,
            gpu_name=getattr(gpu, "name", None), calibration_samples=self.state.n_calibration,
            train_steps=int(self.settings["steps"].value()), auto_lambda=self.lambda_.currentData() is None,
            anchored=self.anchor.isChecked())

    def replan(self) -> None:
        if self._loading:
            return
        self.banner.clear()
        try:
            facts = self.state.facts if self.state.facts is not None else self.engine.model_facts(self.state.model_dir)
            self.state.facts = facts
            plan = self.engine.plan_memory(facts, self.plan_config())
        except EngineError as exc:
            self.plan = None
            self.banner.show_error(exc)
            self.completeChanged.emit()
            return
        self.plan = plan
        ratio = float(getattr(plan, "ratio", 0.5) or 0.5)
        if self.auto_ratio.isChecked():
            self.slider.blockSignals(True)
            self.slider.setValue(round(ratio * 100))
            self.slider.blockSignals(False)
        self.ratio_label.setText(f"{ratio:.2f}")
        self.bars.set_plan(plan)
        fits = bool(getattr(plan, "fits", True))
        reason = str(getattr(plan, "reason", "") or "")
        budget = getattr(plan, "budget_bytes", None) or self.state.budget_bytes
        if fits:
            text = f"<span style='color:#22a06b'><b>Fits</b></span> in {gib(budget)}. {reason}"
        else:
            tips = "; ".join(str(t) for t in getattr(plan, "suggestions", ()) or ())
            text = (f"<span style='color:#d9534f'><b>Predicted to exceed the budget</b></span> ({gib(budget)}). "
                    f"{reason}" + (f"<br>Try: {tips}" if tips else ""))
        notes = [str(n) for n in getattr(plan, "notes", ()) or ()]
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
    def train_settings(self) -> dict[str, Any]:
        return {name: (int(w.value()) if isinstance(w, QSpinBox) else float(w.value()))
                for name, w in self.settings.items()}

    def build_configs(self, run_dir: Any) -> dict[str, Any]:
        """The engine configs of the three stages (raises ``ConfigError`` for bad settings).

        With N > 1 GPUs, as ``emloc run --gpus N`` does: the emulator builds on ``cuda:0`` and
        factorises on ``cuda:1..N-1``, training runs on GPUs 0..N−1 (``configs[PARALLEL_KEY]``),
        correction stays on one GPU.
        """
        s, eng = self.state, self.engine
        layout = RunLayout(run_dir)
        ratio = float(getattr(self.plan, "ratio", None) or self.slider.value() / 100)
        n = self.gpu_count()
        emulator = eng.make("EmulatorConfig", model_dir=s.model_dir, out_dir=layout.emulator,
                            calibration_ids=tuple(s.calibration_ids), ratio=ratio,
                            device="cuda:0" if n > 1 else s.device, memory_budget_bytes=s.budget_bytes,
                            factor_devices=tuple(f"cuda:{i}" for i in range(1, n)),
                            allocation=self.allocation_choice())
        train = eng.make("TrainConfig", run_dir=run_dir, data=s.data_config, emulator_dir=layout.emulator,
                         device="cuda" if n > 1 else s.device, anchor=self.anchor_choice(), **self.train_settings())
        correct = eng.make("CorrectionConfig", run_dir=run_dir, model_dir=s.model_dir, adapter_dir=layout.adapter,
                           emulator_dir=layout.emulator, data=s.data_config, lambda_=self.lambda_.currentData(),
                           device=s.device)
        return {"emulator": emulator, "train": train, "correct": correct,
                PARALLEL_KEY: {"processes": n, "gpu_ids": tuple(range(n)) if n > 1 else ()},
                ALLOCATION_KEY: self.allocation_choice(), ANCHOR_KEY: self.anchor_choice()}

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
                 "--lr", f"{t['lr']:g}", "--lambda", lambda_text(self.lambda_.currentData()),
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
        s.lambda_ = self.lambda_.currentData()
        s.ratio = None if self.auto_ratio.isChecked() else self.slider.value() / 100
        s.plan = self.plan
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


def estimated_seconds(plan: Any, emulator_factor: float = 1.0) -> float | None:
    """Sum of the planner's per-stage estimates (``est_seconds``: a number, a dict or pairs).

    ``emulator_factor`` scales the emulator stage's estimate (the planner estimates the uniform
    build; :data:`SPECTRAL_BUILD_FACTOR` for per-module ranks). A plain number has no stages to scale.
    """
    def scaled(name: Any, v: Any) -> float:
        return float(v) * (emulator_factor if name == "emulator" else 1.0)

    est = getattr(plan, "est_seconds", None)
    if est is None:
        vals = [scaled(getattr(st, "name", None), v) for st in getattr(plan, "stages", ()) or ()
                if (v := getattr(st, "est_seconds", None)) is not None]
        return float(sum(vals)) if vals else None
    if isinstance(est, (int, float)):
        return float(est)
    if isinstance(est, dict):
        return float(sum(scaled(k, v) for k, v in est.items() if k != "export"))
    try:
        return float(sum(scaled(k, v) for k, v in est if k != "export"))
    except (TypeError, ValueError):
        return None


def _spin_for(name: str, default: Any) -> QSpinBox | QDoubleSpinBox:
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


