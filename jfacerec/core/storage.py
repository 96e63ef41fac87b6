"""Local paths and object storage (gs://, s3://) behind one set of functions.

Every file jfacerec reads or writes under a workdir or a dataset root goes through here, so that
`--workdir gs://bucket/run` works on a TPU VM without a gcsfuse mount. Paths stay strings; a local
one is handled by `os` (as before), a URI by `etils.epath`, the path library orbax uses too (its
`gs://` backend is gcsfs, which honours `STORAGE_EMULATOR_HOST`; orbax's arrays go through
TensorStore's own GCS driver, which honours `TENSORSTORE_GCS_HTTP_URL`).

Object stores have no rename and no append. An object is created whole by one upload, which is
how `core.atomic` writes there (and appends, by rewriting the object).
"""

from __future__ import annotations

import errno
import io
import os
import posixpath
import shutil
from typing import IO

from etils import epath

REMOTE_SCHEMES = ("gs://", "s3://", "az://", "hf://")


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is an object-store URI (gs://, s3://, ...) rather than a local path."""
    return os.fspath(path).startswith(REMOTE_SCHEMES)


def epath_of(path: str | os.PathLike) -> epath.Path:
    return epath.Path(os.fspath(path))


def join(base: str | os.PathLike, *names: str) -> str:
    base = os.fspath(base)
    return posixpath.join(base, *names) if is_remote(base) else os.path.join(base, *names)


def dirname(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(path)


def absolute(path: str | os.PathLike) -> str:
    """An absolute local path; a URI as it is."""
    path = os.fspath(path)
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def relative(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """`path` relative to the folder `root` ('/'-separated under a URI)."""
    path, root = os.fspath(path), os.fspath(root)
    if is_remote(root):
        return posixpath.relpath(path.split("://", 1)[1], root.split("://", 1)[1])
    return os.path.relpath(path, root)


def exists(path: str | os.PathLike) -> bool:
    return epath_of(path).exists() if is_remote(path) else os.path.exists(path)


def isfile(path: str | os.PathLike) -> bool:
    return epath_of(path).is_file() if is_remote(path) else os.path.isfile(path)


def isdir(path: str | os.PathLike) -> bool:
    return epath_of(path).is_dir() if is_remote(path) else os.path.isdir(path)


def makedirs(path: str | os.PathLike) -> None:
    """Creates the folder and its parents (nothing on object stores, which have no folders: an
    object's name holds its path)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def listdir(path: str | os.PathLike) -> list[str]:
    """The names in a folder, sorted."""
    if is_remote(path):
        return sorted(p.name for p in epath_of(path).iterdir())
    return sorted(os.listdir(path))


def files_under(root: str | os.PathLike) -> list[str]:
    """Every file below `root`, as sorted '/'-separated paths relative to it. An object store
    is listed in one paginated request, not one per folder (minutes for LFW's 5,749)."""
    root = os.fspath(root).rstrip("/")
    if is_remote(root):
        fs, prefix = _fsspec(root)
        return sorted(key[len(prefix):].strip("/") for key in fs.find(prefix)
                      if key[len(prefix):].strip("/"))
    return sorted(os.path.relpath(os.path.join(d, name), root).replace(os.sep, "/")
                  for d, _, names in os.walk(root) for name in names)


def _fsspec(path: str):
    """(fsspec filesystem, path within it) of an object-store URI: the calls epath lacks."""
    import fsspec

    return fsspec.core.url_to_fs(path)


def read_range(path: str, size: int, length: int, position: int) -> bytes:
    """`os.pread` for an object of `size` bytes: `length` bytes from byte `position`, fewer at
    its end. One ranged request, stateless, so any thread may call it at any time."""
    end = min(size, position + length)
    if end <= position:
        return b""
    fs, name = _fsspec(path)
    return fs.cat_file(name, start=position, end=end)


def getsize(path: str | os.PathLike) -> int:
    return epath_of(path).stat().length if is_remote(path) else os.path.getsize(path)


def open(path: str | os.PathLike, mode: str = "r", **kwargs) -> IO:  # noqa: A001
    """Opens a file for reading (or for a whole local write; remote writes go through
    `core.atomic.atomic_open`). A missing object is the FileNotFoundError a local open gives,
    naming its URI (gcsfs names it by its API address)."""
    if not is_remote(path):
        return io.open(path, mode, **kwargs)
    kwargs.pop("newline", None)  # epath takes none: an object's text has universal newlines
    try:
        return epath_of(path).open(mode, **kwargs)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fspath(path)) from None


def read_text(path: str | os.PathLike) -> str:
    with open(path) as f:
        return f.read()


def read_bytes(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def remove(path: str | os.PathLike) -> None:
    if is_remote(path):
        epath_of(path).unlink()
    else:
        os.remove(path)


def rmtree(path: str | os.PathLike) -> None:
    if is_remote(path):
        epath_of(path).rmtree()
    else:
        shutil.rmtree(path)


def rename(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Renames a file or folder (on an object store, which has no rename: copies each object,
    then deletes the originals; gcsfs's own move first tries an API that not every server has)."""
    if is_remote(source):
        if isfile(source):
            epath_of(source).copy(epath_of(target))
            remove(source)
            return
        for name in files_under(source):
            epath_of(join(source, name)).copy(epath_of(join(target, name)))
        rmtree(source)
    else:
        os.rename(source, target)


def check_credentials(path: str | os.PathLike) -> None:
    """Raises a one-line ValueError naming `path` when it is on GCS and this machine has no Google
    credentials: gcsfs would otherwise fall back to anonymous access and fail later, slowly.
    An emulator (STORAGE_EMULATOR_HOST) needs none."""
    if not os.fspath(path).startswith("gs://") or os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    import google.auth
    import google.auth.exceptions
    try:
        google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError as e:
        reason = " ".join(str(e).split())[:200]
        raise ValueError(f"cannot use {os.fspath(path)}: no Google Cloud credentials ({reason}); "
                         f"run gcloud auth application-default login, or use a VM whose service "
                         f"account may write to the bucket") from None
