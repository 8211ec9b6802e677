"""Fake engine *functions* for the app tests and the screenshot tool (instant, no torch work).

Every fake returns the engine's own types (``MachineInfo``, ``ModelInfo``, ``DataReport``, ``MemoryPlan``,
the stage results), built with made-up values; nothing here re-declares an engine type.
:func:`install_fakes` puts them where the app looks them up: the names a page module imported, or the
engine module attribute that the app imports when a stage starts.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emloc_engine.catalog.demo import DemoDataset
from emloc_engine.catalog.discovery import ModelInfo
from emloc_engine.catalog.model_facts import ModelFacts, reference_facts
from emloc_engine.core.progress import Progress
from emloc_engine.data import DataConfig, DataProblem, DataReport
from emloc_engine.data.validation import LengthStats
from emloc_engine.machine.hardware import GpuInfo, MachineInfo
from emloc_engine.run.planning import MemoryPlan, PlanConfig, StagePeak

GIB = 1024**3
Patch = Callable[[object, str, object], None]
"""``monkeypatch.setattr`` in tests, plain ``setattr`` in the screenshot tool."""


def gpu(index: int = 0, name: str = "NVIDIA GeForce RTX 4090", total_gib: float = 24, free_gib: float = 22) -> GpuInfo:
    total, free = int(total_gib * GIB), int(free_gib * GIB)
    return GpuInfo(index=index, name=name, total_bytes=total, free_bytes=free, used_bytes=total - free)


def machine(gpus: tuple[GpuInfo, ...] | None = None, backend: str = "cuda") -> MachineInfo:
    return MachineInfo(gpus=(gpu(),) if gpus is None else gpus, backend=backend, cpu_cores=16,
                       ram_total_bytes=64 * GIB, ram_available_bytes=48 * GIB)


def model_info(name: str, path: Path, *, num_parameters: int = 8_000_000_000, size_gib: float = 16,
               model_type: str = "llama", dtype: str = "bfloat16", source: str = "hf-cache", supported: bool = True,
               problem: str | None = None, needs_conversion: bool = False) -> ModelInfo:
    """A catalog entry; its ``facts`` are Llama-3-8B's shapes under this name and folder (none for a GGUF)."""
    facts = None if needs_conversion or not supported else dataclasses.replace(
        reference_facts("Llama-3-8B"), name=name, model_dir=str(path))
    return ModelInfo(name=name, path=path, revision="abc", source=source, model_type=model_type,
                     architecture="LlamaForCausalLM", num_parameters=num_parameters, dtype=dtype,
                     size_on_disk_bytes=int(size_gib * GIB), supported=supported, problem=problem,
                     needs_conversion=needs_conversion, facts=facts)


def reference_model_info(name: str, path: Path) -> ModelInfo:
    """The catalog entry of a bf16 model with a reference model's real shapes (``reference_facts(name)``) in
    ``path``, for the real planner; the engine's tests use it too."""
    facts = reference_facts(name)
    return ModelInfo(name=name, path=path, revision=None, source="folder", model_type=facts.model_type,
                     architecture=facts.architecture, num_parameters=facts.num_parameters, dtype="bfloat16",
                     size_on_disk_bytes=facts.num_parameters * 2, supported=True, problem=None, facts=facts)


def problem(file: str, line: int | None, message: str, fatal: bool) -> DataProblem:
    return DataProblem(file=file, line=line, message=message, fatal=fatal)


def report(*, problems: tuple[DataProblem, ...] = (), n_samples: int = 120, n_train: int = 108, n_eval: int = 12,
           n_truncated: int = 0, rendered_examples: tuple[str, ...] | None = None) -> DataReport:
    examples = rendered_examples or (
        "<|im_start|>user\nWhat is EMLoC?<|im_end|>\n<|im_start|>assistant\nFine-tuning on an emulator.<|im_end|>",)
    return DataReport(path="data.jsonl", format="messages", n_records=n_samples, n_samples=n_samples,
                      n_train=n_train, n_eval=n_eval, token_stats=LengthStats("tokens", 12, 96.0, 210, 480),
                      char_stats=None, n_truncated=n_truncated, n_no_labels=0, n_label_tokens=n_train * 20,
                      rendered_examples=list(examples), problems=list(problems), fingerprint="f00d")


