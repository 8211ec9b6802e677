"""The engine as the app sees it: one object holding every engine function and config class.

Pages never import engine stage modules directly; they call ``facade.<name>``. The real facade
imports each engine module lazily, on first use, so the app starts fast (no torch import at
start-up) and a missing engine piece shows up as an :class:`EngineError` on the page that needs
it rather than as an import crash. Tests pass a facade made of fakes.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from emloc_engine.core.errors import EngineError

# attribute name -> (module, object name)
ENGINE_OBJECTS: dict[str, tuple[str, str]] = {
    "detect_machine": ("emloc_engine.machine.hardware", "detect_machine"),
    "find_models": ("emloc_engine.catalog.discovery", "find_models"),
    "add_model_folder": ("emloc_engine.catalog.model_folders", "add_model_folder"),
    "model_facts": ("emloc_engine.run.planning", "model_facts"),
    "plan_memory": ("emloc_engine.run.planning", "plan_memory"),
    "PlanConfig": ("emloc_engine.run.planning", "PlanConfig"),
    "DataConfig": ("emloc_engine.data", "DataConfig"),
    "FORMATS": ("emloc_engine.data", "FORMATS"),
    "load_tokenizer": ("emloc_engine.data", "load_tokenizer"),
    "inspect_dataset": ("emloc_engine.data", "inspect_dataset"),
    "calibration_token_ids": ("emloc_engine.data", "calibration_token_ids"),
    "EmulatorConfig": ("emloc_engine.stages.emulator.builder", "EmulatorConfig"),
    "build_emulator": ("emloc_engine.stages.emulator.builder", "build_emulator"),
    "TrainConfig": ("emloc_engine.stages.training.trainer", "TrainConfig"),
    "train_lora": ("emloc_engine.stages.training.trainer", "train_lora"),
    "train_lora_distributed": ("emloc_engine.stages.training.distributed", "train_lora_distributed"),
    "ParallelConfig": ("emloc_engine.stages.training.distributed", "ParallelConfig"),
    "CorrectionConfig": ("emloc_engine.stages.correction.corrector", "CorrectionConfig"),
    "correct_lora": ("emloc_engine.stages.correction.corrector", "correct_lora"),
    "ExportConfig": ("emloc_engine.stages.export.exporter", "ExportConfig"),
    "merge_and_export": ("emloc_engine.stages.export.exporter", "merge_and_export"),
    "ensure_demo_model": ("emloc_engine.catalog.demo", "ensure_demo_model"),
    "ensure_demo_datasets": ("emloc_engine.catalog.demo", "ensure_demo_datasets"),
    "convert_for_catalog": ("emloc_engine.catalog.gguf_import", "convert_for_catalog"),
    # not engine, but heavy (torch, transformers, peft): loaded lazily the same way
    "generate_side_by_side": ("emloc_app.generation", "generate_side_by_side"),
}

DEFAULT_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "txt")


class EngineUnavailable(EngineError):
    """A piece of the engine is not installed (an older or partial installation)."""


def _import(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise EngineUnavailable(
            f"This installation has no {module}.{name} ({exc}).",
            hint="Install a complete emloc-studio (pip install -U emloc-studio).",
        ) from exc


@dataclass
class _Lazy:
    """Stands for an engine callable until first called; then imports and forwards."""

    module: str
    name: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _import(self.module, self.name)(*args, **kwargs)

    def resolve(self) -> Any:
        return _import(self.module, self.name)


class EngineFacade:
    """Every engine function and config class the app calls, by attribute.

    Args:
        overrides: attribute name -> replacement (fakes in tests, or a partial engine).
        lazy: when True, attributes not in ``overrides`` import the real engine on first use.
    """

    def __init__(self, overrides: dict[str, Any] | None = None, *, lazy: bool = True) -> None:
        self._objects: dict[str, Any] = {}
        if lazy:
            for attr, (module, name) in ENGINE_OBJECTS.items():
                self._objects[attr] = _Lazy(module, name)
        self._objects.update(overrides or {})

    @classmethod
    def real(cls) -> EngineFacade:
        """The facade over the installed engine (imports happen on first use)."""
        return cls()

    def __getattr__(self, attr: str) -> Any:
        objects = self.__dict__.get("_objects", {})
        if attr in objects:
            return objects[attr]
        raise AttributeError(attr)

    def resolve(self, attr: str) -> Any:
        """The real object behind ``attr`` (imports it), e.g. a config class for its field help."""
        obj = self._objects[attr]
        return obj.resolve() if isinstance(obj, _Lazy) else obj

    def available(self, attr: str) -> bool:
        """Whether ``attr`` can be used (imports it if lazy)."""
        try:
            self.resolve(attr)
        except (EngineError, KeyError):
            return False
        return True

    def formats(self) -> tuple[str, ...]:
        """The dataset formats the engine understands, ``"auto"`` first."""
        try:
            names = tuple(self.resolve("FORMATS"))
        except (EngineError, KeyError):
            return DEFAULT_FORMATS
        return ("auto", *[n for n in names if n != "auto"])

    def format_descriptions(self) -> dict[str, str]:
        """``{format: one-line description}`` when the engine provides them."""
        try:
            formats = self.resolve("FORMATS")
        except (EngineError, KeyError):
            return {}
        return {str(k): str(v) for k, v in formats.items()} if hasattr(formats, "items") else {}

    def field_help(self, config_attr: str) -> dict[str, str]:
        """``{field: help text}`` of an engine config class (tooltips), empty if unavailable."""
        try:
            cls = self.resolve(config_attr)
        except (EngineError, KeyError):
            return {}
        return field_help(cls)

    def field_defaults(self, config_attr: str) -> dict[str, Any]:
        """``{field: default}`` of an engine config class, for fields that have a plain default."""
        try:
            cls = self.resolve(config_attr)
        except (EngineError, KeyError):
            return {}
        if not dataclasses.is_dataclass(cls):
            return {}
        return {
            f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
        }

    def make(self, config_attr: str, **kwargs: Any) -> Any:
        """Build an engine config, passing only the fields the installed class knows.

        Unknown keys are dropped so the app keeps working when a config gains or loses an
        optional field; required fields still raise the engine's own error.
        """
        cls = self.resolve(config_attr)
        if dataclasses.is_dataclass(cls):
            known = {f.name for f in dataclasses.fields(cls)}
            kwargs = {k: v for k, v in kwargs.items() if k in known}
        return cls(**kwargs)


def field_help(cls: Any) -> dict[str, str]:
    """``{field: metadata["help"]}`` of a dataclass (empty for anything else)."""
    if not dataclasses.is_dataclass(cls):
        return {}
    return {f.name: str(f.metadata.get("help", "")) for f in dataclasses.fields(cls) if f.metadata.get("help")}


Callback = Callable[..., Any]
