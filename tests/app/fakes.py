"""Fake engine pieces for the app tests and the screenshot tool (no torch work, instant)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emloc_app.engine_facade import EngineFacade
from emloc_engine.core.errors import ConfigError

GIB = 1024**3


@dataclass(frozen=True)
class FakeGpu:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int = 0


@dataclass(frozen=True)
class FakeMachine:
    gpus: tuple[FakeGpu, ...] = (FakeGpu(0, "NVIDIA GeForce RTX 4090", 24 * GIB, 22 * GIB),)
    backend: str = "cuda"
    cpu_cores: int = 16
    ram_total_bytes: int = 64 * GIB
    ram_available_bytes: int = 48 * GIB
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class FakeModel:
    name: str
    path: Path
    num_parameters: int = 8_000_000_000
    size_on_disk_bytes: int = 16 * GIB
    model_type: str = "llama"
    architecture: str = "LlamaForCausalLM"
    dtype: str = "bfloat16"
    source: str = "hf-cache"
    revision: str = "abc"
    supported: bool = True
    problem: str | None = None
    needs_conversion: bool = False


@dataclass(frozen=True)
class FakeStage:
    name: str
    peak_bytes: int
    parts: tuple[tuple[str, int], ...] = ()
    est_seconds: float = 60.0


@dataclass(frozen=True)
class FakePlan:
    ratio: float | None
    fits: bool
    budget_bytes: int
    stages: tuple[FakeStage, ...]
    inference_peak_bytes: int
    full_lora_peak_bytes: int
    reason: str = ""
    suggestions: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def est_seconds(self) -> dict[str, float]:
        return {s.name: s.est_seconds for s in self.stages}

    def stage(self, name: str) -> FakeStage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


@dataclass(frozen=True)
class FakeProblem:
    file: str
    line: int | None
    message: str
    fatal: bool


@dataclass(frozen=True)
class FakeStats:
    unit: str = "tokens"
    min: int = 12
    mean: float = 96.0
    p95: int = 210
    max: int = 480


@dataclass(frozen=True)
class FakeReport:
    format: str = "messages"
    n_samples: int = 120
    n_train: int = 108
    n_eval: int = 12
    token_stats: FakeStats | None = field(default_factory=FakeStats)
    n_truncated: int = 0
    rendered_examples: tuple[str, ...] = (
        "<|im_start|>user\nWhat is EMLoC?<|im_end|>\n<|im_start|>assistant\nFine-tuning on an emulator.<|im_end|>",)
    problems: tuple[FakeProblem, ...] = ()
    fingerprint: str = "f00d"


@dataclass(frozen=True)
class FakeDemoDataset:
    name: str
    path: Path
    description: str = "demo"
    default: bool = True


@dataclass(frozen=True)
class Result:
    """Stands for any stage result."""

    adapter_dir: Path | None = None
    peak_vram_gib: float = 1.0
    merged_dir: Path | None = None
    gguf_path: Path | None = None
    verification: tuple[tuple[str, float], ...] = ()


def fake_plan(facts: Any, cfg: Any) -> FakePlan:
    ratio = cfg.ratio if cfg.ratio is not None else 0.45
    budget = cfg.budget_bytes or 20 * GIB
    train = int(8 * GIB + 20 * GIB * ratio)
    stages = (FakeStage("emulator", int(15 * GIB), (("block weights", 1 * GIB), ("statistics", 2 * GIB))),
              FakeStage("train", train, (("emulator weights", int(train * 0.6)), ("activations", int(train * 0.3)))),
              FakeStage("correct", int(14 * GIB)))
    fits = all(s.peak_bytes <= budget for s in stages)
    return FakePlan(ratio, fits, budget, stages, int(16.5 * GIB), int(21 * GIB),
                    reason=f"ρ = {ratio:.2f}: training needs {train / GIB:.1f} GiB.",
                    suggestions=() if fits else ("lower ρ",))


class Calls:
    """Records which fake functions were called with what (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[str, Any]] = []

    def add(self, name: str, arg: Any) -> None:
        with self.lock:
            self.items.append((name, arg))

    def names(self) -> list[str]:
        return [n for n, _ in self.items]

    def get(self, name: str) -> Any:
        return next(a for n, a in self.items if n == name)


