"""The one orchestrator of a run: it alone starts, resumes, records and finishes stages.

``emloc run``, the per-stage commands (``emloc build|train|correct|export``) and the app's Run page
all come here. Two entry points share one core:

* :func:`run_stages` runs (or resumes) a planned run (:func:`~emloc_engine.run.plan.plan_run`): it
  validates the inputs before the folder is touched, refuses a changed setting that would make the
  folder's files disagree with its manifest (naming each difference, unless ``redo_from`` asks to redo
  from a stage), skips finished stages, and runs the rest.
* :func:`open_run` + :func:`run_stage` run one stage with a config the caller built (the per-stage
  commands): the stage always runs (it resumes its own partial work) and later finished stages are
  marked ``stale``.

Either way: one process per run folder (:mod:`emloc_engine.run.lock`), leftovers of a dead writer
(``*.partial``) are removed on resume, the run log goes to ``RUN_DIR/logs/emloc.log``, every metric
to ``RUN_DIR/tensorboard/`` (TensorBoard event files and ``metrics.jsonl``, through
:meth:`RunSession.recording`), and the typed
manifest (:mod:`emloc_engine.run.manifest`) records settings, input fingerprints, each stage's
status, predicted and measured peak, result, and why it stopped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from emloc_engine.catalog.locations import check_run_location
from emloc_engine.core.errors import Cancelled, RunStateError
from emloc_engine.core.jsonable import to_json
from emloc_engine.core.layout import RunLayout
from emloc_engine.core.progress import NULL_PROGRESS, Progress, sub
from emloc_engine.machine.memory_cap import apply_gpu_memory_cap
from emloc_engine.run.config import STAGES, RunConfig, stage_of_setting
from emloc_engine.run.lock import run_folder_lock
from emloc_engine.run.manifest import InputRecord, Manifest, StageRecord, now, read_manifest, write_manifest
from emloc_engine.run.metrics_log import MetricsWriter, RecordingMetrics
from emloc_engine.run.options import changed_settings
from emloc_engine.run.plan import check_budget
from emloc_engine.run.runlog import attach_run_log, detach_run_log

if TYPE_CHECKING:
    from emloc_engine.run.plan import RunPlan
    from emloc_engine.stages.export.exporter import ExportConfig

log = logging.getLogger(__name__)
R = TypeVar("R")
# Share of the progress bar per stage: training dominates.
SLICES = {"emulator": (0.0, 0.2), "train": (0.2, 0.75), "correct": (0.75, 0.85), "export": (0.85, 1.0)}
PARTIAL_SUFFIX = ".partial"


class RunEvents(Protocol):
    """Stage boundaries, for a UI (called from the thread that runs the stages)."""

    def stage_started(self, name: str) -> None: ...

    def stage_finished(self, name: str, status: str) -> None: ...  # done, skipped, cancelled, failed


class _NoEvents:
    def stage_started(self, name: str) -> None:
        pass

    def stage_finished(self, name: str, status: str) -> None:
        pass


@dataclass(frozen=True)
class RunResult:
    """What a whole run produced."""

    run_dir: Path
    ratio: float
    stages_run: tuple[str, ...]
    stages_skipped: tuple[str, ...]
    lambda_: float | None
    final_eval_loss: float | None
    exports: dict[str, str]
    wall_s: float
    notes: tuple[str, ...] = ()
    results: dict[str, Any] = field(default_factory=dict)  # stage -> the stage's result (stages run now)


@dataclass
class RunSession:
    """An open run folder: its lock is held and its manifest is in memory (see :func:`open_run`)."""

    layout: RunLayout
    manifest: Manifest
    events: RunEvents
    metrics: MetricsWriter | None = None

    def recording(self, stage: str, progress: Progress) -> Progress:
        """``progress``, whose metrics also go to ``RUN_DIR/tensorboard/`` (:mod:`emloc_engine.run.metrics_log`)."""
        if self.metrics is None:
            self.metrics = MetricsWriter(self.layout.tensorboard)
        return RecordingMetrics(progress, self.metrics, stage)

    def save(self) -> None:
        write_manifest(self.manifest)

    def record_input(self, name: str, path: Path, fingerprint: str) -> None:
        self.manifest.inputs[name] = InputRecord(str(path), fingerprint)
        self.save()


def remove_dead_partials(root: Path) -> list[Path]:
    """Remove ``*.partial`` files and folders under ``root`` (two levels deep) and return them.

    Only called while the run folder's lock is held, so no live writer owns them: they are the
    leftovers of a crashed or killed one (gigabytes each for a real model's merge or checkpoint).
    """
    removed = []
    for pattern in ("*" + PARTIAL_SUFFIX, "*/*" + PARTIAL_SUFFIX):
        for p in sorted(root.glob(pattern)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.info("Removed %d leftover(s) of an interrupted write: %s", len(removed),
                 ", ".join(str(p.relative_to(root)) for p in removed))
    return removed


@contextlib.contextmanager
def open_run(run_dir: Path, *, model_dir: Path | None = None,
             events: RunEvents | None = None) -> Iterator[RunSession]:
    """Open ``run_dir`` for work: location checked, lock held, leftovers removed, run log attached.

    Raises:
        RunStateError: the folder is protected (source model, HF cache, runtime store), in use, or its
            manifest is unreadable.
    """
    run_dir = Path(run_dir)
    if model_dir is not None:
        check_run_location(run_dir, model_dir)
    with run_folder_lock(run_dir):
        manifest = read_manifest(run_dir) or Manifest(root=run_dir)
        remove_dead_partials(run_dir)
        handler = attach_run_log(run_dir)
        session = RunSession(RunLayout(run_dir), manifest, events or _NoEvents())
        try:
            yield session
        finally:
            if session.metrics is not None:
                session.metrics.close()
            detach_run_log(handler)


def _measured_peak(result: Any) -> float | None:
    peak = getattr(result, "peak_vram_gib", None)
    return float(peak) if isinstance(peak, (int, float)) else None


def run_stage(session: RunSession, name: str, work: Callable[[], R], *,
              predicted_peak_gib: float | None = None, result_json: Callable[[R], dict[str, Any]] | None = None) -> R:
    """Run one stage: the only place that marks a stage started, done, cancelled or failed.

    Args:
        session: the open run (its lock is held).
        name: one of :data:`~emloc_engine.run.config.STAGES`.
        work: calls the stage function with its config and progress.
        predicted_peak_gib: the planner's peak, stored beside the measured one so drift shows.
        result_json: the result as the manifest stores it (default: every field of the result).

    Raises:
        whatever the stage raises, after recording it (``cancelled`` for Cancel/Ctrl-C, else ``failed``).
    """
    m = session.manifest
    if m.config is not None:  # --gpu-memory: this process's cap, set before the stage allocates anything
        apply_gpu_memory_cap(m.config.gpu_memory_bytes, m.config.device, m.config.gpus)
    earlier_paths = dict(m.stage(name).result.get("paths") or {})  # exports made before this one
    m.stages[name] = StageRecord(status="running", started=now(), predicted_peak_gib=predicted_peak_gib)
    session.save()
    session.events.stage_started(name)
    try:
        result = work()
    except BaseException as exc:
        cancelled = isinstance(exc, (Cancelled, KeyboardInterrupt))
        status = "cancelled" if cancelled else "failed"
        rec = m.stages[name]
        rec.status, rec.finished = status, now()
        rec.message = "Cancelled; run the same command again to resume." if cancelled else str(exc)
        session.save()
        session.events.stage_finished(name, status)
        raise
    rec = m.stages[name]
    rec.status, rec.finished = "done", now()
    rec.measured_peak_gib = _measured_peak(result)
    rec.result = result_json(result) if result_json is not None else to_json(result)
    if "paths" in rec.result:  # one format exported at a time: the record lists every export still there
        kept = {k: v for k, v in earlier_paths.items() if isinstance(v, str) and Path(v).exists()}
        rec.result["paths"] = {**kept, **rec.result["paths"]}
    for later in STAGES[STAGES.index(name) + 1:]:  # their inputs just changed
        if m.stage(later).status not in ("pending", "stale"):
            m.stages[later].status = "stale"
            m.stages[later].message = f"Made from an earlier {name} output; run it again."
    session.save()
    session.events.stage_finished(name, "done")
    return result


# -- whole runs ------------------------------------------------------------------------------------
def _refuse_changes(m: Manifest, cfg: RunConfig, redo_from: str | None) -> str | None:
    """The first stage to redo because settings changed, or None; refuses when the user did not ask.

    Raises:
        RunStateError: listing each changed setting (old → new) and the two ways forward.
    """
    if m.config is None:
        return None
    changes = [c for c in changed_settings(m.config, cfg) if stage_of_setting(c[0])]
    if not changes:
        return None
    first = min(STAGES.index(stage_of_setting(p)) for p, _, _ in changes)
    touched = [s for s in STAGES[first:] if m.stage(s).status != "pending"]
    if not touched:
        return None
    if redo_from is not None and STAGES.index(redo_from) <= first:
        return redo_from
    lines = [f"{path}: {_short(old)} → {_short(new)}" for path, old, new in changes]
    raise RunStateError(
        f"The run folder {m.root} was made with other settings ({len(changes)} differ); its "
        f"{', '.join(touched)} output would not match them.", problems=lines,
        hint=f"Use a new --out folder, or add --redo-from {STAGES[first]} to redo this folder from that stage "
             f"(its later outputs are replaced).")


def _short(value: Any) -> str:
    text = str(to_json(value))
    return text if len(text) <= 80 else text[:77] + "…"


def _reset_from(session: RunSession, stage: str) -> None:
    """Forget ``stage`` and every later one, and delete their outputs (``--redo-from``)."""
    lay = session.layout
    outputs = {"emulator": [lay.emulator], "train": [lay.adapter, lay.checkpoints],
               "correct": [lay.adapter_corrected], "export": [lay.merged, lay.gguf, lay.adapter_gguf, lay.modelfile,
                                                                lay.root / "adapter-export"]}
    for name in STAGES[STAGES.index(stage):]:
        for path in outputs[name]:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        session.manifest.stages.pop(name, None)
    log.info("Redoing from %s: its outputs and every later one were removed.", stage)
    session.save()


def _check_inputs(m: Manifest, name: str, path: Path, fingerprint: str, redo: bool) -> None:
    old = m.inputs.get(name)
    if old is not None and old.fingerprint != fingerprint and not redo:
        raise RunStateError(f"The run folder {m.root} was made with a different {name} ({old.path}).",
                            hint="Use a new --out folder for a new model or dataset, or add --redo-from emulator.")


def _done(session: RunSession, name: str) -> bool:
    lay = session.layout
    marker = {"emulator": lay.emulator / "emloc.json", "train": lay.adapter / "adapter_config.json",
              "correct": lay.adapter_corrected / "adapter_config.json"}.get(name)
    return session.manifest.stage(name).done and (marker is None or marker.exists())


def _stored_lambda(rec: StageRecord) -> float | None:
    value = rec.result.get("lambda_")
    if value == "inf":
        return math.inf
    return float(value) if isinstance(value, (int, float)) else None


def run_facts(manifest: Manifest) -> Any:
    """The facts a model card states about the run (data, ρ, steps, final eval loss), from its manifest."""
    from emloc_engine.stages.export.model_card import RunFacts

    train = manifest.stage("train").result
    ratio = (manifest.plan or {}).get("ratio")
    if ratio is None and manifest.config is not None:
        ratio = manifest.config.ratio
    steps, loss = train.get("steps_done"), train.get("final_eval_loss")
    return RunFacts(data=manifest.inputs["data"].path if "data" in manifest.inputs else None,
                    ratio=float(ratio) if isinstance(ratio, (int, float)) else None,
                    steps=steps if isinstance(steps, int) else None,
                    final_eval_loss=float(loss) if isinstance(loss, (int, float)) else None)


def export_record(result: Any) -> dict[str, Any]:
    """The export stage's manifest record: every result field plus ``paths`` (what exists and was verified)."""
    keys = ("merged_dir", "adapter_dir", "gguf_path", "adapter_gguf_path", "modelfile_path", "lmstudio_path")
    paths = {k: str(getattr(result, k)) for k in keys if getattr(result, k, None)}
    out: dict[str, Any] = {**to_json(result), "paths": paths}
    return out


def export_in_run(cfg: ExportConfig, progress: Progress = NULL_PROGRESS) -> Any:
    """One export of a finished run through the per-stage path (``emloc export``, the app's Try page).

    The run folder's lock is held and ``run_stage`` records the export; a vision-language model's export
    goes to :func:`~emloc_engine.vision.export.export_vlm` (its verification samples are the run's data).
    (``run_stages(plan, stages=("export",))`` would skip the stage once any format was exported, so a second
    format could not be added.)

    Returns:
        The :class:`~emloc_engine.stages.export.exporter.ExportResult` (a VLM's: ``VlmExportResult``).

    Raises:
        EngineError: an export this model cannot have, a failed verification, a folder in use.
    """
    from emloc_engine.run.vision_stages import is_vision_language_model

    with open_run(cfg.run_dir, model_dir=cfg.model_dir) as session:
        m = session.manifest
        if is_vision_language_model(cfg.model_dir):
            from emloc_engine.run.vision_stages import vision_result_json
            from emloc_engine.vision.export import VlmExportConfig, export_vlm

            if m.config is None:
                raise RunStateError(f"{cfg.run_dir} has no recorded run settings (its data) to verify against.")
            vlm = VlmExportConfig(cfg.run_dir, cfg.model_dir, m.config.data, tuple(cfg.formats), cfg.gguf_type,
                                  cfg.verify, device=cfg.device if cfg.device != "auto" else "cpu")
            return run_stage(session, "export", lambda: export_vlm(vlm, progress),
                             result_json=functools.partial(vision_result_json, "export"))
        from emloc_engine.stages.export.exporter import merge_and_export

        final = replace(cfg, run_facts=run_facts(m))
        return run_stage(session, "export", lambda: merge_and_export(final, progress), result_json=export_record)


def _kept_plan(m: Manifest, plan: RunPlan, redo: str | None) -> dict[str, Any] | None:
    """The recorded plan, when the emulator it chose ρ for is kept: the default budget follows the GPU's free
    memory, so a resumed run may plan another ρ than the one its emulator was built with; the record keeps
    the emulator's (an explicit ρ or budget is a setting, and a change of it is refused before this)."""
    recorded = m.plan if isinstance(m.plan, dict) else None
    if recorded is None or redo == "emulator" or not m.stage("emulator").done:
        return None
    if recorded.get("ratio") == plan.record.ratio:
        return None
    log.info("Keeping the recorded plan (ρ = %s): the emulator is built; today's plan would pick ρ = %s.",
             recorded.get("ratio"), plan.record.ratio)
    return recorded


def run_stages(plan: RunPlan, progress: Progress = NULL_PROGRESS, *, stages: Sequence[str] = STAGES,
               events: RunEvents | None = None, redo_from: str | None = None) -> RunResult:
    """Run (or resume) the planned run's ``stages`` in order.

    Args:
        plan: from :func:`~emloc_engine.run.plan.plan_run`.
        progress: receives the overall fraction, stage messages and every stage's metrics.
        stages: which stages to run (finished ones are skipped).
        events: stage boundaries for a UI.
        redo_from: redo this stage and every later one even if done (needed when settings changed).

    Returns:
        A :class:`RunResult` with ρ, λ, the export paths and the results of the stages run now.

    Raises:
        EngineError: bad input (before the folder is touched), a refused change, or a stage's error
            (recorded in the manifest; the run resumes). Cancelled: after a resumable point.
    """
    from emloc_engine.data import calibration_token_ids, inspect_dataset, load_tokenizer
    from emloc_engine.weights.checkpoint import fingerprint_model

    t0 = time.monotonic()
    cfg = plan.config
    if redo_from is not None and redo_from not in STAGES:
        raise RunStateError(f"--redo-from must be one of {', '.join(STAGES)} (got {redo_from!r}).")
    # Everything that can be refused is checked before the folder is created or the lock taken.
    check_budget(plan)
    check_run_location(cfg.run_dir, cfg.model_dir)
    if plan.vision is not None:  # a vision-language model: its processor checks every sample and image
        from emloc_engine.run.vision_stages import check_vision_data

        processor, report = check_vision_data(cfg)
    else:
        tokenizer = load_tokenizer(cfg.model_dir)
        report = inspect_dataset(cfg.data, tokenizer)
        report.raise_if_fatal()  # every bad line listed, before the folder exists
    model_fp = fingerprint_model(cfg.model_dir)
    ran: list[str] = []
    skipped: list[str] = []
    results: dict[str, Any] = {}
    with open_run(cfg.run_dir, model_dir=cfg.model_dir, events=events) as session:
        m = session.manifest
        redo = _refuse_changes(m, cfg, redo_from) or redo_from
        _check_inputs(m, "model", cfg.model_dir, model_fp, redo == "emulator")
        _check_inputs(m, "data", cfg.data.path, report.fingerprint, redo == "emulator")
        if redo is not None:
            _reset_from(session, redo)
        kept = _kept_plan(m, plan, redo)
        m.config, m.plan, m.notes = cfg, kept if kept is not None else to_json(plan.record), list(plan.notes)
        m.inputs["model"] = InputRecord(str(cfg.model_dir), model_fp)
        m.inputs["data"] = InputRecord(str(cfg.data.path), report.fingerprint)
        session.save()
        predicted = plan.record.predicted_peaks_gib
        vision_work = None
        if plan.vision is not None:
            from emloc_engine.run.vision_stages import vision_result_json
            from emloc_engine.run.vision_stages import vision_work as vision_stage_work

            vision_work = vision_stage_work(plan.vision, cfg, processor)

        def step(name: str, work: Callable[[Progress], Any]) -> Any:
            if name not in stages or (name == "export" and not plan.exports):
                return None
            if _done(session, name):
                skipped.append(name)
                session.events.stage_finished(name, "skipped")
                return None
            p = session.recording(name, sub(progress, *SLICES[name]))
            if vision_work is not None:  # the VLM stages, recorded under the text stages' keys
                work = vision_work[name]
            result_json = (functools.partial(vision_result_json, name) if vision_work is not None
                           else export_record if name == "export" else None)
            result = run_stage(session, name, lambda: work(p), predicted_peak_gib=predicted.get(name),
                               result_json=result_json)
            ran.append(name)
            results[name] = result
            return result

        def emulator(p: Progress) -> Any:
            from emloc_engine.stages.emulator.builder import build_emulator

            emu = plan.emulator
            if not emu.calibration_ids:
                ids = calibration_token_ids(cfg.data, tokenizer, n=cfg.calib, seed=cfg.seed)
                emu = replace(emu, calibration_ids=tuple(tuple(x) for x in ids))
            return build_emulator(emu, p)

        def train(p: Progress) -> Any:
            if plan.parallel is not None:
                from emloc_engine.stages.training.distributed import train_lora_distributed

                return train_lora_distributed(plan.train, plan.parallel, p)
            from emloc_engine.stages.training.trainer import train_lora

            return train_lora(plan.train, p)

        def correct(p: Progress) -> Any:
            from emloc_engine.stages.correction.corrector import correct_lora

            return correct_lora(plan.correct, p)

        def export(p: Progress) -> Any:
            from emloc_engine.stages.export.exporter import merge_and_export

            assert plan.export is not None
            return merge_and_export(replace(plan.export, run_facts=run_facts(m)), p)

        step("emulator", emulator)
        step("train", train)
        step("correct", correct)
        step("export", export)
        progress.update(1.0, "Done")
        train_rec, correct_rec, export_rec = m.stage("train"), m.stage("correct"), m.stage("export")
        final_eval = train_rec.result.get("final_eval_loss")
        return RunResult(
            run_dir=session.layout.root, ratio=plan.ratio, stages_run=tuple(ran), stages_skipped=tuple(skipped),
            lambda_=_stored_lambda(correct_rec) if correct_rec.done else None,
            final_eval_loss=float(final_eval) if isinstance(final_eval, (int, float)) else None,
            exports=dict(export_rec.result.get("paths", {})) if export_rec.done else {},
            wall_s=time.monotonic() - t0, notes=plan.notes, results=results)
