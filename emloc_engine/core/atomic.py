"""Atomic outputs: write to a temporary name beside the target, rename when complete.

A crash, a cancel or a full disk never leaves something that looks complete: readers only ever
see the final name after the rename, and leftovers are named ``*.partial``.

A full disk is a message, not a traceback: :func:`disk_errors` turns what the writers raise when
space runs out (``OSError`` ENOSPC/EDQUOT/EFBIG, ``torch.save``'s ``[enforce fail at
inline_container.cc]`` ``RuntimeError``, safetensors' ``SafetensorError ... (os error 28)``) into one
:class:`~emloc_engine.core.errors.DiskFull` naming the folder, the space needed (when known) and the
space free. :func:`atomic_path` and :func:`atomic_dir` apply it to everything written inside them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emloc_engine.core.errors import DiskFull

PARTIAL_SUFFIX = ".partial"

_FULL_ERRNOS = {errno.ENOSPC: "full", errno.EDQUOT: "quota", errno.EFBIG: "limit"}
# What writers that hide the errno say: safetensors (Rust io::Error), torch's zip writer, and text
# that wrappers (peft, transformers) copy from the OSError they caught.
_FULL_TEXT = (
    (re.compile(r"os error 28\b|StorageFull|No space left on device|\[Errno 28\]"), "full"),
    (re.compile(r"os error 122\b|QuotaExceeded|Disk quota exceeded|\[Errno 122\]"), "quota"),
    (re.compile(r"os error 27\b|FileTooLarge|File too large|\[Errno 27\]"), "limit"),
)
# torch.save's PytorchStreamWriter reports a failed write without an errno ("file write failed",
# "unexpected pos 576 vs 534"); the folder's free space and the file-size limit then tell why.
_TORCH_WRITE_FAILED = re.compile(r"inline_container\.cc.*(file write failed|unexpected pos|failed writing)", re.S)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _free_bytes(folder: Path) -> int | None:
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _size_limited() -> bool:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return False
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return bool(soft != resource.RLIM_INFINITY)


def _kind(exc: BaseException) -> str | None:
    """``"full"``, ``"quota"`` or ``"limit"`` when ``exc`` (or what it wraps) is a write that ran out of room."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return _FULL_ERRNOS[e.errno]
        if isinstance(e, OSError | RuntimeError) or type(e).__name__ == "SafetensorError":
            text = str(e)
            for pattern, kind in _FULL_TEXT:
                if pattern.search(text):
                    return kind
            if isinstance(e, RuntimeError) and _TORCH_WRITE_FAILED.search(text):
                return "limit" if _size_limited() else "full"
        e = e.__cause__ or e.__context__
    return None


def as_disk_full(exc: BaseException, folder: Path, needed_bytes: int | None = None) -> DiskFull | None:
    """The :class:`DiskFull` that ``exc`` amounts to, or ``None`` when it is not about disk space.

    Args:
        exc: what a writer raised.
        folder: where it was writing (named in the message; its disk's free space is measured now).
        needed_bytes: how much the whole output needs, when known.
    """
    kind = _kind(exc)
    if kind is None:
        return None
    free = _free_bytes(folder)
    free_text = f"{_gib(free)} free on that disk" if free is not None else "free space unknown"
    need_text = f"; it needs about {_gib(needed_bytes)}" if needed_bytes else ""
    again = "then run the same command again (finished work is kept)"
    if kind == "limit":
        return DiskFull(f"Writing into {folder} hit this process's file-size limit ({free_text}{need_text}).",
                        hint=f"Raise the limit (`ulimit -f unlimited` in the shell that starts emloc), {again}.")
    what = "Your disk quota ran out" if kind == "quota" else "The disk is full"
    return DiskFull(f"{what} while writing into {folder}: {free_text}{need_text}.",
                    hint=f"Free space on that disk, or put the run folder on a disk with more room (--out), {again}.")


@contextlib.contextmanager
def disk_errors(folder: Path, needed_bytes: int | None = None) -> Iterator[None]:
    """Turn "no space left" (and quota / file-size limit) failures of the writes inside into :class:`DiskFull`.

    Args:
        folder: the folder being written (named in the message).
        needed_bytes: how much the output needs, when known (named in the message).

    Raises:
        DiskFull: from the original exception (kept as ``__cause__``); anything else passes unchanged.
    """
    try:
        yield
    except DiskFull:
        raise
    except Exception as exc:
        full = as_disk_full(exc, Path(folder), needed_bytes)
        if full is None:
            raise
        raise full from exc


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: Path, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary file path; on success it is renamed onto ``target``.

    Args:
        target: the final file path. Its folder is created if needed.
        needed_bytes: the file's expected size, if known (named when the disk is full).

    Yields:
        A sibling path ending in ``.partial`` that the caller writes completely.

    Raises:
        DiskFull: the disk (or quota, or file-size limit) ran out while writing (see :func:`disk_errors`).

    On any exception the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    # the partial file is removed first, so the message reports the free space the user really has
    with disk_errors(target.parent, needed_bytes):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + PARTIAL_SUFFIX)
        if tmp.exists():
            tmp.unlink()
        try:
            yield tmp
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise


def write_text_atomic(target: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def write_json_atomic(target: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``target`` atomically."""
    write_text_atomic(target, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(target: Path, *, overwrite: bool = False, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``target`` in one rename.

    The temporary folder is a sibling named ``<target>.<pid>-<random>.partial``, private to this call,
    so concurrent writers of one target never share it (the last to finish wins).

    Args:
        target: the final folder.
        overwrite: replace an existing non-empty ``target``. Without it, a non-empty target is an error.
        needed_bytes: the folder's expected size, if known (named when the disk is full).

    Raises:
        FileExistsError: ``target`` exists, is not empty and ``overwrite`` is False.
        DiskFull: the disk (or quota, or file-size limit) ran out while writing (see :func:`disk_errors`).
    """
    target = Path(target)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty")
    with disk_errors(target.parent, needed_bytes):  # measured after the partial folder is removed
        target.parent.mkdir(parents=True, exist_ok=True)
        # one temporary name per writer: two processes (the app and the CLI, or parallel benchmark runs)
        # building the same shared folder (the demo datasets, a converted model) must not write into, or
        # delete, each other's half-written folder; the last complete one wins the rename
        unique = f".{os.getpid()}-{secrets.token_hex(4)}"
        tmp = target.with_name(target.name + unique + PARTIAL_SUFFIX)
        tmp.mkdir()
        try:
            yield tmp
            old = target.with_name(target.name + unique + ".old" + PARTIAL_SUFFIX)
            for attempt in range(100):
                # Move a finished target aside, then rename ours in. Another writer may rename its folder
                # onto the target between the two (ENOTEMPTY/EEXIST): move that one aside too and retry.
                if target.exists():
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(target, old)
                try:
                    os.replace(tmp, target)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt == 99:
                        raise
                finally:
                    shutil.rmtree(old, ignore_errors=True)
            _fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
