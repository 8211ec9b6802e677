"""One process per run folder: ``RUN_DIR/.lock`` holds the owner's pid, host and start time.

Taken with ``O_CREAT | O_EXCL`` (atomic on local file systems). A lock whose process is gone (same
host, pid not alive) is stale: it is taken over and the takeover is logged. A second run on the same
folder, from the CLI or the app (in this process too), is refused with who holds it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from emloc_engine.core.errors import RunStateError
from emloc_engine.core.json_files import read_json_object

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"
_held: set[Path] = set()  # folders this process holds (threads of one process share a pid)
_held_guard = threading.Lock()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _stale(owner: dict[str, object]) -> bool:
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int):
        return not owner  # an unreadable or empty lock file is a crashed writer's
    return pid != os.getpid() and not _alive(pid)


@contextlib.contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the duration of the block (the folder is created).

    Raises:
        RunStateError: another live process (or another run in this one) holds it; the message says who.
    """
    root = Path(run_dir).resolve()
    path = root / LOCK_NAME
    with _held_guard:
        if root in _held:
            raise RunStateError(f"The run folder {root} is in use by another run in this program.",
                                hint="Wait for it to finish or cancel it; use another --out for a second run.")
        _held.add(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = read_json_object(path)
                if not _stale(owner):
                    raise RunStateError(
                        f"The run folder {root} is in use by process {owner.get('pid')} on {owner.get('host')} "
                        f"(since {owner.get('started')}).",
                        hint="Wait for that run to finish or stop it; use another --out for a second run. If no "
                             f"such process exists, delete {path}.") from None
                log.warning("Taking over the lock of %s from process %s, which is gone.", root, owner.get("pid"))
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(me)
            break
        yield
    finally:
        with contextlib.suppress(OSError):
            if read_json_object(path).get("pid") == os.getpid():
                path.unlink()
        with _held_guard:
            _held.discard(root)


def lock_holder(run_dir: Path) -> dict[str, object] | None:
    """Who holds ``run_dir``'s lock now (``pid``, ``host``, ``started``), or None; reads only, takes nothing."""
    root = Path(run_dir).resolve()
    with _held_guard:
        if root in _held:
            return {"pid": os.getpid(), "host": socket.gethostname()}
    path = root / LOCK_NAME
    if not path.exists():
        return None
    owner = read_json_object(path)
    return None if _stale(owner) else owner