def fake_plan(facts: ModelFacts, cfg: PlanConfig) -> MemoryPlan:
    """A plan whose training peak grows with ρ (8 GiB + 20 GiB·ρ); a model named "…big…" needs 140 GiB to run."""
    ratio = cfg.ratio if cfg.ratio is not None else 0.45
    budget = min(cfg.budget_bytes or 20 * GIB, cfg.gpu_total_bytes or 1 << 62)
    train = int(8 * GIB + 20 * GIB * ratio)
    stages = (StagePeak("emulator", int(15 * GIB), (("block weights", 1 * GIB), ("statistics", 2 * GIB)), 60.0, budget),
              StagePeak("train", train, (("emulator weights", int(train * 0.6)), ("activations", int(train * 0.3))),
                        60.0, budget),
              StagePeak("correct", int(14 * GIB), (), 60.0, budget))
    big = "big" in facts.name
    offload = "offload" in facts.name  # does not run resident here; trains with the original streamed
    if offload:
        stages = tuple(dataclasses.replace(s, ram_bytes=int(37 * GIB), est_seconds=1200.0, streamed=True)
                       for s in stages)
    inference = StagePeak("inference", int((140 if big else 60 if offload else 16.5) * GIB), (), 0.0,
                          cfg.gpu_total_bytes)
    full = StagePeak("full_lora", int((150 if big else 21) * GIB), (), 0.0, budget)
    fits = not big and all(s.fits for s in stages)
    return MemoryPlan(ratio if fits else None, fits, budget, budget, stages, inference, full,
                      reason=f"ρ = {ratio:.2f}: training needs {train / GIB:.1f} GiB." if not big else "too big",
                      suggestions=() if fits else ("lower ρ",), model_name=facts.name, config=cfg,
                      stream_original=offload, anchor_ram_bytes=4 * GIB if offload else 0,
                      anchor_chunks=3 if offload else 0)


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

    def stages(self) -> list[str]:
        """The stage functions called, in order."""
        return [n for n in self.names() if n in ("build_emulator", "train_lora", "correct_lora", "merge_and_export")]

    def get(self, name: str) -> Any:
        return next(a for n, a in self.items if n == name)


