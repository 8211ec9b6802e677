"""``RUN_DIR/manifest.json``: one typed, versioned record of what a run is, what it did and what it measured.

Only the run orchestrator (:mod:`emloc_engine.run.orchestrator`) writes it, atomically after every
change, so a crash leaves the last complete state. Everyone else reads it with :func:`read_manifest`.

Schema 2::

    {"schema": 2, "engine_version": "...", "created": "...", "updated": "...",
     "config": {RunConfig.to_json()} | null,      # the settings of the files beside the manifest
     "plan": {PlanRecord} | null,                  # ρ, budget, predicted peaks (from the planner)
     "inputs": {"model": {"path": ..., "fingerprint": ...}, "data": {...}},
     "versions": {"torch": ..., "transformers": ..., "peft": ...},
     "stages": {"train": {"status": "done", "started": ..., "finished": ..., "predicted_peak_gib": ...,
                          "measured_peak_gib": ..., "message": "", "result": {the stage result as JSON}}},
     "notes": [...]}

``config`` is null for a folder made by per-stage commands without a whole run's settings. Schema 1
manifests (written before 0.2) are read with ``config`` null and their stage records kept.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from emloc_engine.core.atomic import write_json_atomic
from emloc_engine.core.errors import RunStateError
from emloc_engine.core.layout import RunLayout
from emloc_engine.core.version import __version__
from emloc_engine.run.config import RunConfig

SCHEMA_VERSION = 2
STATUSES = ("pending", "running", "done", "cancelled", "failed", "stale")


def now() -> str:
    """The time as the manifest writes it (UTC, ISO 8601, seconds)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide numerics, for the record."""
    out: dict[str, str] = {"emloc": __version__}
    for name in ("torch", "transformers", "peft", "safetensors", "gguf"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:  # pragma: no cover - a missing optional package is just not recorded
            out[name] = "absent"
    return out


@dataclass
class StageRecord:
    """One stage's record: its status, when, the predicted and measured peak, its result as JSON."""

    status: str = "pending"
    started: str | None = None
    finished: str | None = None
    predicted_peak_gib: float | None = None
    measured_peak_gib: float | None = None
    message: str = ""
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status == "done"


@dataclass
class InputRecord:
    """An input of the run (the model, the data) and the fingerprint of its content."""

    path: str
    fingerprint: str


@dataclass
class Manifest:
    """The run manifest in memory; :func:`write_manifest` saves it."""

    root: Path
    config: RunConfig | None = None
    plan: dict[str, Any] | None = None
    inputs: dict[str, InputRecord] = field(default_factory=dict)
    stages: dict[str, StageRecord] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=library_versions)
    engine_version: str = __version__
    created: str = field(default_factory=now)
    updated: str = field(default_factory=now)

    def stage(self, name: str) -> StageRecord:
        """The record of stage ``name`` (a pending one if it never started)."""
        return self.stages.get(name, StageRecord())

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION, "engine_version": self.engine_version, "created": self.created,
            "updated": self.updated, "config": self.config.to_json() if self.config is not None else None,
            "plan": self.plan, "inputs": {k: {"path": v.path, "fingerprint": v.fingerprint}
                                          for k, v in self.inputs.items()},
            "versions": self.versions, "notes": list(self.notes),
            "stages": {k: {"status": s.status, "started": s.started, "finished": s.finished,
                           "predicted_peak_gib": s.predicted_peak_gib, "measured_peak_gib": s.measured_peak_gib,
                           "message": s.message, "result": s.result} for k, s in self.stages.items()},
        }

    @classmethod
    def from_json(cls, root: Path, data: dict[str, Any]) -> Manifest:
        """Read a schema 1 or 2 manifest (schema 1: settings are not typed, so ``config`` is None)."""
        schema = data.get("schema")
        if schema not in (1, SCHEMA_VERSION):
            raise RunStateError(f"{RunLayout(root).manifest} has schema {schema}, this version reads 1 and "
                                f"{SCHEMA_VERSION}.", hint="Use the EMLoC Studio version that made the run.")
        config = RunConfig.from_json(data["config"]) if schema == SCHEMA_VERSION and data.get("config") else None
        stages = {}
        for name, rec in (data.get("stages") or {}).items():
            stages[name] = StageRecord(
                status=str(rec.get("status", "pending")), started=rec.get("started"), finished=rec.get("finished"),
                predicted_peak_gib=rec.get("predicted_peak_gib"), measured_peak_gib=rec.get("measured_peak_gib"),
                message=str(rec.get("message") or ""), result=dict(rec.get("result") or {}))
        inputs = {k: InputRecord(str(v.get("path", "")), str(v.get("fingerprint", "")))
                  for k, v in (data.get("inputs") or {}).items()}
        return cls(root=Path(root), config=config, plan=data.get("plan") if schema == SCHEMA_VERSION else None,
                   inputs=inputs, stages=stages, notes=[str(n) for n in data.get("notes") or []],
                   versions=dict(data.get("versions") or {}), engine_version=str(data.get("engine_version", "")),
                   created=str(data.get("created", now())), updated=str(data.get("updated", now())))


def read_manifest(run_dir: Path) -> Manifest | None:
    """The manifest of ``run_dir``, or None when the folder has none.

    Raises:
        RunStateError: the file is not valid JSON or has an unknown schema (the message names it).
    """
    path = RunLayout(Path(run_dir)).manifest
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunStateError(f"The run manifest {path} is not valid JSON ({exc}).",
                            hint="Restore it from a backup or start a new run folder.") from exc
    if not isinstance(data, dict):
        raise RunStateError(f"The run manifest {path} is not a JSON object.", hint="Start a new run folder.")
    return Manifest.from_json(Path(run_dir), data)


def write_manifest(manifest: Manifest) -> None:
    """Save ``manifest`` atomically (the orchestrator's alone to call)."""
    manifest.updated = now()
    write_json_atomic(RunLayout(manifest.root).manifest, manifest.to_json())
