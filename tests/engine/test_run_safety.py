"""What a run promises under abuse: real ``kill -9`` at several points, two processes on one folder,
leftovers of a dead writer. Each test drives the real ``emloc`` CLI in a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emloc_engine.core.errors import RunStateError
from emloc_engine.run.lock import run_folder_lock
from emloc_engine.run.manifest import read_manifest
from emloc_engine.run.orchestrator import open_run

# A child that runs `emloc ARGS…` and SIGKILLs itself (a real kill -9: no cleanup, no finally) at the first
# progress update at or past FRACTION of the whole run: emulator < 0.2 ≤ train < 0.75 ≤ correct < 0.85 ≤ export.
_KILLER = """
import os, signal, sys
from emloc_engine.core import progress
fraction = float(sys.argv[1])
real = progress.TqdmProgress.update
def update(self, f, message=""):
    if f >= fraction:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, f, message)
progress.TqdmProgress.update = update
from emloc_engine.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _emloc(args: list[str], kill_at: float | None = None) -> subprocess.CompletedProcess[str]:
    code = _KILLER if kill_at is not None else "import sys; from emloc_engine.cli.main import main; sys.exit(main(sys.argv[2:]))"
    argv = [sys.executable, "-c", code, str(kill_at if kill_at is not None else 0), *args]
    return subprocess.run(argv, capture_output=True, text=True, env=_child_env(), timeout=900,
                          start_new_session=True)  # its own SIGINT handling, whatever this process inherited


def _data(path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Double {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]}
            for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _run_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["run", str(model), str(data), "--out", str(out), "--ratio", "0.5", "--rank", "4", "--alpha", "8",
            "--steps", "4", "--batch-size", "2", "--save-every", "2", "--calib", "6", "--max-length", "48",
            "--device", "cpu", "--export", "merged,adapter", "--lambda", "1"]


def _digests(run: Path) -> dict[str, str]:
    """sha256 over every tensor's bytes and the metadata of every weight file the run produced.

    Not the file's bytes: safetensors writes its metadata map in the writing process's hash order, so two
    uninterrupted runs already differ there while every tensor and metadata value is the same.
    """
    from safetensors import safe_open

    out = {}
    for sub in ("emulator", "adapter", "adapter-corrected", "merged"):
        for f in sorted((run / sub).rglob("*.safetensors")):
            h = hashlib.sha256()
            with safe_open(f, "pt") as st:
                h.update(json.dumps(st.metadata(), sort_keys=True).encode())
                for name in sorted(st.keys()):
                    tensor = st.get_tensor(name)
                    h.update(name.encode() + str(tensor.dtype).encode() + tensor.contiguous().view(-1).view(
                        torch.uint8).numpy().tobytes())
            out[str(f.relative_to(run))] = h.hexdigest()
    return out


@pytest.mark.slow
@pytest.mark.integration
def test_kill_9_at_every_stage_then_the_same_command_gives_bit_identical_outputs(tiny_llama: Path,
                                                                                 tmp_path: Path) -> None:
    data = _data(tmp_path / "d.jsonl")
    reference = tmp_path / "reference"
    done = _emloc(_run_args(tiny_llama, data, reference))
    assert done.returncode == 0, done.stderr
    want = _digests(reference)
    assert any(k.startswith("merged/") for k in want) and any(k.startswith("emulator/") for k in want)
    # mid-emulator, mid-training (after a checkpoint), mid-correction, mid-export (merge/verification)
    for kill_at in (0.1, 0.6, 0.8, 0.9):
        run = tmp_path / f"killed-{kill_at}"
        killed = _emloc(_run_args(tiny_llama, data, run), kill_at=kill_at)
        assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr)
        assert (run / ".lock").exists()  # the dead process's lock is left behind ...
        again = _emloc(_run_args(tiny_llama, data, run))  # ... and taken over: it is stale
        assert again.returncode == 0, (kill_at, again.stderr)
        assert _digests(run) == want, kill_at
        manifest = read_manifest(run)
        assert manifest is not None and all(manifest.stage(s).done for s in ("emulator", "train", "correct", "export"))
        assert not list(run.glob("**/*.partial"))


def test_a_second_process_on_the_same_run_folder_is_refused_and_says_who_holds_it(tiny_llama: Path,
                                                                                   tmp_path: Path) -> None:
    run = tmp_path / "run"
    ready = tmp_path / "ready"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, pathlib; from emloc_engine.run.lock import run_folder_lock\n"
         "with run_folder_lock(pathlib.Path(sys.argv[1])):\n"
         "    pathlib.Path(sys.argv[2]).write_text('held')\n    sys.stdin.read()\n", str(run), str(ready)],
        stdin=subprocess.PIPE, env=_child_env(), text=True)
    try:
        for _ in range(6000):  # wait for the handshake file (bounded only to turn a hang into a failure)
            if ready.exists() or holder.poll() is not None:
                break
            subprocess.run([sys.executable, "-c", "import time; time.sleep(0.05)"], check=True)
        assert ready.exists()
        second = _emloc(_run_args(tiny_llama, _data(tmp_path / "d.jsonl"), run))
        assert second.returncode == 2
        assert f"in use by process {holder.pid}" in second.stderr
        assert not (run / "manifest.json").exists()
        with pytest.raises(RunStateError, match="in use"), run_folder_lock(run):
            pass
    finally:
        holder.kill()
        holder.wait()
    with run_folder_lock(run):  # the holder died without releasing: a stale lock is taken over
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()


def test_one_run_per_folder_inside_one_process_too(tmp_path: Path) -> None:
    with run_folder_lock(tmp_path / "run"), pytest.raises(RunStateError, match="another run in this program"), \
            run_folder_lock(tmp_path / "run"):
        pass


def test_leftovers_of_a_dead_writer_are_removed_on_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "merged.4242-deadbeef.partial").mkdir(parents=True)
    (run / "merged.4242-deadbeef.partial" / "model.safetensors").write_bytes(b"x" * 1000)
    (run / "checkpoints" / "step-25.4242-0bad.partial").mkdir(parents=True)
    (run / "checkpoints" / "step-2").mkdir()
    (run / "model.gguf.partial").write_bytes(b"half")
    with open_run(run):
        pass
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*") if "logs" not in p.parts) == \
        ["checkpoints", "checkpoints/step-2"]
