"""Run history: what each run folder is, from its manifest alone (for the app's Runs page and scripts).

:func:`summarize_run` reads one folder, :func:`find_runs` every run folder under some parents plus some
folders named directly (the app: its runs folder and its recent runs), newest first. Nothing here
writes, except :func:`delete_run`, which removes only a folder that is an EMLoC run folder (text or image)
not in use: it is first renamed to a hidden temporary name beside it (one step: the run leaves every list at
once, and an interrupted delete leaves no half-deleted run that looks like one), then removed. Hidden
folders (names starting with ``.``) are never listed as runs.

A run's **status** in plain words:

* ``finished`` — the emulator, training and correction are done (exports are listed beside it);
* ``stopped`` — a stage was cancelled, interrupted (its process is gone) or not started yet; ``stage``
  names the first stage not done (``stopped at training``);
* ``failed`` — the first stage not done failed (``message`` says why);
* ``running`` — another process (or this one) holds the folder's lock now;
* ``unreadable`` — the manifest exists but cannot be read (``message``).

Image runs (``emloc image``, :mod:`emloc_engine.images.run`) have ``RUN/image_run.json`` and no
manifest; :func:`summarize_image_run` reads them from their files (``kind`` ``image (flux)`` …):
finished once ``adapter-corrected/`` exists, else stopped at the first stage whose output is missing
(cache, emulator, training, correction).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emloc_engine.core.errors import EngineError, RunStateError
from emloc_engine.core.layout import RunLayout
from emloc_engine.images.options import RUN_SETTINGS as IMAGE_RUN_SETTINGS
from emloc_engine.run.lock import lock_holder, run_folder_lock
from emloc_engine.run.manifest import Manifest, read_manifest
from emloc_engine.run.metrics_log import read_metrics

log = logging.getLogger(__name__)

RUN_STAGES = ("emulator", "train", "correct")
"""The stages a run needs to be finished (exports are extras, chosen format by format)."""
STAGE_WORDS = {
    "cache": "encoding the images",
    "emulator": "building the emulator",
    "train": "training",
    "correct": "correction",
    "export": "export",
}


@dataclass(frozen=True)
class RunSummary:
    """One run folder as the Runs page lists it.

    Attributes:
        run_dir: the folder.
        model: the model's display name (``org/name`` for a Hugging Face cache snapshot, else the folder name).
        model_path, data_path: the inputs as recorded.
        data: the dataset's display name (file or folder name).
        created, updated: from the manifest (ISO 8601, UTC).
        status: ``finished``, ``stopped``, ``failed``, ``running`` or ``unreadable``.
        stage: the first stage not done (``None`` when finished).
        message: why it failed or stopped, or why the manifest is unreadable.
        stages_done: the stages done, in order.
        final_train_loss, final_eval_loss: the last values logged (``None``: none yet).
        exports: format (``merged``, ``adapter``, ``gguf``) → path, for those present in the folder.
        ratio: ρ of the run (``None``: unknown).
    """

    run_dir: Path
    model: str = "?"
    model_path: str = ""
    data: str = "?"
    data_path: str = ""
    created: str = ""
    updated: str = ""
    status: str = "unreadable"
    stage: str | None = None
    message: str = ""
    stages_done: tuple[str, ...] = ()
    final_train_loss: float | None = None
    final_eval_loss: float | None = None
    exports: dict[str, str] = field(default_factory=dict)
    ratio: float | None = None
    kind: str = "text"
    """``text``, or ``image (flux|sd3|sdxl)`` for a run of ``emloc image``."""

    @property
    def is_image(self) -> bool:
        return self.kind.startswith("image")

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def status_text(self) -> str:
        """``finished``, ``stopped at training``, ``failed at correction``, ``running``, ``unreadable``."""
        if self.status in ("stopped", "failed") and self.stage is not None:
            return f"{self.status} at {STAGE_WORDS.get(self.stage, self.stage)}"
        return self.status

    def created_local(self) -> str:
        """The creation time in the local time zone, ``YYYY-MM-DD HH:MM`` (the raw text if unparsable)."""
        try:
            return _dt.datetime.fromisoformat(self.created).astimezone().strftime("%Y-%m-%d %H:%M")
        except ValueError:
            return self.created


def display_name(path: str) -> str:
    """``org/name`` for a Hub cache snapshot (``…/models--org--name/snapshots/REV``), else the last part."""
    if not path:
        return "?"
    parts = Path(path).parts
    for i, part in enumerate(parts):
        m = re.fullmatch(r"(?:models|datasets)--(.+)", part)
        if m and i + 1 < len(parts) and parts[i + 1] == "snapshots":
            return m.group(1).replace("--", "/")
    return Path(path).name or path


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is a folder with an EMLoC run manifest (readable or not)."""
    return Path(path).is_dir() and RunLayout(Path(path)).manifest.is_file()


