"""Stage 2 on several GPUs of one host: data-parallel LoRA training (``emloc train --gpus N``).

``train_lora_distributed(cfg, ParallelConfig(processes=N), progress)`` starts ``N`` worker
processes (``torch.multiprocessing``, spawn), one per GPU (NCCL), or ``N`` CPU processes (gloo;
the tests use this). Every worker runs the ordinary single-process loop of
:mod:`emloc_engine.stages.training.trainer` with a :class:`~emloc_engine.stages.training.trainer.DataParallel` hook:

* the data order is the single-process order: optimizer step ``s`` uses the same global
  micro-batches ``micro_batch_indices(…, m)`` for ``m`` in ``[(s−1)·g, s·g)``; their examples
  are dealt round-robin to the ranks (:func:`shard_micro_batches`), each rank cutting its share
  into micro-batches of at most ``batch_size``. The effective batch stays ``batch_size × grad_accum``;
  ``N`` GPUs split it.
* each rank divides its summed loss by the label tokens ``n`` of the WHOLE step (a summed count),
  and the LoRA gradients are summed over the ranks (one flat all-reduce; LoRA is small):

  .. math:: \\nabla = \\sum_{r} \\nabla \\frac{L_r}{n} = \\nabla \\frac{\\sum_r L_r}{n},

  the single-process gradient. Every rank then takes the same AdamW step from the same seeded
  initialisation, so the LoRA weights stay identical on all ranks without broadcasts; with
  dropout 0 the adapter equals the one-process adapter up to float summation order.
* dropout is seeded per ``(seed, step, rank)`` at the start of each step, so resume is exact.
* rank 0 alone writes checkpoints and the adapter (the same files as one process); rank 0's
  ``progress.update``/``log`` calls and log records are forwarded to the caller's ``progress``;
  ``check_cancelled`` is agreed by all ranks (a MAX all-reduce of the caller's cancel flag) at each
  step boundary, so every rank stops at the same step and rank 0 writes the cancel checkpoint.
  Workers ignore SIGINT: the caller decides (``emloc train``: first Ctrl-C cancels at the step
  boundary, a second one raises ``KeyboardInterrupt`` here, which terminates the workers).
* the caller's process supervises: a worker that raises is reported as that error (an
  :class:`~emloc_engine.core.errors.EngineError` keeps its type, anything else becomes
  :class:`WorkerFailed`), a worker that dies is named with its exit code, and the other workers are
  terminated instead of waiting in a collective. Collectives also time out after
  ``ParallelConfig.timeout_s``.

Rendezvous is a ``file://`` store in a temporary folder: no TCP port to choose on the host (NCCL and
gloo still talk over their own transports between the workers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from emloc_engine.core.errors import Cancelled, ConfigError, EngineError
from emloc_engine.core.progress import NULL_PROGRESS, Progress
from emloc_engine.machine.devices import parallel_devices

if TYPE_CHECKING:
    from emloc_engine.stages.training.batches import ExampleLike
    from emloc_engine.stages.training.trainer import TrainConfig, TrainResult

log = logging.getLogger(__name__)

_BACKENDS = ("auto", "nccl", "gloo")
_POLL_S = 0.05
_ERROR_GRACE_S = 3.0  # after a worker fails, wait this long for the others' own reports


class WorkerFailed(EngineError):
    """A training process failed with an unexpected error (its traceback is in the run log)."""


@dataclass(frozen=True)
class ParallelConfig:
    """How Stage 2 is spread over processes (each field's ``help`` is the GUI tooltip and CLI help)."""

    processes: int = field(default=2, metadata={
        "help": "Training processes, one per GPU (--gpus); 1 = the ordinary single-process trainer."})
    backend: str = field(default="auto", metadata={
        "help": "Collective backend: auto (nccl on CUDA GPUs, gloo on the CPU), nccl or gloo."})
    gpu_ids: tuple[int, ...] = field(default=(), metadata={
        "help": "Visible CUDA devices to use, one per process (default 0..N-1)."})
    timeout_s: float = field(default=1800.0, metadata={
        "help": "A collective operation waiting longer than this fails the run (seconds)."})
    threads_per_process: int = field(default=0, metadata={
        "help": "CPU threads of each process (0 = CPU cores / processes)."})

    def __post_init__(self) -> None:
        checks = [
            (self.processes >= 1, f"the number of processes (--gpus) must be at least 1 (got {self.processes})."),
            (self.backend in _BACKENDS, f"backend must be one of {', '.join(_BACKENDS)} (got {self.backend!r})."),
            (not self.gpu_ids or len(self.gpu_ids) == self.processes,
             f"give one GPU id per process ({self.processes}), got {list(self.gpu_ids)}."),
            (len(set(self.gpu_ids)) == len(self.gpu_ids) and all(i >= 0 for i in self.gpu_ids),
             f"GPU ids must be distinct and not negative (got {list(self.gpu_ids)})."),
            (self.timeout_s > 0, f"timeout must be positive (got {self.timeout_s})."),
            (self.threads_per_process >= 0, f"threads per process cannot be negative (got {self.threads_per_process})."),
        ]
        problems = [msg for ok, msg in checks if not ok]
        if problems:
            raise ConfigError("Invalid multi-GPU settings.", problems=problems)


# --------------------------------------------------------------------------------------------
# Public entry points.


def train_lora_distributed(cfg: TrainConfig, parallel: ParallelConfig,
                           progress: Progress = NULL_PROGRESS) -> TrainResult:
    """:func:`~emloc_engine.stages.training.trainer.train_lora`, data-parallel over ``parallel.processes`` processes.

    The data is read and tokenised once, here (so a :class:`~emloc_engine.core.errors.DataError` is
    raised before any process starts), then shared with the workers.

    Args:
        cfg: the training settings, exactly as for one process; ``batch_size × grad_accum`` is the
            global batch of each optimizer step, split over the processes.
        parallel: the number of processes, backend and devices.
        progress: receives rank 0's updates and metrics; its ``check_cancelled`` is polled.

    Returns:
        Rank 0's :class:`~emloc_engine.stages.training.trainer.TrainResult`; ``peak_vram_gib`` is the largest
        peak of all GPUs, ``tokens_per_s`` the throughput of all processes together.

    Raises:
        DataError, ConfigError, ModelNotFound, InsufficientMemory: as for one process (from the
            worker that hit it).
        WorkerFailed: a worker failed unexpectedly or died.
        Cancelled: the user cancelled; rank 0 wrote a resumable checkpoint.
    """
    from emloc_engine.data import load_tokenizer, prepare_dataset
    from emloc_engine.stages.training.trainer import pad_token_id, train_lora
    from emloc_engine.weights.lowrank import read_emulator_meta

    if parallel.processes == 1:
        return train_lora(cfg, progress)
    resolve_devices(cfg.device, parallel)  # refuse impossible device settings before reading data
    read_emulator_meta(cfg.resolved_emulator_dir)
    tokenizer = load_tokenizer(cfg.resolved_emulator_dir)
    data = prepare_dataset(cfg.data, tokenizer)
    result = train_examples_distributed(cfg, parallel, data.train, data.eval, progress,
                                        pad_id=pad_token_id(tokenizer),
                                        data_fingerprint=str(getattr(data.report, "fingerprint", "")),
                                        anchored=True)
    return result


def train_examples_distributed(cfg: TrainConfig, parallel: ParallelConfig, train: Sequence[ExampleLike],
                               eval_: Sequence[ExampleLike], progress: Progress = NULL_PROGRESS, *,
                               pad_id: int = 0, data_fingerprint: str = "", anchored: bool = False) -> TrainResult:
    """:func:`train_lora_distributed` on already tokenised examples (see ``train_on_examples``).

    ``anchored``: anchor as ``cfg.anchor`` says, each rank computing the offsets of its own examples
    (:func:`~emloc_engine.stages.training.trainer.prepare_anchors`); off, like ``train_on_examples``
    without anchors.
    """
    from emloc_engine.stages.training.trainer import train_on_examples

    if parallel.processes == 1:
        return train_on_examples(cfg, train, eval_, progress, pad_id=pad_id, data_fingerprint=data_fingerprint)
    if not train:
        raise ConfigError("The training split is empty.", hint="Use a dataset with more samples.")
    devices = resolve_devices(cfg.device, parallel)
    job = _TrainJob(cfg=cfg, train=PackedExamples.pack(train), eval_=PackedExamples.pack(eval_), pad_id=pad_id,
                    data_fingerprint=data_fingerprint, anchored=anchored)
    result: TrainResult = launch(_train_worker, job, parallel, devices, progress)
    return result


def resolve_devices(device: str, parallel: ParallelConfig) -> tuple[str, ...]:
    """The device of each rank (:func:`emloc_engine.machine.devices.parallel_devices` for these settings).

    Raises:
        ConfigError: fewer GPUs are visible than processes asked for, a single device
            (``cuda:N``, ``mps``) was named, or nccl was asked for on the CPU.
    """
    return parallel_devices(device, parallel.processes, gpu_ids=parallel.gpu_ids, backend=parallel.backend)


def shard_micro_batches(micro_batches: Sequence[Sequence[int]], rank: int, world_size: int,
                        batch_size: int) -> list[list[int]]:
    """This rank's micro-batches of one optimizer step.

    The step's examples (the global micro-batches, in order) are dealt round-robin: rank ``r``
    gets positions ``r, r + N, r + 2N, …``, cut into micro-batches of at most ``batch_size``.
    The ranks' shares differ by at most one example and together are exactly the step's examples.
    """
    flat = [i for mb in micro_batches for i in mb]
    mine = flat[rank::world_size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


# --------------------------------------------------------------------------------------------
# Examples shared with the workers as three tensors (shared memory), not as Python tuples.


@dataclass(frozen=True)
class PackedRow:
    """One example read back from :class:`PackedExamples` (``ExampleLike``)."""

    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class PackedExamples(Sequence[PackedRow]):
    """Examples as flat int64 ``ids``/``labels`` and ``offsets`` (row ``i`` is ``offsets[i]:offsets[i+1]``).

    Three tensors travel to a spawned process through shared memory; a tuple of Python ints per
    example would be pickled once per process.
    """

    ids: torch.Tensor
    labels: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def pack(cls, examples: Sequence[ExampleLike]) -> PackedExamples:
        lengths = [len(e.input_ids) for e in examples]
        for e, n in zip(examples, lengths, strict=True):
            if len(e.labels) != n:
                raise ConfigError(f"An example has {n} input ids but {len(e.labels)} labels.")
        offsets = torch.zeros(len(examples) + 1, dtype=torch.int64)
        if lengths:
            offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
        ids = torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int64)
        labels = torch.tensor([t for e in examples for t in e.labels], dtype=torch.int64)
        return cls(ids, labels, offsets)

    def __len__(self) -> int:
        return int(self.offsets.numel()) - 1

    def _row(self, i: int) -> PackedRow:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return PackedRow(self.ids[a:b].tolist(), self.labels[a:b].tolist())

    def __getitem__(self, index: Any) -> Any:  # int -> PackedRow, slice -> list[PackedRow]
        if isinstance(index, slice):
            return [self._row(i) for i in range(*index.indices(len(self)))]
        i = int(index)
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self._row(i % len(self))


# --------------------------------------------------------------------------------------------
# Inside a worker: collectives, the training hook, progress forwarding.


class Collectives:
    """This process's view of the process group: rank, device and the few collectives we need."""

    def __init__(self, rank: int, world_size: int, device: str, backend: str, cancel: Any, channel: Any) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        self._comm_device = torch.device(device if backend == "nccl" else "cpu")
        self._cancel, self._channel = cancel, channel

    def all_reduce_(self, tensors: Sequence[torch.Tensor], op: str = "sum") -> None:
        """Reduce ``tensors`` over the ranks in place (one flat buffer per dtype)."""
        import torch.distributed as dist

        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault(t.dtype, []).append(t)
        for group in groups.values():
            flat = torch.cat([t.detach().reshape(-1).to(self._comm_device) for t in group])
            dist.all_reduce(flat, op=reduce_op)
            for t, part in zip(group, flat.split([t.numel() for t in group]), strict=True):
                t.copy_(part.view_as(t))

    def cancel_requested(self) -> bool:
        """Whether any rank saw the caller's cancel flag (all ranks get the same answer)."""
        flag = torch.tensor([1 if self._cancel.is_set() else 0], dtype=torch.int64)
        self.all_reduce_([flag], op="max")
        return bool(flag.item())

    def send(self, kind: str, *payload: Any) -> None:
        self._channel.put((kind, self.rank, payload))

    def progress(self) -> Progress:
        """The ``Progress`` a worker hands to the stage: rank 0 reports, every rank agrees on cancel."""
        return _RankProgress(self)


class _RankProgress:
    def __init__(self, comm: Collectives) -> None:
        self._comm = comm

    def update(self, fraction: float, message: str = "") -> None:
        if self._comm.rank == 0:
            self._comm.send("update", fraction, message)

    def log(self, name: str, value: float, step: int) -> None:
        if self._comm.rank == 0:
            self._comm.send("log", name, value, step)

    def check_cancelled(self) -> None:
        if self._comm.cancel_requested():
            raise Cancelled()


class _TrainParallel:
    """The :class:`~emloc_engine.stages.training.trainer.DataParallel` hook of one worker."""

    def __init__(self, comm: Collectives, seed: int, batch_size: int) -> None:
        self._comm, self._seed, self._batch_size = comm, seed, batch_size

    @property
    def rank(self) -> int:
        return self._comm.rank

    @property
    def world_size(self) -> int:
        return self._comm.world_size

    def begin_step(self, step: int, micro_batches: list[list[int]]) -> list[list[int]]:
        # Dropout masks depend on (seed, step, rank) only: the same after a resume.
        torch.manual_seed((self._seed * 1_000_003 + step) * 1_009 + self.rank)
        return shard_micro_batches(micro_batches, self.rank, self.world_size, self._batch_size)

    def all_reduce_(self, tensors: Sequence[torch.Tensor]) -> None:
        self._comm.all_reduce_(tensors)


@dataclass(frozen=True)
class _TrainJob:
    cfg: TrainConfig
    train: PackedExamples
    eval_: PackedExamples
    pad_id: int
    data_fingerprint: str
    anchored: bool = False


def _train_worker(comm: Collectives, job: _TrainJob) -> TrainResult:
    from emloc_engine.stages.training.trainer import anchor_record, prepare_anchors, train_on_examples
    from emloc_engine.weights.lowrank import read_emulator_meta

    cfg = dataclasses.replace(job.cfg, device=comm.device)
    # Each rank computes the offsets of its own examples, a chunk at a time (anchor_chunks).
    anchors, note, seconds = None, "anchoring off", 0.0
    if job.anchored:
        anchors, note, seconds = prepare_anchors(cfg, read_emulator_meta(cfg.resolved_emulator_dir), job.train,
                                                 comm.progress(), job.eval_, processes=comm.world_size, rank=comm.rank)
    result = train_on_examples(cfg, job.train, job.eval_, comm.progress(), pad_id=job.pad_id,
                               data_fingerprint=job.data_fingerprint,
                               data_parallel=_TrainParallel(comm, cfg.seed, cfg.batch_size), anchors=anchors)
    record = anchor_record(anchors, note, seconds)
    peak = torch.tensor([result.peak_vram_gib, float(record.get("anchor_peak_bytes", 0))], dtype=torch.float64)
    comm.all_reduce_([peak], op="max")
    record["anchor_peak_bytes"] = int(peak[1].item())
    return dataclasses.replace(result, peak_vram_gib=float(peak[0].item()), **record)


# --------------------------------------------------------------------------------------------
# Launch and supervision.


@dataclass(frozen=True)
class _Rendezvous:
    world_size: int
    backend: str
    init_method: str
    timeout_s: float
    threads: int
    devices: tuple[str, ...]


@dataclass(frozen=True)
class _Failure:
    """A worker's exception, rebuilt in the caller (EngineErrors keep type, problems and hint)."""

    error_type: type[BaseException]
    summary: str
    problems: tuple[str, ...]
    hint: str
    traceback: str
    died: bool = False  # the process ended without reporting (killed, or exited from native code)

    @classmethod
    def of(cls, exc: BaseException) -> _Failure:
        tb = "".join(traceback.format_exception(exc))
        if isinstance(exc, EngineError):
            return cls(type(exc), exc.summary, tuple(exc.problems), exc.hint, tb)
        # Not the class itself: the caller might not be able to import it to unpickle the report.
        return cls(WorkerFailed, f"{type(exc).__name__}: {exc}", (), "", tb)

    @property
    def is_engine_error(self) -> bool:
        return issubclass(self.error_type, EngineError) and self.error_type is not WorkerFailed

    def error(self, rank: int, world_size: int) -> EngineError:
        if self.is_engine_error:
            try:
                error = self.error_type(self.summary, problems=self.problems, hint=self.hint)  # type: ignore[call-arg]
            except TypeError:  # a subclass with another constructor
                error = None
            if isinstance(error, EngineError):
                return error
        return WorkerFailed(f"Training process {rank} of {world_size} failed: {self.summary}",
                            hint="The full traceback is in the run log; rerun the same command to resume.")


class _ForwardLogs(logging.Handler):
    """Sends a worker's log records to the caller, which hands them to its own loggers."""

    def __init__(self, comm: Collectives) -> None:
        super().__init__()
        self._comm = comm

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record.msg, record.args = record.getMessage(), None
            record.exc_info, record.exc_text = None, None
            self._comm.send("record", record)
        except Exception:  # pragma: no cover - a log record must never break training
            self.handleError(record)


def _entry(rank: int, rdv: _Rendezvous, channel: Any, cancel: Any,
           target: Callable[[Collectives, Any], Any], payload: Any) -> None:
    """The body of worker ``rank``: join the group, run ``target``, report how it ended."""
    import torch.distributed as dist

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the caller, which cancels cleanly
    torch.set_num_threads(rdv.threads)
    device = rdv.devices[rank]
    comm = Collectives(rank, rdv.world_size, device, rdv.backend, cancel, channel)
    handler = _ForwardLogs(comm)
    handler.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root = logging.getLogger("emloc_engine")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(rdv.backend, init_method=rdv.init_method, rank=rank, world_size=rdv.world_size,
                                timeout=datetime.timedelta(seconds=rdv.timeout_s))
        try:
            value = target(comm, payload)
        except BaseException as exc:
            _report(comm, exc)  # before the group is torn down: the others' echoes must come after it
            return
        finally:
            root.removeHandler(handler)
            dist.destroy_process_group()
        comm.send("done", value)
    except BaseException as exc:
        _report(comm, exc)


def _report(comm: Collectives, exc: BaseException) -> None:
    if isinstance(exc, Cancelled):
        comm.send("cancelled")
    else:
        comm.send("error", _Failure.of(exc))


def launch(target: Callable[[Collectives, Any], Any], payload: Any, parallel: ParallelConfig,
           devices: Sequence[str], progress: Progress = NULL_PROGRESS) -> Any:
    """Run ``target(comm, payload)`` in ``len(devices)`` spawned processes; return rank 0's value.

    ``target`` must be a module-level function (it is imported by name in each worker).

    Raises:
        EngineError: the error a worker raised (:class:`WorkerFailed` for non-engine errors and
            dead workers); the other workers are terminated.
        Cancelled: ``progress.check_cancelled`` raised; every worker stopped at the same step.
    """
    import torch.multiprocessing as mp

    world = len(devices)
    backend = parallel.backend
    if backend == "auto":
        backend = "nccl" if devices[0].startswith("cuda") else "gloo"
    threads = parallel.threads_per_process or max(1, (os.cpu_count() or 1) // world)
    ctx = mp.get_context("spawn")
    store_dir = Path(tempfile.mkdtemp(prefix="emloc-dist-"))
    rdv = _Rendezvous(world, backend, f"file://{store_dir / 'store'}", parallel.timeout_s, threads, tuple(devices))
    channel, cancel = ctx.SimpleQueue(), ctx.Event()
    procs = [ctx.Process(target=_entry, args=(rank, rdv, channel, cancel, target, payload),
                         name=f"emloc-train-{rank}", daemon=True) for rank in range(world)]
    log.info("Starting %d training processes (%s; %s).", world, backend, ", ".join(devices))
    try:
        for p in procs:
            p.start()
        return _Supervisor(procs, channel, cancel, progress).run()
    finally:
        _stop(procs)
        shutil.rmtree(store_dir, ignore_errors=True)


class _Supervisor:
    """The caller's side: forwards progress, relays cancel, collects results and failures."""

    def __init__(self, procs: list[Any], channel: Any, cancel: Any, progress: Progress) -> None:
        self.procs, self.channel, self.cancel, self.progress = procs, channel, cancel, progress
        self.results: dict[int, Any] = {}
        self.failures: dict[int, _Failure] = {}
        self.cancelled: set[int] = set()
        self.fail_deadline: float | None = None

    def run(self) -> Any:
        world = len(self.procs)
        while True:
            self._drain()
            self._poll_cancel()
            ended = self.results.keys() | self.failures.keys() | self.cancelled
            for rank, p in enumerate(self.procs):
                if not p.is_alive() and rank not in ended:
                    self._drain()  # its last message may have arrived just now
                    if rank not in self.results.keys() | self.failures.keys() | self.cancelled:
                        self._fail(rank, _Failure(WorkerFailed, _death(p.exitcode), (), "", "", died=True))
            if len(self.results) + len(self.failures) + len(self.cancelled) == world:
                break
            if self.fail_deadline is not None and time.monotonic() > self.fail_deadline:
                break  # the others are stuck in a collective with the failed one: stop them
            time.sleep(_POLL_S)
        if self.failures:
            rank, failure = _root_cause(self.failures)
            if failure.traceback:
                log.error("Training process %d failed:\n%s", rank, failure.traceback)
            raise failure.error(rank, world)
        if self.cancelled:
            raise Cancelled()
        return self.results[0]

    def _fail(self, rank: int, failure: _Failure) -> None:
        self.failures.setdefault(rank, failure)  # a rank's first failure is its cause
        if self.fail_deadline is None:
            self.fail_deadline = time.monotonic() + _ERROR_GRACE_S

    def _drain(self) -> None:
        while not self.channel.empty():
            kind, rank, payload = self.channel.get()
            if kind == "update":
                self.progress.update(*payload)
            elif kind == "log":
                self.progress.log(*payload)
            elif kind == "record":
                record: logging.LogRecord = payload[0]
                logging.getLogger(record.name).handle(record)
            elif kind == "done":
                self.results[rank] = payload[0]
            elif kind == "cancelled":
                self.cancelled.add(rank)
            elif kind == "error":
                self._fail(rank, payload[0])

    def _poll_cancel(self) -> None:
        if self.cancel.is_set():
            return
        try:
            self.progress.check_cancelled()
        except Cancelled:
            log.info("Cancel requested: the training processes stop after the current step.")
            self.cancel.set()


def _root_cause(failures: dict[int, _Failure]) -> tuple[int, _Failure]:
    """The failure to report: an engine error, else a dead process, else the first reported.

    When one worker fails, the others usually fail next inside a collective ("connection closed");
    those echoes are reported only if nothing better is known.
    """
    ranked = sorted(failures.items(), key=lambda item: (not item[1].is_engine_error, not item[1].died))
    return ranked[0]


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"the process was killed by {signal.Signals(-exitcode).name} (out of host memory?)"
    return f"the process exited with code {exitcode} without reporting an error"


def _stop(procs: Sequence[Any]) -> None:
    """Terminate the workers still running, then kill those that ignore it."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)


__all__ = ["Collectives", "PackedExamples", "ParallelConfig", "WorkerFailed", "launch", "resolve_devices",
           "shard_micro_batches", "train_examples_distributed", "train_lora_distributed"]
