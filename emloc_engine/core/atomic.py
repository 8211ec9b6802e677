"""Atomic outputs: write to a temporary name beside the target, rename when complete.

A crash, a cancel or a full disk never leaves something that looks complete: readers only ever
see the final name after the rename, and leftovers are named ``*.partial``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PARTIAL_SUFFIX = ".partial"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary file path; on success it is renamed onto ``target``.

    Args:
        target: the final file path. Its folder is created if needed.

    Yields:
        A sibling path ending in ``.partial`` that the caller writes completely.

    On any exception the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
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
def atomic_dir(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``target`` in one rename.

    The temporary folder is a sibling named ``<target>.<pid>-<random>.partial``, private to this call,
    so concurrent writers of one target never share it (the last to finish wins).

    Args:
        target: the final folder.
        overwrite: replace an existing non-empty ``target``. Without it, a non-empty target is an error.

    Raises:
        FileExistsError: ``target`` exists, is not empty and ``overwrite`` is False.
    """
    target = Path(target)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty")
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
