"""``RUN_DIR/manifest.json``: what a run is, what it has done, and what it measured.

The manifest is rewritten atomically after every change, so a crash leaves the last complete
state. ``emloc run`` resumes by skipping stages whose status is ``"done"`` and whose inputs'
fingerprints still match.

Schema (version 1)::

    {"schema": 1, "engine_version": "...", "created": "...", "updated": "...",
     "inputs": {"model": {"path": ..., "fingerprint": ...}, "data": {...}},
     "settings": {...},
     "versions": {"torch": ..., "transformers": ..., "peft": ...},
     "stages": {"emulator": {"status": "done", "started": ..., "finished": ...,
                             "predicted_peak_gib": ..., "measured_peak_gib": ..., "result": {...}}}}
"""

from __future__ import annotations

import datetime as _dt
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emloc_engine.core.atomic import write_json_atomic
from emloc_engine.core.errors import RunStateError
from emloc_engine.core.layout import RunLayout
from emloc_engine.core.version import __version__

STAGES = ("emulator", "train", "correct", "export")
SCHEMA_VERSION = 1
_LOCK = threading.Lock()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide numerics, for the record."""
    out: dict[str, str] = {"emloc": __version__}
    for name in ("torch", "transformers", "peft", "safetensors", "gguf"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:  # pragma: no cover - a missing optional package is just not recorded
            out[name] = "absent"
    return out


@dataclass
class RunManifest:
    """In-memory view of a run's manifest; every mutation is saved immediately."""

    root: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, run_dir: Path) -> RunManifest:
        """Load ``run_dir/manifest.json``, or start a new one (the folder is created)."""
        run_dir = Path(run_dir)
        path = RunLayout(run_dir).manifest
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise RunStateError(
                    f"The run manifest {path} is not valid JSON ({exc}).",
                    hint="Restore it or start a new run folder.",
                ) from exc
            if data.get("schema") != SCHEMA_VERSION:
                raise RunStateError(f"{path} has schema {data.get('schema')}, expected {SCHEMA_VERSION}.")
            return cls(run_dir, data)
        run_dir.mkdir(parents=True, exist_ok=True)
        m = cls(
            run_dir,
            {
                "schema": SCHEMA_VERSION,
                "engine_version": __version__,
                "created": _now(),
                "updated": _now(),
                "inputs": {},
                "settings": {},
                "versions": library_versions(),
                "stages": {},
            },
        )
        m.save()
        return m

    def save(self) -> None:
        with _LOCK:
            self.data["updated"] = _now()
            write_json_atomic(RunLayout(self.root).manifest, self.data)

    def set_input(self, name: str, path: Path | str, fingerprint: str) -> None:
        self.data["inputs"][name] = {"path": str(path), "fingerprint": fingerprint}
        self.save()

    def update_settings(self, settings: dict[str, Any]) -> None:
        self.data["settings"].update(settings)
        self.save()

    def stage(self, name: str) -> dict[str, Any]:
        """The record of one stage (empty if it never started)."""
        return dict(self.data["stages"].get(name, {}))

    def is_done(self, name: str) -> bool:
        return self.data["stages"].get(name, {}).get("status") == "done"

    def start_stage(self, name: str, **info: Any) -> None:
        rec = self.data["stages"].setdefault(name, {})
        rec.update({"status": "running", "started": _now(), **info})
        self.save()

    def finish_stage(self, name: str, result: dict[str, Any] | None = None, **info: Any) -> None:
        rec = self.data["stages"].setdefault(name, {})
        rec.update({"status": "done", "finished": _now(), **info})
        if result is not None:
            rec["result"] = result
        self.save()

    def record_interruption(self, name: str, exc: BaseException) -> None:
        """Record why stage ``name`` stopped: ``cancelled`` (Ctrl-C, Cancel) or ``failed``, with the message."""
        from emloc_engine.core.errors import Cancelled

        status = "cancelled" if isinstance(exc, (Cancelled, KeyboardInterrupt)) else "failed"
        self.fail_stage(name, status, str(exc))

    def fail_stage(self, name: str, status: str, message: str) -> None:
        """Record ``status`` ('cancelled' or 'failed') with the message shown to the user."""
        rec = self.data["stages"].setdefault(name, {})
        rec.update({"status": status, "finished": _now(), "message": message})
        self.save()
