"""The wizard's answers and results, outside Qt (a plain dataclass pages read and write).

Every field holds the engine's own type (``MachineInfo``, ``ModelInfo``, ``DataReport``, the run's
``RunConfig`` and ``RunPlan``, the stage results), so mypy follows a value from the page that makes it
to the page that reads it. Only torch-free engine modules are imported here; the stage modules are
named for the type checker alone.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from emloc_engine.catalog.discovery import ModelInfo
from emloc_engine.data import DataConfig, DataReport
from emloc_engine.data.config import DATA_DEFAULTS
from emloc_engine.images.dataset import ImageFolderReport
from emloc_engine.machine.hardware import GpuInfo, MachineInfo
from emloc_engine.run.config import RunConfig
from emloc_engine.run.history import RUN_STAGES

if TYPE_CHECKING:
    from emloc_engine.images.options import ImageRunConfig
    from emloc_engine.images.planning import ImagePlan
    from emloc_engine.run.orchestrator import RunResult
    from emloc_engine.run.plan import RunPlan
    from emloc_engine.stages.correction.corrector import CorrectionResult
    from emloc_engine.stages.emulator.builder import EmulatorResult
    from emloc_engine.stages.export.exporter import ExportResult
    from emloc_engine.stages.training.trainer import TrainResult

    StageResult: TypeAlias = EmulatorResult | TrainResult | CorrectionResult | ExportResult

STAGE_ORDER = RUN_STAGES
"""The stages the Run page runs (the engine's list); the export is chosen format by format on the Try page."""
STAGE_TITLES = {
    "emulator": "Build the emulator",
    "train": "Train LoRA on the emulator",
    "correct": "Correct the LoRA for the original model",
    "export": "Export",
}


@dataclass
class WizardState:
    """Everything the user chose and everything the stages produced."""

    # 1 Machine
    machine: MachineInfo | None = None
    gpu_index: int | None = None  # None: compute on the CPU
    budget_bytes: int | None = None
    gpu_memory_bytes: int | None = None  # the process cap (emloc run --gpu-memory); None: no cap
    # 2 Model
    model: ModelInfo | None = None
    model_dir: Path | None = None
    config_dir: Path | None = None  # a single-file image checkpoint (model_dir): the pipeline folder for its
    # configs, text encoders and VAE (ImageRunConfig.config_dir); None for folders
    # 3 Data
    data_path: Path | None = None
    data_format: str = DATA_DEFAULTS.format  # the data settings start at the engine's defaults
    max_length: int = DATA_DEFAULTS.max_length
    eval_fraction: float = DATA_DEFAULTS.eval_fraction
    train_on: str = DATA_DEFAULTS.train_on
    max_samples: int | None = DATA_DEFAULTS.max_samples
    data_config: DataConfig | None = None
    data_report: DataReport | None = None
    # 3 Data, image models (a diffusers pipeline): a folder of photos with .txt captions beside them
    image_folder: Path | None = None
    image_trigger: str = ""
    image_prompt: str = ""  # the caption of photos without a .txt
    image_report: ImageFolderReport | None = None
    image_run: ImageRunConfig | None = None  # the image Plan page's settings, ρ included (run by the Run page)
    image_plan: ImagePlan | None = None
    # 4 Plan
    config: RunConfig | None = None  # the run's settings: built by the Plan page, or read from a reopened run
    run_plan: RunPlan | None = None  # plan_run(config): ρ, the memory plan and every stage's config
    # 5 Run
    run_dir: Path | None = None
    device_note: str = ""  # a reopened run's recorded device is not on this machine: where it continues instead
    done: set[str] = field(default_factory=set)  # stages the run folder has finished (this session or before)
    run_result: RunResult | None = None
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
    def is_image_model(self) -> bool:
        """An image-generation pipeline (FLUX/SD3/SDXL) rather than a language model: the wizard then shows
        the image dataset page instead of the Data page and the gallery instead of the Try page.

        The catalog says so with ``ModelInfo.kind == "image"``; a folder chosen by hand is one when it
        holds a diffusers ``model_index.json``.
        """
        if self.model is not None and self.model.kind == "image":
            return True
        folder = self.pipeline_folder
        return folder is not None and (folder / "model_index.json").is_file()

    @property
    def single_file(self) -> Path | None:
        """The chosen single-file image checkpoint (``model_dir`` is then a file), else None.

        A reopened run whose file has moved since still counts as one when it has a ``config_dir``.
        """
        if self.model_dir is None:
            return None
        model = Path(self.model_dir)
        return model if model.is_file() or (self.config_dir is not None and not model.is_dir()) else None

    @property
    def pipeline_folder(self) -> Path | None:
        """The diffusers pipeline folder of an image model: ``model_dir``, or for a single-file checkpoint
        the ``config_dir`` that supplies its configs, text encoders and VAE (None until chosen)."""
        if self.model_dir is None:
            return None
        return self.config_dir if self.single_file is not None else Path(self.model_dir)

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
