"""A full disk is a message, not a traceback: every writer's "no space" failure becomes one DiskFull naming
the folder, the space needed (when known) and free, and the CLI exits 2 with it — also on a real
file-size limit (RLIMIT_FSIZE in a child process, SIGXFSZ ignored there only)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors import SafetensorError

import emloc_engine
from emloc_engine.core.atomic import atomic_dir, atomic_path, disk_errors
from emloc_engine.core.errors import DiskFull
from emloc_engine.core.layout import RunLayout
from tests.engine.export_helpers import make_adapter

REPO_ROOT = Path(emloc_engine.__file__).resolve().parents[1]
TORCH_SAVE_FULL = ("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                   "data/0: file write failed")
SAFETENSORS_FULL = ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                    'message: "No space left on device" })')


class _Wrapped(Exception):
    """What a library raises around the OSError it caught (peft/transformers save_pretrained)."""


def _wrapped_enospc() -> Exception:
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as inner:
        try:
            raise _Wrapped("saving failed") from inner
        except _Wrapped as outer:
            return outer


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    OSError(errno.EFBIG, "File too large"),
    RuntimeError(TORCH_SAVE_FULL),
    SafetensorError(SAFETENSORS_FULL),
    _wrapped_enospc(),
], ids=["ENOSPC", "EDQUOT", "EFBIG", "torch.save", "safetensors", "wrapped"])
def test_each_writers_disk_full_becomes_one_message(exc: Exception, tmp_path: Path) -> None:
    with pytest.raises(DiskFull) as info, disk_errors(tmp_path / "run", needed_bytes=3 * 2**30):
        raise exc
    text = str(info.value)
    assert str(tmp_path / "run") in text and "free on that disk" in text and "it needs about 3.00 GiB" in text
    assert "Fix:" in text and info.value.__cause__ is exc


@pytest.mark.parametrize("exc", [OSError(errno.ENOENT, "No such file"), ValueError("x"),
                                 RuntimeError("CUDA error: device-side assert"), KeyError("k")])
def test_other_errors_pass_unchanged(exc: Exception, tmp_path: Path) -> None:
    with pytest.raises(type(exc)) as info, disk_errors(tmp_path):
        raise exc
    assert info.value is exc


def test_atomic_writers_translate_and_leave_no_partial(tmp_path: Path) -> None:
    with pytest.raises(DiskFull, match="The disk is full while writing into"), \
            atomic_path(tmp_path / "out" / "state.pt") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError(TORCH_SAVE_FULL)  # what torch.save of a training checkpoint raises
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
    with pytest.raises(DiskFull), atomic_dir(tmp_path / "ckpt", needed_bytes=10) as d:
        (d / "adapter_model.safetensors").write_bytes(b"half")
        raise SafetensorError(SAFETENSORS_FULL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _run_limited(code: str, cwd: Path, limit_bytes: int) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child whose files may not grow past ``limit_bytes`` (SIGXFSZ ignored in the child,
    so writes fail with EFBIG instead of killing it); nothing changes in this process."""
    prelude = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes}))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE/SIGXFSZ as on Linux")
def test_real_write_failures_of_torch_and_safetensors_are_recognised(tmp_path: Path) -> None:
    out = _run_limited(f"""
        import json, torch
        from safetensors.torch import save_file
        from emloc_engine.core.atomic import disk_errors
        from emloc_engine.core.errors import DiskFull
        t, seen = torch.zeros(100_000), {{}}
        for name, write in [("torch.save", lambda p: torch.save({{"t": t}}, p)),
                            ("save_file", lambda p: save_file({{"t": t}}, p)),
                            ("open.write", lambda p: open(p, "wb").write(bytes(400_000)))]:
            try:
                with disk_errors({str(tmp_path)!r}):
                    write({str(tmp_path)!r} + "/" + name)
                seen[name] = "no error"
            except DiskFull as exc:
                seen[name] = str(exc)
        print(json.dumps(seen))
    """, tmp_path, 64 * 1024)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    for name in ("torch.save", "save_file", "open.write"):
        assert "file-size limit" in seen[name] and str(tmp_path) in seen[name], (name, seen)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE/SIGXFSZ as on Linux")
def test_cli_export_on_a_real_size_limit_exits_2_with_a_message(tiny_llama: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_adapter(tiny_llama, RunLayout(run).adapter_corrected)
    argv = ["export", str(run), "--model", str(tiny_llama), "--formats", "merged", "--no-verify"]
    out = _run_limited(f"""
        from emloc_engine.cli.main import main
        sys.exit(main({argv!r}))
    """, tmp_path, 64 * 1024)  # the tiny model's shard is about 150 KiB
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert "file-size limit" in out.stderr and str(run) in out.stderr and "it needs about" in out.stderr
    assert not (run / "merged").exists() and not [p for p in run.iterdir() if "partial" in p.name]
