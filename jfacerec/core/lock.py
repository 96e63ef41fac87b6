"""One trainer per workdir: an exclusive OS lock on WORKDIR/.lock while `train` runs.

Two trainers in one workdir would interleave metrics.jsonl and race each other's checkpoints. The
lock is `fcntl.flock`, which the OS drops when its holder exits, however it exits: a run killed
with SIGKILL leaves nothing to clean up, and resuming it just takes the lock again. Readers
(`evaluate`, `jfacerec.load`, `gallery`) take no lock: they may read a workdir while it trains.

An object store (a gs:// workdir) has no lock its holder's death releases, so there the lock is
not taken: one trainer per bucket path is then the launcher's to keep (launch/ runs one).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from typing import Iterator

from jfacerec.core import storage
from jfacerec.core import workdir as workdir_files


class WorkdirLockedError(ValueError):
    """Another process is training in the workdir.

    A ValueError so that the commands report it as the user's error (`error: ...`, exit status 1):
    the fix is to wait for that process, stop it, or choose another --workdir.
    """


@contextlib.contextmanager
def exclusive(workdir: str) -> Iterator[None]:
    """Holds WORKDIR/.lock for the block, or raises WorkdirLockedError at once.

    The holder writes "pid PID on HOST" into the file, for the message of the process it turns
    away. The file is never removed: removing it would let a third process lock a new file while a
    second still holds the old one.
    """
    if storage.is_remote(workdir):
        yield
        return
    path = workdir_files.path(workdir, workdir_files.LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            raise WorkdirLockedError(
                f"{workdir} is being trained by {holder} (it holds {path}); wait for that run to "
                f"finish or stop it, or train in another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