IMAGE_STAGES = (
    ("cache", "cache/cache.json"),
    ("emulator", "emulator/emloc.json"),
    ("train", "adapter/adapter_model.safetensors"),
    ("correct", "adapter-corrected/adapter_model.safetensors"),
)
"""An image run's stages and the file that marks each done."""


def is_image_run_folder(path: Path) -> bool:
    """Whether ``path`` is the folder of an ``emloc image`` run (``image_run.json``, no manifest)."""
    return (Path(path) / IMAGE_RUN_SETTINGS).is_file() and not RunLayout(Path(path)).manifest.is_file()


def summarize_image_run(run_dir: Path) -> RunSummary:
    """An image run folder as the Runs page lists it (module docstring)."""
    run_dir = Path(run_dir)
    settings_path = run_dir / IMAGE_RUN_SETTINGS
    created = _dt.datetime.fromtimestamp(settings_path.stat().st_mtime, _dt.UTC).isoformat()
    try:
        recorded = json.loads(settings_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return RunSummary(run_dir, created=created, status="unreadable", message=str(exc), kind="image")
    family = "?"
    try:
        family = str(json.loads((run_dir / "emulator" / "emloc.json").read_text(encoding="utf-8"))["family"])
    except (OSError, ValueError, KeyError):
        family = _pipeline_family(str(recorded.get("pipeline_dir", "")), str(recorded.get("config_dir", "")))
    done = tuple(name for name, marker in IMAGE_STAGES if (run_dir / marker).is_file())
    missing = [name for name, _ in IMAGE_STAGES if name not in done]
    ratio = recorded.get("ratio")
    exports = {p.name: str(p) for p in sorted((run_dir / "export").glob("*")) if p.is_dir()}
    return RunSummary(
        run_dir=run_dir,
        model=display_name(str(recorded.get("pipeline_dir", ""))),
        model_path=str(recorded.get("pipeline_dir", "")),
        data=display_name(str(recorded.get("images_dir", ""))),
        data_path=str(recorded.get("images_dir", "")),
        created=created,
        updated=created,
        status="finished" if not missing else "stopped",
        stage=missing[0] if missing else None,
        stages_done=done,
        exports=exports,
        ratio=float(ratio) if ratio not in (None, "None") else None,
        kind=f"image ({family})",
    )


def _pipeline_family(*folders: str) -> str:
    from emloc_engine.images.pipeline_index import PIPELINE_CLASSES

    for folder in folders:
        try:
            cls = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))["_class_name"]
        except (OSError, ValueError, KeyError):
            continue
        return PIPELINE_CLASSES.get(str(cls), "?")
    return "?"


def in_use(run_dir: Path) -> bool:
    """Whether a live process (or a run in this one) holds the folder's lock now."""
    return lock_holder(Path(run_dir)) is not None


