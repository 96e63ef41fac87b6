"""Reading the field's pickles (`.bin` verification sets, PyTorch `.pth` state dicts) without
running their code.

A pickle names the callables that rebuild its objects (`GLOBAL module name`, then `REDUCE`), so
loading one runs whatever it names. `load` admits only the callables a format needs, each mapped
to a function of ours that rebuilds the object from plain data, and refuses any other name with an
UnsafePickleError naming the file: a payload whose `__reduce__` would run `os.system` fails before
anything runs. jfacerec never writes a pickle.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, BinaryIO, Callable, Mapping

Allowed = Mapping[tuple[str, str], Callable[..., Any]]


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What protocol 2 pickles `bytes` as (`_codecs.encode(text, "latin1")`), for that codec only."""
    if encoding != "latin1":
        raise UnsafePickleError(f"_codecs.encode with codec {encoding!r}: only latin1 holds bytes")
    return text.encode("latin1")


# Callables every format may name: plain data that Python 3 pickles at protocol 2 through them.
_PLAIN: Allowed = {("_codecs", "encode"): _latin1_bytes}


class UnsafePickleError(ValueError):
    """A pickle names a callable its format does not need (it would run code when loaded)."""


class _Restricted(pickle.Unpickler):
    def __init__(self, file: BinaryIO, allowed: Allowed, source: str, encoding: str,
                 persistent_load: Callable[[Any], Any] | None):
        super().__init__(file, encoding=encoding)
        self._allowed = allowed
        self._source = source
        if persistent_load is not None:
            self.persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed.get((module, name)) or _PLAIN[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refused to load: the pickle calls {module}.{name}, which this "
                f"format never holds (loading it would run code); use a file from a trusted "
                f"source") from None


def load(data: bytes | BinaryIO, source: str, *, allowed: Allowed | None = None,
         encoding: str = "bytes", persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """The object pickled in `data` (bytes or a binary file), calling only `allowed` callables.

    `allowed` maps (module, name) to the function that stands in for it (bytes at protocol 2
    need none); `source` names the file in errors; `encoding` decodes Python 2 `str` objects ("bytes" keeps
    them as bytes, as the `.bin` sets need); `persistent_load` resolves persistent ids (PyTorch's
    storages). A refused callable is an UnsafePickleError, a damaged or truncated pickle a
    ValueError, both naming `source`.
    """
    file = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        return _Restricted(file, allowed or {}, source, encoding, persistent_load).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"{source}: not a readable pickle ({type(e).__name__}: {e}); the file "
                         f"is truncated or of another format") from e
