"""One run per run directory: a lock that a second run into the same folder cannot take.

The lock is an ``flock`` on ``RUN/.zoo-run.lock``, which also records the holder (pid, host, command).
The kernel drops an ``flock`` when its process dies however it dies (SIGKILL included), so a lock left
behind by a killed run never blocks ``ckpt_path=last`` or ``resume=latest``: only a live process holds one.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import ZooError

LOCK_NAME = ".zoo-run.lock"


class RunDirInUseError(ZooError, RuntimeError):
    pass


def _holder_text(lock: Path) -> str:
    try:
        h = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["started"])) if h.get("started") else "?"
    return f"process {h.get('pid', '?')} on {h.get('host', '?')} (started {since}: {h.get('command', '?')})"


def check_run_dir_free(run_dir: str | Path) -> None:
    """Raise :class:`RunDirInUseError` if a live run holds ``run_dir`` (a look, no lock is kept)."""
    lock = Path(run_dir) / LOCK_NAME
    if not lock.is_file():
        return
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(Path(run_dir), lock) from None
    finally:
        os.close(fd)  # closing drops a lock taken just to look


def _in_use(run_dir: Path, lock: Path) -> RunDirInUseError:
    return RunDirInUseError(
        f"run directory {run_dir} is in use by {_holder_text(lock)}; two runs in one folder would mix their "
        "checkpoints, config.yaml and metrics.json. Wait for it to end, stop it, or give another "
        "hydra.run.dir=..."
    )


def not_writable(run_dir: Path, e: OSError) -> ZooError:
    cause = "the folder is read-only or not writable" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else (
        "the disk is full" if e.errno == errno.ENOSPC else type(e).__name__)
    return ZooError(f"cannot write in run directory {run_dir}: {cause} ({e.strerror or e}); give a writable "
                    "hydra.run.dir=... (or paths.output_dir); nothing was written")


def check_run_dir_writable(run_dir: str | Path) -> None:
    """Create ``run_dir`` if needed and make sure this process can write in it (before Hydra tries)."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise not_writable(run_dir, e) from None
    if not os.access(run_dir, os.W_OK):  # also EROFS for root, whom permission bits do not stop
        raise not_writable(run_dir, OSError(errno.EROFS if _read_only_fs(run_dir) else errno.EACCES,
                                            "read-only file system" if _read_only_fs(run_dir) else "permission denied"))


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


@contextmanager
def run_dir_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold ``run_dir`` for the ``with`` block; a run already holding it is an error naming its process."""
    run_dir = Path(run_dir)
    check_run_dir_writable(run_dir)
    lock = run_dir / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise not_writable(run_dir, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(run_dir, lock) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield lock
    finally:
        os.close(fd)  # drops the lock; the file stays, naming the last holder