def _write_marker(path: Path) -> None:
    """The file by which the orchestrator knows a stage's output is complete (as the real stage writes it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")


def _three_updates(name: str, progress: Progress, calls: Calls, fail: dict[str, BaseException],
                   metrics: bool = False) -> None:
    for i in range(3):
        progress.check_cancelled()
        progress.update((i + 1) / 3, f"{name} {i + 1}/3")
        if metrics:
            progress.log("train/loss", 2.0 - 0.3 * i, i + 1)
            progress.log("train/lr", 1e-4, i + 1)
    if name in fail:
        raise fail[name]


class FakeEngine:
    """The engine functions the app calls, as instant fakes; :meth:`install` puts them in place.

    Args:
        tmp: a folder for the files the fakes name.
        models: what ``find_models`` finds.
        report: what ``inspect_dataset`` reports.
        machine: what ``detect_machine`` detects.
        fail: function name -> the exception it raises (after its progress updates).
    """

    def __init__(self, tmp: Path, *, models: list[ModelInfo] | None = None, report: DataReport | None = None,
                 machine: MachineInfo | None = None, fail: dict[str, BaseException] | None = None) -> None:
        self.tmp = tmp
        self.calls = Calls()
        self.fail = dict(fail or {})
        self.data_file = tmp / "demo.jsonl"
        self.data_file.write_text('{"messages": []}\n')
        self.models = models if models is not None else [model_info("meta-llama/Llama-3.1-8B-Instruct", tmp / "llama")]
        self.report = report
        self.machine = machine
        self.planned: list[PlanConfig] = []

    def _maybe_fail(self, name: str) -> None:
        if name in self.fail:
            raise self.fail[name]

    # -- machine, catalog, data ------------------------------------------------------------
    def detect_machine(self) -> MachineInfo:
        self.calls.add("detect_machine", None)
        self._maybe_fail("detect_machine")
        return self.machine or machine()

    def find_models(self) -> list[ModelInfo]:
        self.calls.add("find_models", None)
        self._maybe_fail("find_models")
        return list(self.models)

    def add_model_folder(self, path: Path) -> list[Path]:
        self.calls.add("add_model_folder", path)
        return [path]

    def ensure_demo_model(self, progress: Progress) -> Path:
        progress.update(0.5, "Converting the demo model")
        return self.tmp / "demo-model"

    def inspect_model_dir(self, folder: Path, *, name: str | None = None, source: str = "folder") -> list[ModelInfo]:
        return [model_info(name or folder.name, folder, num_parameters=134_515_008, size_gib=0.26, source=source)]

    def plan_memory(self, facts: ModelFacts, cfg: PlanConfig | None = None) -> MemoryPlan:
        cfg = cfg or PlanConfig()
        self.planned.append(cfg)
        return fake_plan(facts, cfg)

    def model_facts(self, model_dir: Path) -> ModelFacts:
        return dataclasses.replace(reference_facts("Llama-3-8B"), name=model_dir.name, model_dir=str(model_dir))

    def ensure_demo_datasets(self) -> list[DemoDataset]:
        return [DemoDataset(name="chat", path=self.data_file, description="demo", default=True)]

    def load_tokenizer(self, model_dir: Path | str) -> object:
        return object()

    def inspect_dataset(self, cfg: DataConfig, tokenizer: object = None) -> DataReport:
        self.calls.add("inspect_dataset", cfg)
        self._maybe_fail("inspect_dataset")
        return self.report or report()

    def calibration_token_ids(self, cfg: DataConfig, tokenizer: object, n: int = 64, seed: int = 0) -> list[list[int]]:
        return [[1, 2, 3]] * 4

    def fingerprint_model(self, model_dir: Path) -> str:
        return "model-fingerprint"

    def checked_exports(self, cfg: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Every export asked for is possible (the real check reads the model's config and tokenizer)."""
        return tuple(cfg.export.formats), ()

    # -- stages ----------------------------------------------------------------------------
    def build_emulator(self, cfg: Any, progress: Progress) -> Any:
        from emloc_engine.stages.emulator.builder import EmulatorResult

        self.calls.add("build_emulator", cfg)
        _three_updates("build_emulator", progress, self.calls, self.fail)
        _write_marker(cfg.out_dir / "emloc.json")
        return EmulatorResult(emulator_dir=cfg.out_dir, modules={}, params_kept=1, params_original=2, wall_s=1.0,
                              peak_vram_gib=1.0, resumed_blocks=(), calibration_tokens=12, chunk_tokens=12,
                              device="cpu")

    def train_lora(self, cfg: Any, progress: Progress) -> Any:
        from emloc_engine.stages.training.trainer import TrainResult

        self.calls.add("train_lora", cfg)
        _three_updates("train_lora", progress, self.calls, self.fail, metrics=True)
        _write_marker(cfg.run_dir / "adapter" / "adapter_config.json")
        return TrainResult(adapter_dir=cfg.run_dir / "adapter", steps_done=3,
                           loss_history=((1, 2.0), (2, 1.7), (3, 1.4)), eval_history=(), final_eval_loss=1.5,
                           peak_vram_gib=1.0, tokens_per_s=100.0, wall_s=1.0, resumed_from_step=None,
                           anchor="none", anchor_note="")

    def train_lora_distributed(self, cfg: Any, parallel: Any, progress: Progress) -> Any:
        """Data-parallel training: the same fake; the parallel settings are recorded."""
        self.calls.add("parallel", parallel)
        return self.train_lora(cfg, progress)

    def correct_lora(self, cfg: Any, progress: Progress) -> Any:
        from emloc_engine.stages.correction.corrector import CorrectionResult

        self.calls.add("correct_lora", cfg)
        _three_updates("correct_lora", progress, self.calls, self.fail)
        _write_marker(cfg.run_dir / "adapter-corrected" / "adapter_config.json")
        return CorrectionResult(adapter_dir=cfg.run_dir / "adapter-corrected", source_adapter_dir=cfg.run_dir / "adapter",
                                source_fingerprint="ad", lambda_=1.0, lambda_mode="auto",
                                lambda_table=((0.0, 2.0), (1.0, 1.5)), modules=(), correction_s=1.0, eval_s=1.0,
                                wall_s=2.0, peak_vram_gib=1.0, compute_dtype="float64")

    def merge_and_export(self, cfg: Any, progress: Progress) -> Any:
        from emloc_engine.stages.export.exporter import ExportResult

        self.calls.add("merge_and_export", cfg)
        _three_updates("merge_and_export", progress, self.calls, self.fail)
        modelfile = command = None
        if "ollama" in cfg.formats:  # as the real stage: a Modelfile, and the command only when ollama is on PATH
            from emloc_engine.stages.export.modelfile import ollama_command

            modelfile = cfg.run_dir / "Modelfile"
            modelfile.write_text("FROM ./model.gguf\n")
            command = ollama_command(modelfile, cfg.ollama_name or "tiny-emloc")
        return ExportResult(merged_dir=cfg.run_dir / "merged", adapter_dir=None, gguf_path=cfg.run_dir / "model.gguf",
                            verification=(("prompt", 1e-3),), peak_rss_gib=1.0, modelfile_path=modelfile,
                            ollama_command=command)

    def chat_side_by_side(self, req: Any, progress: Any) -> dict[str, str]:
        """Streams ``Hello from SIDE #N`` (N: the user turns in that side's conversation)."""
        self.calls.add("chat", req)
        out = {}
        for side in req.sides:
            turns = sum(m["role"] == "user" for m in req.histories[side])
            words = ("Hello", " from", f" {side}", f" #{turns}")
            for word in words:
                progress.check_cancelled()
                progress.emit_text(word, side)
            out[side] = "".join(words)
        return out

    # -- putting them in place ---------------------------------------------------------------
    def install(self, patch: Patch) -> FakeEngine:
        """Replace the engine functions the app calls with these fakes (``patch(owner, name, value)``)."""
        import emloc_engine.data
        from emloc_app.pages import data_page, machine_page, model_page, try_page
        from emloc_engine.run import plan, planning
        from emloc_engine.stages.correction import corrector
        from emloc_engine.stages.emulator import builder
        from emloc_engine.stages.export import exporter
        from emloc_engine.stages.training import distributed, trainer
        from emloc_engine.weights import checkpoint

        for module, names in (
            (machine_page, ("detect_machine",)),
            (model_page, ("detect_machine", "find_models", "add_model_folder", "ensure_demo_model",
                          "inspect_model_dir")),
            (planning, ("plan_memory", "model_facts")),  # assess_fit and plan_run plan through them
            (plan, ("checked_exports",)),
            (data_page, ("ensure_demo_datasets", "load_tokenizer", "inspect_dataset")),
            # what the orchestrator checks and reads before the stages (imported when a run starts)
            (emloc_engine.data, ("load_tokenizer", "inspect_dataset", "calibration_token_ids")),
            (checkpoint, ("fingerprint_model",)),
            (builder, ("build_emulator",)),
            (trainer, ("train_lora",)),
            (distributed, ("train_lora_distributed",)),
            (corrector, ("correct_lora",)),
            (exporter, ("merge_and_export",)),
            (try_page, ("chat_side_by_side",)),
        ):
            for name in names:
                patch(module, name, getattr(self, name))
        return self


