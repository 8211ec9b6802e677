"""The wizard's answers and results, outside Qt (a plain dataclass pages read and write).

Every field holds the engine's own type (``MachineInfo``, ``ModelInfo``, ``DataReport``, ``MemoryPlan``,
the stage configs and results), so mypy follows a value from the page that makes it to the page that
reads it. Only the light engine modules are imported here; the stage modules (torch) are named for the
type checker alone.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from emloc_engine.catalog.discovery import ModelInfo
from emloc_engine.catalog.model_facts import ModelFacts
from emloc_engine.data import DataConfig, DataReport
from emloc_engine.machine.hardware import GpuInfo, MachineInfo
from emloc_engine.run.planning import MemoryPlan

if TYPE_CHECKING:
    from emloc_engine.stages.correction.corrector import CorrectionConfig, CorrectionResult
    from emloc_engine.stages.emulator.builder import EmulatorConfig, EmulatorResult
    from emloc_engine.stages.export.exporter import ExportResult
    from emloc_engine.stages.training.trainer import TrainConfig, TrainResult

    StageResult: TypeAlias = EmulatorResult | TrainResult | CorrectionResult | ExportResult

STAGE_ORDER = ("emulator", "train", "correct")
STAGE_TITLES = {
    "emulator": "Build the emulator",
    "train": "Train LoRA on the emulator",
    "correct": "Correct the LoRA for the original model",
    "export": "Export",
}


@dataclass(frozen=True)
class StageConfigs:
    """What the Plan page built for the Run page: one engine config per stage, and the GPUs that train."""

    emulator: EmulatorConfig
    train: TrainConfig
    correct: CorrectionConfig
    gpus: int = 1  # > 1: data-parallel training on GPUs 0..gpus-1 (emloc run --gpus N)


@dataclass
class WizardState:
    """Everything the user chose and everything the stages produced."""

    # 1 Machine
    machine: MachineInfo | None = None
    gpu_index: int | None = None  # None: compute on the CPU
    budget_bytes: int | None = None
    # 2 Model
    model: ModelInfo | None = None
    model_dir: Path | None = None
    facts: ModelFacts | None = None
    # 3 Data
    data_path: Path | None = None
    data_format: str = "auto"
    max_length: int = 512
    eval_fraction: float = 0.1
    train_on: str = "assistant"
    max_samples: int | None = None
    data_seed: int = 0
    data_config: DataConfig | None = None
    data_report: DataReport | None = None
    calibration_ids: tuple[tuple[int, ...], ...] = ()
    n_calibration: int = 64
    # 4 Plan
    ratio: float | None = None  # None: the planner's choice
    plan: MemoryPlan | None = None
    train_settings: dict[str, float] = field(default_factory=dict)  # TrainConfig field -> value; {}: defaults
    lambda_: float | None = None  # None: auto
    allocation: str = "uniform"  # EmulatorConfig.allocation: "uniform" or "spectral"
    anchor: str = "auto"  # TrainConfig.anchor: "auto" or "none" ("blocks"/"linears" are the CLI's)
    gpus: int | None = None  # GPUs that train; None: the Plan page's default for this machine
    configs: StageConfigs | None = None
    # 5 Run
    run_dir: Path | None = None
    done: set[str] = field(default_factory=set)  # stages the run folder has finished (this session or before)
    results: dict[str, StageResult] = field(default_factory=dict)  # stages finished in this session
    # 6 Try & export
    exports: dict[str, ExportResult] = field(default_factory=dict)

    @property
    def gpu(self) -> GpuInfo | None:
        """The GPU chosen on the Machine page (None: the CPU, or no machine detected yet)."""
        if self.machine is None or self.gpu_index is None:
            return None
        return next((g for g in self.machine.gpus if g.index == self.gpu_index), None)

    @property
    def device(self) -> str:
        """``"cpu"`` when the user chose the CPU, ``cuda:N`` for a CUDA/ROCm GPU, else ``"auto"``."""
        if self.machine is not None and self.gpu_index is None:
            return "cpu"
        if self.gpu_index is not None:
            backend = self.machine.backend if self.machine is not None else "cuda"
            return f"cuda:{self.gpu_index}" if backend in ("cuda", "rocm") else "auto"
        return "auto"

    @property
    def plan_device(self) -> str:
        """The planner's device (``PlanConfig.device``): cpu, cuda, rocm or mps."""
        if self.machine is not None and self.gpu is None:
            return "cpu"
        backend = self.machine.backend if self.machine is not None else "cuda"
        return backend if backend in ("cuda", "rocm", "mps") else "cuda"

    @property
    def model_name(self) -> str:
        if self.model is not None:
            return self.model.name
        return self.model_dir.name if self.model_dir else "model"

    def new_run_dir(self, parent: Path) -> Path:
        """A fresh run folder name under ``parent``: ``<model>-<YYYYmmdd-HHMMSS>``."""
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", self.model_name.split("/")[-1]).strip("-") or "run"
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        return parent / f"{slug}-{stamp}"

    def all_stages_done(self) -> bool:
        return all(s in self.done for s in STAGE_ORDER)
