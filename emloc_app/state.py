"""The wizard's answers and results, outside Qt (a plain dataclass pages read and write)."""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGE_ORDER = ("emulator", "train", "correct")
STAGE_TITLES = {
    "emulator": "Build the emulator",
    "train": "Train LoRA on the emulator",
    "correct": "Correct the LoRA for the original model",
    "export": "Export",
}

# Training settings shown on the Plan page: TrainConfig field -> default.
TRAIN_DEFAULTS: dict[str, Any] = {
    "rank": 16,
    "alpha": 32.0,
    "dropout": 0.05,
    "steps": 100,
    "lr": 2e-4,
    "batch_size": 4,
    "grad_accum": 1,
    "warmup_steps": 10,
    "eval_every": 25,
    "save_every": 25,
    "seed": 0,
}

# The demo (SmolLM2-135M on the Shakespeare dialogue set, often on a laptop CPU) should show a
# visible change in minutes: fewer, larger steps. Measured while building the demo: 40 peft LoRA
# steps at lr 5e-4 turned "The king is a just ruler…" into "King John: / I have been in the king's
# court…". Applied only while the user has not changed the defaults.
DEMO_TRAIN_DEFAULTS: dict[str, Any] = {**TRAIN_DEFAULTS, "steps": 60, "lr": 5e-4, "eval_every": 20,
                                       "save_every": 20}


def apply_demo_defaults(state: WizardState) -> bool:
    """Switch to :data:`DEMO_TRAIN_DEFAULTS` for the demo model if the settings are untouched."""
    from emloc_app.pages.model_page import _is_demo

    if state.model is None or not _is_demo(state.model) or state.train_settings != TRAIN_DEFAULTS:
        return False
    state.train_settings = dict(DEMO_TRAIN_DEFAULTS)
    return True


@dataclass
class WizardState:
    """Everything the user chose and everything the stages produced.

    Engine objects (``MachineInfo``, ``ModelInfo``, ``DataReport``, ``MemoryPlan``, configs and
    results) are kept as they come; pages read them with ``getattr`` so small engine changes do
    not break the app.
    """

    # 1 Machine
    machine: Any = None
    gpu_index: int | None = None  # None: compute on the CPU
    budget_bytes: int | None = None
    # 2 Model
    model: Any = None  # ModelInfo
    model_dir: Path | None = None
    facts: Any = None  # ModelFacts
    # 3 Data
    data_path: Path | None = None
    data_format: str = "auto"
    max_length: int = 512
    eval_fraction: float = 0.1
    train_on: str = "assistant"
    max_samples: int | None = None
    data_seed: int = 0
    data_config: Any = None
    data_report: Any = None
    calibration_ids: tuple[tuple[int, ...], ...] = ()
    n_calibration: int = 64
    # 4 Plan
    ratio: float | None = None  # None: the planner's choice
    plan: Any = None  # MemoryPlan
    train_settings: dict[str, Any] = field(default_factory=lambda: dict(TRAIN_DEFAULTS))
    lambda_: float | None = None  # None: auto
    configs: dict[str, Any] = field(default_factory=dict)  # stage name -> engine config
    # 5 Run
    run_dir: Path | None = None
    results: dict[str, Any] = field(default_factory=dict)  # stage name -> engine result
    # 6 Try & export
    exports: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> str:
        """``"cpu"`` when the user chose the CPU, else ``"auto"`` (the engine picks the GPU)."""
        if self.machine is not None and self.gpu_index is None:
            return "cpu"
        if self.gpu_index is not None:
            backend = getattr(self.machine, "backend", "cuda")
            return f"cuda:{self.gpu_index}" if backend in ("cuda", "rocm") else "auto"
        return "auto"

    @property
    def model_name(self) -> str:
        if self.model is not None:
            return str(getattr(self.model, "name", "model"))
        return self.model_dir.name if self.model_dir else "model"

    def new_run_dir(self, parent: Path) -> Path:
        """A fresh run folder name under ``parent``: ``<model>-<YYYYmmdd-HHMMSS>``."""
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", self.model_name.split("/")[-1]).strip("-") or "run"
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        return parent / f"{slug}-{stamp}"

    def all_stages_done(self) -> bool:
        return all(s in self.results for s in STAGE_ORDER)