def summarize_run(run_dir: Path) -> RunSummary:
    """What the run folder ``run_dir`` is, from its manifest and the files beside it.

    Raises:
        RunStateError: the folder has no manifest (it is not a run folder).
    """
    run_dir = Path(run_dir)
    try:
        manifest = read_manifest(run_dir)
    except EngineError as exc:
        return RunSummary(run_dir, status="unreadable", message=str(exc))
    if manifest is None:
        raise RunStateError(f"{run_dir} is not a run folder (no manifest.json).")
    model_path, data_path = _inputs(manifest)
    status, stage, message = _status(manifest, run_dir)
    train_loss, eval_loss = _final_losses(manifest)
    ratio = (manifest.plan or {}).get("ratio")
    if ratio is None and manifest.config is not None:
        ratio = manifest.config.ratio
    return RunSummary(
        run_dir=run_dir,
        model=display_name(model_path),
        model_path=model_path,
        data=display_name(data_path),
        data_path=data_path,
        created=manifest.created,
        updated=manifest.updated,
        status=status,
        stage=stage,
        message=message,
        stages_done=tuple(s for s in (*RUN_STAGES, "export") if manifest.stage(s).done),
        final_train_loss=train_loss,
        final_eval_loss=eval_loss,
        exports=exports_of(run_dir, manifest),
        ratio=float(ratio) if isinstance(ratio, (int, float)) else None,
    )


def _inputs(m: Manifest) -> tuple[str, str]:
    model = str(m.config.model_dir) if m.config is not None else ""
    data = str(m.config.data.path) if m.config is not None else ""
    model = model or (m.inputs["model"].path if "model" in m.inputs else "")
    data = data or (m.inputs["data"].path if "data" in m.inputs else "")
    return model, data


def _status(m: Manifest, run_dir: Path) -> tuple[str, str | None, str]:
    if in_use(run_dir):
        running = next((s for s in (*RUN_STAGES, "export") if m.stage(s).status == "running"), None)
        return "running", running, ""
    for name in RUN_STAGES:
        rec = m.stage(name)
        if rec.done:
            continue
        if rec.status == "failed":
            return "failed", name, rec.message
        if rec.status == "running":  # nobody holds the lock: its process ended without recording why
            return "stopped", name, "The program running it ended (closed or crashed); resume to continue."
        if rec.status == "stale":
            return "stopped", name, rec.message or "An earlier stage was redone; run it again."
        return "stopped", name, rec.message if rec.status == "cancelled" else ""
    return "finished", None, ""


def _final_losses(m: Manifest) -> tuple[float | None, float | None]:
    """The last train and eval loss: the training result's, else the metrics written so far."""
    result = m.stage("train").result
    train_hist, eval_loss = result.get("loss_history") or [], result.get("final_eval_loss")
    train_loss = _last(train_hist)
    if train_loss is None or not isinstance(eval_loss, (int, float)):
        curves = read_metrics(RunLayout(m.root).tensorboard)
        train_loss = train_loss if train_loss is not None else _last(curves.get("train/loss", []))
        if not isinstance(eval_loss, (int, float)):
            eval_loss = _last(curves.get("eval/loss", []))
    return train_loss, float(eval_loss) if isinstance(eval_loss, (int, float)) else None


def _last(points: Any) -> float | None:
    if isinstance(points, list) and points and isinstance(points[-1], (list, tuple)) and len(points[-1]) == 2:
        value = points[-1][1]
        return float(value) if isinstance(value, (int, float)) else None
    return None


def exports_of(run_dir: Path, manifest: Manifest | None = None) -> dict[str, str]:
    """The exports present in the run folder: ``merged``, ``adapter`` and ``gguf`` → path.

    The export record's paths (every export made, see ``run_stage``) that still exist, and the merged
    folder and GGUF file found in their places (runs exported before the record listed them all).
    """
    lay = RunLayout(Path(run_dir))
    found: dict[str, str] = {}
    paths = (manifest.stage("export").result.get("paths") or {}) if manifest is not None else {}
    for fmt, key in (("merged", "merged_dir"), ("adapter", "adapter_dir"), ("gguf", "gguf_path")):
        value = paths.get(key)
        if isinstance(value, str) and Path(value).exists():
            found[fmt] = value
    for fmt, path, marker in (
        ("merged", lay.merged, lay.merged / "config.json"),
        ("gguf", lay.gguf, lay.gguf),
        ("adapter", lay.root / "adapter-export", lay.root / "adapter-export" / "adapter_config.json"),
    ):
        if fmt not in found and marker.is_file():
            found[fmt] = str(path)
    return {fmt: found[fmt] for fmt in ("merged", "adapter", "gguf") if fmt in found}


