"""Reading a dataset's files where jfacerec.core.storage has no call for it yet: whole files with
a missing object named in full, byte ranges of an object, and one listing of a whole tree.

Local paths go to `os` and `open` as before; object-store URIs (gs://) to fsspec, the library
behind storage's `etils.epath` (gcsfs for gs://, which honours STORAGE_EMULATOR_HOST). fsspec
keeps one filesystem instance per process and makes a new one in a forked or spawned worker, so
grain's worker processes each open their own connections.
"""

from __future__ import annotations

import contextlib
import errno
import os
from typing import IO, Iterator

from jfacerec.core import storage


def _missing(path: str) -> FileNotFoundError:
    """The error a local open gives, for an object: gcsfs names the object by its API URL."""
    return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)


@contextlib.contextmanager
def open_file(path: str, mode: str = "r", **kwargs) -> Iterator[IO]:
    """`storage.open` for reading; a missing object is a FileNotFoundError naming its URI."""
    if storage.is_remote(path):
        # epath's open takes no newline=: an object's text is read with universal newlines.
        kwargs.pop("newline", None)
    try:
        f = storage.open(path, mode, **kwargs)
    except FileNotFoundError:
        if not storage.is_remote(path):
            raise
        raise _missing(path) from None
    with f:
        yield f


def read_bytes(path: str) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    with open_file(path) as f:
        return f.read()


def _fs(path: str):
    import fsspec

    return fsspec.core.url_to_fs(path)


def read_range(path: str, size: int, length: int, position: int) -> bytes:
    """`os.pread` for an object of `size` bytes: `length` bytes from byte `position`, fewer at
    its end. One ranged request, stateless, so any thread may call it at any time."""
    end = min(size, position + length)
    if end <= position:
        return b""
    fs, name = _fs(path)
    return fs.cat_file(name, start=position, end=end)


def object_names(root: str) -> list[str]:
    """Every object below the object-store folder `root`, as '/'-separated paths relative to it,
    from one paginated listing (a request per folder would take minutes for LFW's 5,749)."""
    fs, prefix = _fs(root.rstrip("/"))
    return [key[len(prefix):].strip("/") for key in fs.find(prefix)
            if key[len(prefix):].strip("/")]
