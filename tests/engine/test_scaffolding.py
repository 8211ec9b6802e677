"""Progress, errors, atomic writes, the run manifest and the shard reader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from emloc_engine.core.architectures import SUPPORTED_MODEL_TYPES, arch_spec
from emloc_engine.core.atomic import atomic_dir, atomic_path, write_json_atomic
from emloc_engine.core.errors import (
    Cancelled,
    DataError,
    DiskFull,
    ModelNotFound,
    RunStateError,
    UnsupportedModel,
)
from emloc_engine.core.layout import RunLayout
from emloc_engine.core.progress import CancelToken, EtaClock, RecordingProgress, format_seconds, sub
from emloc_engine.weights.checkpoint import Checkpoint, fingerprint_model
from emloc_engine.weights.headers import read_safetensors_header


def test_sub_progress_maps_onto_a_slice() -> None:
    rec = RecordingProgress()
    inner = sub(sub(rec, 0.2, 0.6), 0.5, 1.0)
    inner.update(0.0, "a")
    inner.update(1.0, "b")
    inner.update(2.0, "clamped")
    inner.log("train/loss", 1.5, 3)
    assert [round(f, 6) for f, _ in rec.updates] == [0.4, 0.6, 0.6]
    assert rec.values("train/loss") == [1.5]


def test_recording_progress_cancels_after_n_updates() -> None:
    rec = RecordingProgress(cancel_after_updates=2)
    rec.update(0.1)
    rec.check_cancelled()
    rec.update(0.2)
    with pytest.raises(Cancelled):
        rec.check_cancelled()


def test_cancel_token_is_thread_safe_flag() -> None:
    tok = CancelToken()
    tok.check()
    tok.cancel()
    assert tok.cancelled
    with pytest.raises(Cancelled):
        tok.check()


def test_eta_and_format() -> None:
    clock = EtaClock()
    assert clock.eta_s(0.0) is None
    assert clock.eta_s(1.0) == 0.0
    assert format_seconds(75) == "1 min 15 s"
    assert format_seconds(None) == "?"
    assert format_seconds(7300) == "2 h 1 min"


def test_engine_error_lists_every_problem_and_the_fix() -> None:
    err = DataError("2 problems in data.jsonl", problems=["data.jsonl:3: bad JSON", "data.jsonl:9: empty"],
                    hint="Fix the lines above.")
    text = str(err)
    assert "data.jsonl:3: bad JSON" in text and "data.jsonl:9: empty" in text and "Fix: Fix the lines" in text
    assert err.problems == ["data.jsonl:3: bad JSON", "data.jsonl:9: empty"]


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(DiskFull), atomic_path(target) as tmp:  # a message naming the folder, not ENOSPC
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_non_empty_and_replaces_with_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "merged"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(FileExistsError), atomic_dir(target):
        pass
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    with pytest.raises(RuntimeError), atomic_dir(target, overwrite=True) as tmp:
        (tmp / "c.txt").write_text("3")
        raise RuntimeError("crash midway")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_atomic_dir_concurrent_writers_of_one_target_both_finish(tmp_path: Path) -> None:
    """Two writers inside atomic_dir at the same time (the bug: parallel benchmark runs building the
    shared demo datasets deleted each other's half-written folder) each finish, and the target is one
    writer's complete folder, not a mix; nothing temporary is left."""
    import threading

    target = tmp_path / "demo-data"
    both_inside = threading.Barrier(2, timeout=60)  # only a guard against a hang
    errors: list[BaseException] = []

    def writer(tag: str) -> None:
        try:
            with atomic_dir(target, overwrite=True) as tmp:
                (tmp / "first.txt").write_text(tag)
                both_inside.wait()  # the other writer has created its folder too
                (tmp / "second.txt").write_text(tag)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    contents = {(target / f).read_text() for f in ("first.txt", "second.txt")}
    assert len(contents) == 1 and contents <= {"a", "b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-data"]


def test_manifest_roundtrip(tmp_path: Path) -> None:
    from emloc_engine.data.config import DataConfig
    from emloc_engine.run.config import RunConfig
    from emloc_engine.run.manifest import InputRecord, Manifest, StageRecord, read_manifest, write_manifest

    root = tmp_path / "run"
    cfg = RunConfig(model_dir=Path("/models/x"), data=DataConfig(path=Path("/d.jsonl")), run_dir=root, ratio=0.3)
    m = Manifest(root=root, config=cfg, inputs={"model": InputRecord("/models/x", "abc")},
                 stages={"emulator": StageRecord(status="done", measured_peak_gib=1.2, result={"modules": 14})})
    write_manifest(m)
    again = read_manifest(root)
    assert again is not None and again.config == cfg and again.stage("emulator").done
    assert again.stage("emulator").result == {"modules": 14} and again.inputs["model"].fingerprint == "abc"
    assert again.stage("train").status == "pending"
    assert again.versions["torch"] == torch.__version__.split("+")[0] or again.versions["torch"]
    (root / "manifest.json").write_text("{broken")
    with pytest.raises(RunStateError, match="not valid JSON"):
        read_manifest(root)


def test_run_layout_is_the_documented_one(tmp_path: Path) -> None:
    lay = RunLayout(tmp_path)
    assert lay.emulator.name == "emulator" and lay.adapter_corrected.name == "adapter-corrected"
    assert lay.gguf.name == "model.gguf" and lay.manifest.name == "manifest.json"


def test_checkpoint_reads_headers_and_single_tensors(tmp_path: Path) -> None:
    save_file({"a.weight": torch.ones(3, 4, dtype=torch.bfloat16)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b.weight": torch.zeros(5, dtype=torch.float32)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    ck = Checkpoint(tmp_path)
    assert sorted(ck.names()) == ["a.weight", "b.weight"]
    assert ck.info("a.weight").shape == (3, 4) and ck.info("a.weight").nbytes == 24
    assert ck.num_parameters() == 17 and ck.dominant_dtype() == "BF16"
    assert ck.get("a.weight", dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ModelNotFound, match="not in the checkpoint"):
        ck.get("zzz")
    fp1 = fingerprint_model(tmp_path)
    save_file({"b.weight": torch.ones(5, dtype=torch.float32)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    assert fingerprint_model(tmp_path) != fp1


def test_truncated_shard_is_reported_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:6])
    with pytest.raises(ModelNotFound, match="truncated"):
        read_safetensors_header(path)
    path.write_bytes(data[: len(data) - 1000])
    ck = Checkpoint(tmp_path)
    with pytest.raises(ModelNotFound, match="'w'"):
        ck.get("w")


def test_pickle_only_folder_is_unsupported(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UnsupportedModel, match="safetensors"):
        Checkpoint(tmp_path)


def test_arch_specs() -> None:
    llama = arch_spec({"model_type": "llama"})
    assert llama.groups[0].modules == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    assert len(llama.linear_modules) == 7 and llama.module_name(3, "mlp.up_proj") == "model.layers.3.mlp.up_proj"
    assert arch_spec({"model_type": "phi3"}).short_names == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert "qwen2" in SUPPORTED_MODEL_TYPES
    with pytest.raises(UnsupportedModel, match="Supported decoder families"):
        arch_spec({"model_type": "bert"})


def test_write_json_atomic(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "x" / "a.json", {"k": 1})
    assert json.loads((tmp_path / "x" / "a.json").read_text()) == {"k": 1}
    assert not any(p.name.endswith(".partial") for p in (tmp_path / "x").iterdir())
    assert os.access(tmp_path / "x" / "a.json", os.R_OK)


def test_manifest_records_cancel_and_failure_apart(tmp_path: Path) -> None:
    from emloc_engine.run.manifest import read_manifest
    from emloc_engine.run.orchestrator import open_run, run_stage

    def fail(exc: BaseException) -> None:
        raise exc

    with open_run(tmp_path / "run") as session:
        with pytest.raises(Cancelled):
            run_stage(session, "train", lambda: fail(Cancelled()))
        with pytest.raises(KeyboardInterrupt):
            run_stage(session, "correct", lambda: fail(KeyboardInterrupt()))
        with pytest.raises(DataError):
            run_stage(session, "export", lambda: fail(DataError("bad row", problems=["d.jsonl:3: bad JSON"])))
    again = read_manifest(tmp_path / "run")
    assert again is not None
    assert again.stage("train").status == "cancelled" and again.stage("correct").status == "cancelled"
    assert again.stage("export").status == "failed" and "d.jsonl:3" in again.stage("export").message