def open_plan_page(qtbot: Any, state: Any) -> Any:
    """A Plan page shown for ``state`` (fakes already installed)."""
    from emloc_app.pages.plan_page import PlanPage

    page = PlanPage(state)
    qtbot.addWidget(page)
    page.initializePage()
    return page


def open_try_page(qtbot: Any, state: Any) -> Any:
    """A Try page shown for ``state``'s run, with its corrected adapter's folder made (fakes already installed)."""
    from emloc_app.pages.try_page import TryPage

    assert state.run_dir is not None
    (state.run_dir / "adapter-corrected").mkdir(parents=True, exist_ok=True)
    page = TryPage(state)
    qtbot.addWidget(page)
    page.initializePage()
    return page


def run_all(qtbot: Any, state: Any) -> Any:
    """A Run page that has run every stage (returns once it is complete)."""
    from emloc_app.pages.run_page import RunPage

    run = RunPage(state)
    qtbot.addWidget(run)
    run.initializePage()
    run.start_button.click()
    qtbot.waitUntil(run.isComplete, timeout=60_000)
    return run


def manifest_json(state: Any) -> dict[str, Any]:
    """The run's manifest as the orchestrator wrote it (plain JSON)."""
    import json

    assert state.run_dir is not None
    data: dict[str, Any] = json.loads((Path(state.run_dir) / "manifest.json").read_text())
    return data


def reopen_plan_page(qtbot: Any, state: Any) -> tuple[Any, Any]:
    """Reopen ``state``'s run as ``emloc-studio --run-dir`` does and open a fresh Plan page on it.

    Returns ``(reopened state, page)``; the earlier pages' inputs (machine, model, data) are copied over,
    as the wizard's earlier pages would have set them.
    """
    from emloc_app.main import state_from_run_dir

    reopened, _ = state_from_run_dir(Path(state.run_dir))
    for key in ("machine", "gpu_index", "model", "model_dir", "data_path", "data_config", "data_report"):
        setattr(reopened, key, getattr(state, key))
    return reopened, open_plan_page(qtbot, reopened)