def make_fake_engine(tmp: Path, *, models: list[FakeModel] | None = None, report: FakeReport | None = None,
                     machine: FakeMachine | None = None, fail: dict[str, BaseException] | None = None,
                     metrics: bool = True) -> tuple[EngineFacade, Calls]:
    """A facade whose functions are instant fakes; configs are the engine's real classes."""
    calls = Calls()
    fail = fail or {}
    data_file = tmp / "demo.jsonl"
    data_file.write_text('{"messages": []}\n')
    model_list = models if models is not None else [FakeModel("meta-llama/Llama-3.1-8B-Instruct", tmp / "llama")]

    def maybe_fail(name: str) -> None:
        if name in fail:
            raise fail[name]

    def stage(name: str):  # type: ignore[no-untyped-def]
        def run(cfg: Any, progress: Any) -> Any:
            calls.add(name, cfg)
            for i in range(3):
                progress.check_cancelled()
                progress.update((i + 1) / 3, f"{name} {i + 1}/3")
                if metrics and name == "train_lora":
                    progress.log("train/loss", 2.0 - 0.3 * i, i + 1)
                    progress.log("train/lr", 1e-4, i + 1)
            maybe_fail(name)
            return Result(adapter_dir=tmp / "adapter", merged_dir=tmp / "merged",
                          verification=(("prompt", 1e-3),))
        return run

    def find_models(*a: Any, **k: Any) -> list[FakeModel]:
        calls.add("find_models", None)
        maybe_fail("find_models")
        return list(model_list)

    def inspect_dataset(cfg: Any, tokenizer: Any = None) -> FakeReport:
        calls.add("inspect_dataset", cfg)
        maybe_fail("inspect_dataset")
        return report or FakeReport()

    def detect_machine() -> FakeMachine:
        calls.add("detect_machine", None)
        maybe_fail("detect_machine")
        return machine or FakeMachine()

    def generate(req: Any, progress: Any) -> dict[str, str]:
        for side in req.sides:
            for word in ("Hello", " from", f" {side}"):
                progress.check_cancelled()
                progress.emit_text(word, side)
        return {s: f"Hello from {s}" for s in req.sides}

    from emloc_engine.data import DataConfig
    from emloc_engine.run.planning import PlanConfig
    from emloc_engine.stages.correction.corrector import CorrectionConfig
    from emloc_engine.stages.emulator.builder import EmulatorConfig
    from emloc_engine.stages.export.exporter import ExportConfig
    from emloc_engine.stages.training.distributed import ParallelConfig
    from emloc_engine.stages.training.trainer import TrainConfig

    train = stage("train_lora")

    def train_lora_distributed(cfg: Any, parallel: Any, progress: Any) -> Any:
        """Data-parallel training: the same fake stage; the parallel settings are recorded."""
        calls.add("parallel", parallel)
        return train(cfg, progress)

    overrides: dict[str, Any] = {
        "detect_machine": detect_machine,
        "find_models": find_models,
        "add_model_folder": lambda p: calls.add("add_model_folder", p),
        "model_facts": lambda p: {"path": p},
        "plan_memory": fake_plan,
        "PlanConfig": PlanConfig,
        "DataConfig": DataConfig,
        "FORMATS": {"messages": "m", "alpaca": "a", "text": "t"},
        "load_tokenizer": lambda p: object(),
        "inspect_dataset": inspect_dataset,
        "calibration_token_ids": lambda cfg, tok, n=64, seed=0: [[1, 2, 3]] * 4,
        "EmulatorConfig": EmulatorConfig,
        "build_emulator": stage("build_emulator"),
        "TrainConfig": TrainConfig,
        "train_lora": train,
        "train_lora_distributed": train_lora_distributed,
        "ParallelConfig": ParallelConfig,
        "CorrectionConfig": CorrectionConfig,
        "correct_lora": stage("correct_lora"),
        "ExportConfig": ExportConfig,
        "merge_and_export": stage("merge_and_export"),
        "ensure_demo_model": lambda progress=None: tmp / "demo-model",
        "ensure_demo_datasets": lambda: [FakeDemoDataset("chat", data_file)],
        "generate_side_by_side": generate,
    }
    return EngineFacade(overrides, lazy=False), calls


def raise_config_error(*a: Any, **k: Any) -> Any:
    raise ConfigError("Bad setting.", problems=["rank must be at least 1"], hint="Raise it.")


def open_plan_page(qtbot, tmp_path: Path, state: Any):  # type: ignore[no-untyped-def]
    """A Plan page on a fake engine for ``state.machine``; returns (page, engine, calls, the PlanConfigs planned)."""
    from emloc_app.pages.plan_page import PlanPage

    engine, calls = make_fake_engine(tmp_path, machine=state.machine)
    planned: list[Any] = []

    def plan_memory(facts: Any, cfg: Any) -> Any:
        planned.append(cfg)
        return fake_plan(facts, cfg)

    engine._objects["plan_memory"] = plan_memory
    page = PlanPage(state, engine)
    qtbot.addWidget(page)
    page.initializePage()
    return page, engine, calls, planned


def run_all(qtbot: Any, state: Any, engine: Any) -> Any:
    """A Run page that has run every stage with ``engine`` (returns once it is complete)."""
    from emloc_app.pages.run_page import RunPage

    run = RunPage(state, engine)
    qtbot.addWidget(run)
    run.initializePage()
    run.start_button.click()
    qtbot.waitUntil(run.isComplete, timeout=60_000)
    return run


def studio_settings(state: Any) -> dict[str, Any]:
    """The app's own settings recorded in the run's manifest."""
    import json

    assert state.run_dir is not None
    return json.loads((Path(state.run_dir) / "manifest.json").read_text())["settings"]["studio"]


def reopen_plan_page(qtbot: Any, tmp_path: Path, state: Any) -> tuple[Any, Any, list[Any]]:
    """Reopen ``state``'s finished run as ``emloc-studio --run-dir`` does and open a fresh Plan page on it.

    Returns ``(reopened state, page, planned configs)``; the earlier pages' inputs (machine, model,
    data) are copied over, as the wizard's earlier pages would have set them.
    """
    from emloc_app.main import state_from_run_dir

    reopened, _ = state_from_run_dir(Path(state.run_dir))
    for key in ("machine", "gpu_index", "model", "model_dir", "facts", "data_path", "data_config",
                "data_report", "calibration_ids"):
        setattr(reopened, key, getattr(state, key))
    (tmp_path / "again").mkdir()
    page, _, _, planned = open_plan_page(qtbot, tmp_path / "again", reopened)
    return reopened, page, planned
