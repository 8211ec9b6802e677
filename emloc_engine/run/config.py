"""``RunConfig``: every setting of one run, each defined once.

A run's settings are the settings of the run itself (model, data, run folder, ρ or a budget, the
device, GPUs, the seed, calibration samples) plus, nested as peft nests its sub-configs, the knobs of
each stage: :class:`EmulatorOptions`, :class:`TrainOptions`, :class:`CorrectionOptions`,
:class:`ExportOptions`. Each field carries its default, its type and its help text; the command-line
options, the TOML keys, the app's tooltips and "Show command…" are generated from these fields
(:mod:`emloc_engine.run.options`). Pure data: importing this module does not import torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emloc_engine.core.errors import ConfigError
from emloc_engine.core.jsonable import from_json, to_json
from emloc_engine.data.config import DataConfig
from emloc_engine.stages.correction.options import CorrectionOptions
from emloc_engine.stages.emulator.options import EmulatorOptions
from emloc_engine.stages.export.options import ExportOptions
from emloc_engine.stages.training.options import TrainOptions

STAGES = ("emulator", "train", "correct", "export")
"""The stages of a run, in order."""

DEVICES = ("auto", "cpu", "cuda", "mps")
RATIO_BOUNDS = (0.0, 1.0)
"""ρ must lie strictly between these: 0 keeps nothing, 1 would keep every layer dense (no emulator)."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one run needs; ``emloc run``, the per-stage commands and the app build this one object."""

    model_dir: Path = field(metadata={"help": "Original model: a folder with config.json and *.safetensors.",
                                      "cli": "model"})
    data: DataConfig = field(metadata={"help": "The training data and how to read it."})
    run_dir: Path = field(metadata={"help": "Run folder (created; an interrupted run resumes from it).",
                                    "cli": "out"})
    ratio: float | None = field(default=None, metadata={
        "help": "Keep-ratio ρ of the compressed layers (0 < ρ < 1); none = the planner picks the largest that fits.",
        "bounds": RATIO_BOUNDS})
    budget_bytes: int | None = field(default=None, metadata={
        "help": "GPU memory every stage must keep to, in GiB; the planner picks ρ for it, or checks a given ρ "
                "against it (default: the chosen GPU's free memory, or --gpu-memory when lower, minus "
                "max(0.5 GiB, 5%)).", "cli": "budget-gib", "unit": "GiB"})
    gpu_memory_bytes: int | None = field(default=None, metadata={
        "help": "Cap this process's GPU memory, in GiB (torch.cuda.set_per_process_memory_fraction on every GPU "
                "the run uses), e.g. to share the card with a chat server or to stand in for a smaller card; "
                "the default budget then comes from it. Ignored on the CPU.", "cli": "gpu-memory", "unit": "GiB"})
    device: str = field(default="auto", metadata={
        "help": "Where to compute: auto (the first CUDA GPU, else the CPU), cpu, cuda, cuda:N or mps."})
    gpus: int = field(default=1, metadata={
        "help": "GPUs of this machine for data-parallel training (and the emulator's factorisation); 1 = one "
                "process (N CPU processes with --device cpu)."})
    seed: int = field(default=0, metadata={
        "help": "One seed for the run: the train/eval split, calibration samples, LoRA initialisation, data order."})
    calib: int = field(default=64, metadata={"help": "Calibration samples (from your data) for the emulator."})
    emulator: EmulatorOptions = field(default_factory=EmulatorOptions, metadata={"help": "Stage 1: the emulator."})
    train: TrainOptions = field(default_factory=TrainOptions, metadata={"help": "Stage 2: LoRA training."})
    correct: CorrectionOptions = field(default_factory=CorrectionOptions,
                                       metadata={"help": "Stage 3: the correction."})
    export: ExportOptions = field(default_factory=ExportOptions, metadata={"help": "Stage 4: the exports."})

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        # One seed for the run: the data split follows it (DataConfig.seed is not a separate setting here).
        if self.data.seed != self.seed:
            object.__setattr__(self, "data", dataclasses.replace(self.data, seed=self.seed))
        problems = []
        if self.ratio is not None and not RATIO_BOUNDS[0] < self.ratio < RATIO_BOUNDS[1]:
            problems.append(f"ratio must be in (0, 1) (got {self.ratio}); 1 would keep everything dense")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            problems.append(f"the memory budget (--budget-gib) must be positive (got {self.budget_bytes / 2**30:g} GiB)")
        if self.gpu_memory_bytes is not None and self.gpu_memory_bytes <= 0:
            problems.append(f"the GPU memory cap (--gpu-memory) must be positive (got {self.gpu_memory_bytes / 2**30:g} GiB)")
        if not (self.device in DEVICES or self.device.startswith("cuda:")):
            problems.append(f"device must be auto, cpu, cuda, cuda:N or mps (got {self.device!r})")
        if self.gpus < 1:
            problems.append(f"gpus must be ≥ 1 (got {self.gpus})")
        if self.calib < 1:
            problems.append(f"calib must be ≥ 1 (got {self.calib})")
        if problems:
            raise ConfigError("Invalid run settings.", problems=problems)

    def to_json(self) -> dict[str, Any]:
        """The settings as plain JSON (what the manifest stores)."""
        out: dict[str, Any] = to_json(self)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunConfig:
        """The settings :meth:`to_json` wrote.

        Raises:
            ConfigError: an unknown key or a value of the wrong type, named by its dotted path.
        """
        return from_json(cls, data)


def stage_of_setting(path: str) -> str:
    """The first stage whose output depends on a setting (``"train.rank"`` -> ``"train"``).

    The model, the data, ρ, the budget, the seed and the calibration samples feed Stage 1, so every
    stage depends on them; the device and the GPU count change where work runs, not what it makes,
    and so bind no stage.
    """
    head = path.split(".", 1)[0]
    if head in ("emulator", "train", "correct", "export"):
        return head
    if head == "data":
        return "emulator"
    if head in ("device", "gpus", "run_dir", "gpu_memory_bytes"):
        return ""
    return "emulator"
