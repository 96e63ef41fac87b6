"""Writing result files atomically: readers see the old file or the new one, never half of one.

On a local file system: a temporary file beside the target, renamed over it. On an object store
(gs://, s3://): one upload of the whole object, which the store makes visible all at once.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import stat
from typing import IO, Iterator

from jfacerec.core import storage


def _create_beside(path: str) -> str:
    """A new empty hidden file in `path`'s folder, with the permissions a plain open() gives
    (0666 less the umask, which the kernel applies; tempfile.mkstemp would make it 0600, and every
    CSV and gallery written private)."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return tmp


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Opens a temporary file beside `path`; on success it is flushed to disk and renamed over
    `path`, keeping `path`'s permissions; on an exception it is removed and `path` is untouched.
    An OSError without a file name (a full disk while writing) gets `path` as its file name.
    On an object store the content is buffered and uploaded in one piece on success."""
    if storage.is_remote(path):
        with _remote_open(path, mode) as f:
            yield f
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _create_beside(path)
    try:
        if os.path.exists(path):  # a replaced file keeps its permissions
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = path
        raise


@contextlib.contextmanager
def _remote_open(path: str, mode: str) -> Iterator[IO]:
    buffer = io.BytesIO() if "b" in mode else io.StringIO()
    yield buffer
    data = buffer.getvalue()
    target = storage.epath_of(path)
    if "b" in mode:
        target.write_bytes(data)
    else:
        target.write_text(data)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Appends to a text file; an object is rewritten whole with `text` added (stores have no
    append), so a reader sees the file before or after, never half a line."""
    if storage.is_remote(path):
        before = storage.read_text(path) if storage.isfile(path) else ""
        with atomic_open(path) as f:
            f.write(before + text)
    else:
        with io.open(path, "a") as f:
            f.write(text)


def check_writable(directory: str | os.PathLike) -> None:
    """Raises a one-line ValueError naming `directory` when files cannot be created, read back
    and replaced in it: a missing bucket, no credentials, a read-only or rename-less file system.

    Called before training writes anything, so that such a run stops at once, not at its first
    checkpoint.
    """
    directory = os.fspath(directory)
    storage.check_credentials(directory)
    probe = storage.join(directory, f".jfacerec-probe-{secrets.token_hex(4)}")
    try:
        storage.makedirs(directory)
        with atomic_open(probe) as f:
            f.write("probe\n")
        with atomic_open(probe) as f:  # replacing: a rename on a local file system
            f.write("probe again\n")
        if storage.read_text(probe) != "probe again\n":
            raise OSError("a file written there reads back differently")
        storage.remove(probe)
    except Exception as e:  # noqa: BLE001 - any failure of the store is the user's to fix
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        hint = ("check that the bucket exists and that this machine's credentials may write to "
                "it (gcloud auth application-default login, or the VM's service account)"
                if storage.is_remote(directory) else
                "choose a --workdir on a writable file system that allows renames")
        raise ValueError(f"cannot write to {directory}: {type(e).__name__}: {reason}; "
                         f"{hint}") from None
