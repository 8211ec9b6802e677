"""Data-parallel Stage 2 on the CPU: 2 gloo processes give the one-process adapter; errors, cancel, resume.

The spawned workers rendezvous through a ``file://`` store and talk gloo over loopback TCP; the
test process itself opens no socket (pytest-socket stays on).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from emloc_engine.cli.main import main
from emloc_engine.core.errors import Cancelled, ConfigError, DataError
from emloc_engine.core.layout import RunLayout
from emloc_engine.core.progress import RecordingProgress
from emloc_engine.data import DataConfig, Example
from emloc_engine.run.manifest import read_manifest
from emloc_engine.stages.training.batches import micro_batch_indices
from emloc_engine.stages.training.distributed import (
    Collectives,
    PackedExamples,
    ParallelConfig,
    WorkerFailed,
    _Failure,
    _TrainParallel,
    launch,
    resolve_devices,
    shard_micro_batches,
    train_examples_distributed,
)
from emloc_engine.stages.training.trainer import TrainConfig, list_checkpoints, train_on_examples
from tests.emulator_factory import write_svd_emulator
from tests.engine import distributed_targets as targets

TEXTS = ("the cat sat on the mat.", "a bird in the hand.", "to be or not to be.", "all that glitters.",
         "the quick brown fox.", "jumps over the dog.", "seven is odd.")
TWO_CPU = ParallelConfig(processes=2, threads_per_process=1, timeout_s=60.0)


def examples(model_dir: Path) -> list[Example]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for t in TEXTS:
        ids = (*tok(t)["input_ids"], 3)
        out.append(Example(ids, (-100,) * 3 + ids[3:]))
    return out


@pytest.fixture(scope="module")
def llama_emulator(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    emu = write_svd_emulator(tiny_llama, tmp_path_factory.mktemp("emu") / "emulator", ratio=0.5)
    return tiny_llama, emu


def cfg_for(run_dir: Path, emu: Path, **kw: Any) -> TrainConfig:
    # Dropout 0: the processes' dropout streams differ from one process's by design.
    base: dict[str, Any] = dict(rank=4, alpha=8.0, dropout=0.0, steps=6, lr=5e-3, batch_size=2, grad_accum=2,
                                warmup_steps=1, schedule="constant", eval_every=3, save_every=3,
                                grad_checkpointing=True, device="cpu")
    base.update(kw)
    return TrainConfig(run_dir=run_dir, data=DataConfig(path=run_dir / "unused.jsonl"), emulator_dir=emu, **base)


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    moved = max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k)
    assert moved > 1e-3  # training did change the adapter, so equality below means something
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-5), (k, float((a[k] - b[k]).abs().max()))


# ---------------------------------------------------------------------------------------------
# Pieces (no process is started).


@pytest.mark.parametrize("world", [2, 3])
def test_shards_deal_each_example_of_the_step_once(world: int) -> None:
    step = [micro_batch_indices(7, 3, 0, m) for m in (2, 3, 4)]  # crosses an epoch end: sizes 1, 3, 3
    shards = [shard_micro_batches(step, r, world, batch_size=2) for r in range(world)]
    dealt = sorted(i for shard in shards for mb in shard for i in mb)
    assert dealt == sorted(i for mb in step for i in mb)
    sizes = [sum(len(mb) for mb in shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1
    assert all(0 < len(mb) <= 2 for shard in shards for mb in shard)
    assert shard_micro_batches([[5]], 1, 2, 4) == []  # a rank may get nothing in a tiny step


def test_packed_examples_read_back_like_the_originals() -> None:
    rows = [Example((1, 2, 3), (-100, 2, 3)), Example((4,), (4,)), Example((5, 6), (-100, -100))]
    packed = PackedExamples.pack(rows)
    assert len(packed) == 3
    assert [(list(e.input_ids), list(e.labels)) for e in rows] == [(r.input_ids, r.labels) for r in packed]
    assert packed[-1].input_ids == [5, 6] and [r.input_ids for r in packed[1:]] == [[4], [5, 6]]
    with pytest.raises(IndexError):
        packed[3]
    assert len(PackedExamples.pack([])) == 0
    with pytest.raises(ConfigError, match="2 input ids but 1 labels"):
        PackedExamples.pack([Example((1, 2), (1,))])


def test_settings_and_devices_are_checked_before_any_process_starts() -> None:
    with pytest.raises(ConfigError) as err:
        ParallelConfig(processes=0, backend="mpi", gpu_ids=(0, 0), timeout_s=0)
    assert len(err.value.problems) == 5
    assert resolve_devices("cpu", ParallelConfig(processes=3)) == ("cpu",) * 3
    with pytest.raises(ConfigError, match="single device cuda:1"):
        resolve_devices("cuda:1", ParallelConfig(processes=2))
    with pytest.raises(ConfigError, match="nccl"):
        resolve_devices("cpu", ParallelConfig(processes=2, backend="nccl"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs 2 CUDA GPUs") as err:
            resolve_devices("auto", ParallelConfig(processes=2))
        assert "--device cpu" in err.value.hint


def test_worker_errors_keep_their_engine_type() -> None:
    engine = _Failure.of(DataError("Bad data.", problems=["a.jsonl:3: no text"], hint="Fix line 3."))
    error = engine.error(1, 2)
    assert type(error) is DataError and error.problems == ["a.jsonl:3: no text"] and error.hint == "Fix line 3."
    bug = _Failure.of(KeyError("x")).error(1, 2)
    assert type(bug) is WorkerFailed and "process 1 of 2" in str(bug) and "KeyError" in str(bug)


class OtherRank:
    """The hook as rank 1 of 2 sees it, with the other rank contributing nothing."""

    rank, world_size = 1, 2

    def begin_step(self, step: int, micro_batches: list[list[int]]) -> list[list[int]]:
        return shard_micro_batches(micro_batches, 1, 2, 2)

    def all_reduce_(self, tensors: Sequence[torch.Tensor]) -> None:
        pass


def test_only_rank_zero_writes_files(llama_emulator: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, emu = llama_emulator
    progress = RecordingProgress()
    result = train_on_examples(cfg_for(tmp_path, emu, steps=3, save_every=1), examples(model_dir), [], progress,
                               data_parallel=OtherRank())
    assert result.steps_done == 3 and len(result.loss_history) == 3
    assert not (tmp_path / "adapter").exists()
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


# ---------------------------------------------------------------------------------------------
# Real processes.


def no_children_left() -> bool:
    deadline = time.monotonic() + 60  # only a guard: returns as soon as the workers are gone
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not multiprocessing.active_children()


@pytest.mark.slow
def test_two_processes_give_the_one_process_adapter_and_resume(llama_emulator: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    model_dir, emu = llama_emulator
    data = examples(model_dir)
    one = train_on_examples(cfg_for(tmp_path / "one", emu), data, data[:3], pad_id=0)

    # 2 processes, 3 of the 6 steps: the adapter is the one-process checkpoint of step 3.
    progress = RecordingProgress()
    first = train_examples_distributed(cfg_for(tmp_path / "two", emu, steps=3), TWO_CPU, data, data[:3],
                                       progress, pad_id=0)
    assert first.adapter_dir == tmp_path / "two" / "adapter"
    assert_same_adapter(adapter_tensors(first.adapter_dir), adapter_tensors(tmp_path / "one" / "checkpoints" / "step-3"))
    assert [s for s, _ in list_checkpoints(tmp_path / "two" / "checkpoints")] == [3]
    assert not [p for p in (tmp_path / "two").rglob("*") if "partial" in p.name]
    assert [v for _, v in first.loss_history] == pytest.approx([v for _, v in one.loss_history[:3]], rel=1e-5)
    assert first.eval_history[0][1] == pytest.approx(one.eval_history[0][1], rel=1e-5)
    # Rank 0's progress reached the caller, once per step.
    assert [m for _, m in progress.updates if m.startswith("step ")][-1].startswith("step 3/3 · loss ")
    assert [s for n, _, s in progress.metrics if n == "train/loss"] == [1, 2, 3]
    assert first.tokens_per_s > 0 and first.peak_vram_gib == 0.0

    # Resume the same run folder to 6 steps: the one-process run's final adapter and losses.
    resumed = train_examples_distributed(cfg_for(tmp_path / "two", emu), TWO_CPU, data, data[:3], pad_id=0)
    assert resumed.resumed_from_step == 3 and resumed.steps_done == 6
    assert_same_adapter(adapter_tensors(resumed.adapter_dir), adapter_tensors(one.adapter_dir))
    assert [v for _, v in resumed.loss_history] == pytest.approx([v for _, v in one.loss_history], rel=1e-5)
    assert [s for s, _ in resumed.eval_history] == [3, 6]
    assert [s for s, _ in list_checkpoints(tmp_path / "two" / "checkpoints")] == [3, 6]
    assert no_children_left()


@pytest.mark.slow
def test_two_processes_anchor_their_own_examples(llama_emulator: tuple[Path, Path], tmp_path: Path) -> None:
    """Each rank computes the offsets of its share, a chunk at a time: the one-process anchored adapter."""
    from emloc_engine.stages.training.trainer import prepare_anchors
    from emloc_engine.weights.lowrank import read_emulator_meta

    model_dir, emu = llama_emulator
    data = examples(model_dir)
    cfg = cfg_for(tmp_path / "one", emu, steps=4, anchor="blocks")
    anchors, _, _ = prepare_anchors(cfg, read_emulator_meta(emu), data, eval_=data[:3])
    one = train_on_examples(cfg, data, data[:3], pad_id=0, anchors=anchors)
    tight = 4 * max(len(e.input_ids) for e in data) * 2 * 32 * 4 / 2**30  # 4 examples' offsets over 2 ranks
    two = train_examples_distributed(cfg_for(tmp_path / "two", emu, steps=4, anchor="blocks", anchor_ram_gib=tight),
                                     TWO_CPU, data, data[:3], pad_id=0, anchored=True)
    assert two.anchor == "blocks" and 0 < two.anchor_peak_bytes <= tight * 2**30 / 2
    assert_same_adapter(adapter_tensors(two.adapter_dir), adapter_tensors(one.adapter_dir))
    assert [v for _, v in two.loss_history] == pytest.approx([v for _, v in one.loss_history], rel=1e-5)
    assert no_children_left()


@pytest.mark.slow
@pytest.mark.parametrize(("how", "error_type", "text"), [
    ("engine", ConfigError, "Rank one cannot go on."),
    ("bug", WorkerFailed, "process 1 of 2 failed: ValueError: an unexpected bug"),
    ("die", WorkerFailed, "process 1 of 2 failed: the process exited with code 3"),
])
def test_a_failing_process_fails_the_caller_and_stops_the_others(how: str, error_type: type[Exception],
                                                                 text: str) -> None:
    # Rank 0 waits in a collective that never completes: the caller must stop it when rank 1 fails,
    # not when the collective times out. A timeout far beyond any start-up time on a busy machine
    # keeps that distinction independent of the machine's speed.
    parallel = dataclasses.replace(TWO_CPU, timeout_s=300.0)
    t0 = time.monotonic()
    with pytest.raises(error_type) as err:
        launch(targets.fail_on_rank_1, how, parallel, ("cpu", "cpu"))
    assert type(err.value) is error_type and text in str(err.value)
    if how == "engine":
        assert err.value.problems == ["first problem"] and err.value.hint == "Change the setting."
    assert time.monotonic() - t0 < parallel.timeout_s
    assert no_children_left()


@pytest.mark.slow
def test_cancel_reaches_every_process() -> None:
    progress = RecordingProgress(cancel_after_updates=3)
    with pytest.raises(Cancelled):
        launch(targets.until_cancelled, None, TWO_CPU, ("cpu", "cpu"), progress)
    assert 3 <= len(progress.updates) < 1000  # rank 0 reported, and stopped soon after the cancel
    assert no_children_left()


# ---------------------------------------------------------------------------------------------
# emloc train --gpus N


def write_qa(path: Path) -> Path:
    rows = [{"prompt": f"Q{i}: what is {i}+{i}?", "completion": f" {2 * i}"} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


CLI_ARGS = ["--steps", "2", "--rank", "4", "--batch-size", "2", "--grad-accum", "2", "--warmup-steps", "1",
            "--save-every", "1", "--max-length", "48", "--targets", "q_proj", "v_proj"]


def test_cli_refuses_impossible_gpu_settings_before_touching_the_run(llama_emulator: tuple[Path, Path],
                                                                      tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(llama_emulator[1], run / "emulator")
    data = write_qa(tmp_path / "qa.jsonl")
    assert main(["train", str(run), str(data), *CLI_ARGS, "--gpus", "0"]) == 2
    assert "must be at least 1 (got 0)" in capsys.readouterr().err
    assert main(["train", str(run), str(data), *CLI_ARGS, "--gpus", "2", "--device", "cuda:1"]) == 2
    assert "--gpus 2 cannot run on the single device cuda:1" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["emulator"]


@pytest.mark.slow
def test_cli_trains_on_two_processes(llama_emulator: tuple[Path, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, emu = llama_emulator
    run = tmp_path / "run"
    shutil.copytree(emu, run / "emulator")
    data = write_qa(tmp_path / "qa.jsonl")
    assert main(["train", str(run), str(data), *CLI_ARGS, "--gpus", "2", "--device", "cpu"]) == 0
    assert f"adapter: {run / 'adapter'}" in capsys.readouterr().out
    manifest = read_manifest(run)
    assert manifest is not None
    record = manifest.stage("train")
    assert record.status == "done" and record.result["steps_done"] == 2
    assert record.result["anchor"] == "blocks" and record.result["anchor_peak_bytes"] > 0  # each rank anchors
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir)
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [1, 2]
    run_log = RunLayout(run).log_file.read_text()  # rank 0's records reach the caller's run log
    assert "Starting 2 training processes" in run_log and "Checkpoint written" in run_log
    assert no_children_left()


def test_dropout_seed_depends_on_seed_step_and_rank_only() -> None:
    def draw(rank: int, step: int, seed: int = 5) -> torch.Tensor:
        hook = _TrainParallel(Collectives(rank, 2, "cpu", "gloo", cancel=None, channel=None), seed, batch_size=2)
        torch.manual_seed(int(torch.randint(0, 10**6, ())))  # whatever state came before
        assert hook.begin_step(step, [[0, 1], [2]]) == ([[0, 2]] if rank == 0 else [[1]])
        return torch.rand(4)

    with torch.random.fork_rng():
        a = draw(1, 4)
        assert torch.equal(a, draw(1, 4))  # a resumed run draws the same dropout masks
        assert not torch.equal(a, draw(1, 5)) and not torch.equal(a, draw(0, 4)) and not torch.equal(a, draw(1, 4, 6))


def test_planner_counts_the_training_peak_per_gpu(llama_emulator: tuple[Path, Path]) -> None:
    from emloc_engine.run.planning import PlanConfig, model_facts, training_peak

    facts = model_facts(llama_emulator[0])
    per_gpu = training_peak(facts, PlanConfig(batch_size=4, num_gpus=2, context_length=64), 0.5)
    # each GPU holds what one GPU with half the batch holds, its share of the anchors included
    assert per_gpu.peak_bytes == training_peak(facts, PlanConfig(batch_size=2, context_length=64), 0.5).peak_bytes
    alone = training_peak(facts, PlanConfig(batch_size=4, context_length=64), 0.5)
    assert per_gpu.peak_bytes < alone.peak_bytes and per_gpu.est_seconds < alone.est_seconds
    with pytest.raises(ConfigError, match="num_gpus must be at least 1"):
        PlanConfig(num_gpus=0)