def loss_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``train/loss`` and ``eval/loss`` as ``(step, value)`` lists: from ``RUN_DIR/tensorboard/metrics.jsonl``
    (every step logged, also of a stopped run), else from the training result in the manifest."""
    curves = read_metrics(RunLayout(Path(run_dir)).tensorboard)
    out = {k: v for k, v in curves.items() if k in ("train/loss", "eval/loss")}
    if out:
        return out
    try:
        manifest = read_manifest(Path(run_dir))
    except EngineError:
        return {}
    result = manifest.stage("train").result if manifest is not None else {}
    for key, name in (("loss_history", "train/loss"), ("eval_history", "eval/loss")):
        points = [(int(s), float(v)) for s, v in result.get(key) or [] if isinstance(v, (int, float))]
        if points:
            out[name] = points
    return out


def find_runs(parents: Iterable[Path] = (), folders: Iterable[Path] = ()) -> list[RunSummary]:
    """Every run folder directly under ``parents`` and every folder of ``folders`` that is one, newest first.

    A folder found twice (a recent run inside the runs folder) is listed once; folders without a manifest
    are left out; one whose manifest is unreadable is listed as ``unreadable``.
    """
    seen: dict[Path, RunSummary] = {}
    candidates: list[Path] = []
    for parent in parents:
        if Path(parent).is_dir():
            candidates += sorted(
                p for p in Path(parent).iterdir() if p.is_dir() and not p.name.startswith(".")
            )
    candidates += [Path(f) for f in folders]
    for folder in candidates:
        key = folder.resolve()
        if key in seen or not (is_run_folder(folder) or is_image_run_folder(folder)):
            continue
        try:
            seen[key] = summarize_run(folder) if is_run_folder(folder) else summarize_image_run(folder)
        except (RunStateError, OSError) as exc:  # vanished meanwhile
            log.info("Skipping %s: %s", folder, exc)
    return sorted(seen.values(), key=lambda r: (r.created, str(r.run_dir)), reverse=True)


def delete_run(run_dir: Path) -> None:
    """Delete the run folder ``run_dir`` for good (the app moves it to the trash when it can instead).

    The folder is renamed to ``.NAME.deleting-PID`` beside it (under its lock), then removed.

    Raises:
        RunStateError: the folder is not an EMLoC run folder (no manifest.json or image_run.json), or a run
            is using it.
    """
    run_dir = check_deletable(run_dir)
    doomed = run_dir.with_name(f".{run_dir.name}.deleting-{os.getpid()}")
    with run_folder_lock(run_dir):
        run_dir.rename(doomed)
    shutil.rmtree(doomed)
    log.info("Deleted the run folder %s", run_dir)


def check_deletable(run_dir: Path) -> Path:
    """``run_dir`` resolved, after checking that it is an EMLoC run folder (text or image) no run is using.

    Raises:
        RunStateError: not a run folder, or in use.
    """
    run_dir = Path(run_dir).resolve()
    if is_image_run_folder(run_dir):
        _check_record(run_dir / IMAGE_RUN_SETTINGS, lambda d: "pipeline_dir" in d and "run_dir" in d)
    elif is_run_folder(run_dir):
        _check_record(RunLayout(run_dir).manifest, lambda d: "schema" in d)
    else:
        raise RunStateError(
            f"{run_dir} is not an EMLoC run folder (no manifest.json or image_run.json); it is not deleted."
        )
    if in_use(run_dir):
        raise RunStateError(f"The run folder {run_dir} is in use by a run.", hint="Stop that run first.")
    return run_dir


def _check_record(path: Path, looks_right: Callable[[dict[str, Any]], bool]) -> None:
    """Refuse to delete a folder whose run record is not EMLoC's (someone else's ``manifest.json``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ok = isinstance(data, dict) and looks_right(data)
    except (OSError, ValueError) as exc:
        raise RunStateError(f"{path} is not an EMLoC run record; the folder is not deleted.") from exc
    if not ok:
        name = "manifest" if path.name == "manifest.json" else "run record"
        raise RunStateError(f"{path} is not an EMLoC {name}; the folder is not deleted.")
