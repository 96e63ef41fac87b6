"""Reading a PyTorch state dict (`torch.save(model.state_dict(), "backbone.pth")`) without torch
and without running the file's code.

torch.save writes a zip: `<name>/data.pkl` (the pickled dict; each tensor a call of
torch._utils._rebuild_tensor_v2 on a persistent id ('storage', storage type, key, location,
numel)), `<name>/data/<key>` (each storage's raw bytes), `<name>/byteorder` ("little" or "big";
little when absent) and version records. The pickle is read by core.safe_pickle with only the
callables a state dict needs; each storage becomes a NumPy array and each tensor a view of it
(offset, sizes, strides), copied.
"""

from __future__ import annotations

import collections
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from jfacerec.core import safe_pickle, storage

# torch's typed storage classes, as torch.save names them, and the element type of each.
_STORAGES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

_WHOLE_MODEL_HINT = ("it holds a whole pickled model (torch.save(model)), not a state dict: "
                     "save the weights alone with torch.save(model.state_dict(), 'backbone.pth')")


class _StorageType:
    """What the pickle's `torch.<Name>Storage` stands for: the storages' element type."""

    def __init__(self, dtype: Any):
        self.dtype = np.dtype(dtype)


class _Names(dict):
    """The allowed callables, remembering the last name asked for that is not among them (the
    one the unpickler refuses), so that a refusal can say what the file holds."""

    refused: tuple[str, str] | None = None

    def get(self, key, default=None):
        if key not in self:
            self.refused = key
        return super().get(key, default)


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple,
                    *_: Any) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2: the view of `storage` at `offset` with `size` and
    `stride` (in elements), copied. Trailing arguments (requires_grad, hooks, metadata) are
    ignored."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
        raise ValueError(f"a tensor of sizes {size}, strides {stride} at offset {offset}")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= storage.size:
        raise ValueError(f"a tensor of sizes {size}, strides {stride} at offset {offset} reaches "
                         f"past its storage of {storage.size} elements")
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride])
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, *_: Any) -> np.ndarray:
    """torch._utils._rebuild_parameter (a state dict saved with keep_vars): its data."""
    return data


def _allowed() -> _Names:
    names = _Names({("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                    ("collections", "OrderedDict"): collections.OrderedDict})
    names.update({("torch", name): _StorageType(dtype) for name, dtype in _STORAGES.items()})
    return names


def _prefix(archive: zipfile.ZipFile, path: str) -> str:
    """The folder holding data.pkl (the name torch.save gave the archive)."""
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
    if len(pickles) != 1:
        raise ValueError(f"{path}: a zip without one data.pkl, not a PyTorch .pth file; save the "
                         f"weights with torch.save(model.state_dict(), 'backbone.pth')")
    return pickles[0][:-len("data.pkl")]


def _byteorder(archive: zipfile.ZipFile, prefix: str) -> str:
    name = f"{prefix}byteorder"
    order = archive.read(name).decode().strip() if name in archive.namelist() else "little"
    if order not in ("little", "big"):
        raise ValueError(f"byteorder {order!r}")
    return order


def _storage_loader(archive: zipfile.ZipFile, prefix: str, order: str):
    """persistent_load for the pickle: ('storage', type, key, location, numel) -> 1-D array."""
    cache: dict[str, np.ndarray] = {}

    def load(pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise ValueError(f"persistent id {str(pid)[:80]} is not a typed storage")
        _, kind, key, _, numel = pid
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in cache:
            dtype = kind.dtype.newbyteorder("<" if order == "little" else ">")
            raw = archive.read(f"{prefix}data/{key}")
            if len(raw) < int(numel) * dtype.itemsize:
                raise ValueError(f"storage {key} holds {len(raw)} bytes, {numel} elements of "
                                 f"{kind.dtype} need {int(numel) * dtype.itemsize}")
            cache[key] = np.frombuffer(raw, dtype, int(numel)).astype(kind.dtype)
        return cache[key]

    return load


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a `.pth` state dict, by key, as NumPy arrays (their own dtypes; bfloat16 as
    ml_dtypes.bfloat16).

    Raises FileNotFoundError when `path` is missing; safe_pickle.UnsafePickleError (a ValueError)
    when its pickle calls anything but tensor and dict rebuilding, with a hint when it is a whole
    pickled model; ValueError, naming the file, when it is truncated, of another format, or
    holds no dict of tensors.
    """
    if not storage.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; pass a .pth state dict written by "
                                f"torch.save(model.state_dict(), ...)")
    try:
        with storage.open(path, "rb") as f, zipfile.ZipFile(f) as archive:
            prefix = _prefix(archive, path)
            loader = _storage_loader(archive, prefix, _byteorder(archive, prefix))
            allowed = _allowed()
            try:
                obj = safe_pickle.load(archive.read(f"{prefix}data.pkl"), path, allowed=allowed,
                                       encoding="utf-8", persistent_load=loader)
            except safe_pickle.UnsafePickleError as e:
                if allowed.refused and _is_class(*allowed.refused):
                    raise safe_pickle.UnsafePickleError(f"{e}; {_WHOLE_MODEL_HINT}") from None
                raise
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path}: not a readable PyTorch zip file ({e}): the file is truncated, "
                         f"or was written by torch < 1.6 (load and save it again with a recent "
                         f"torch)") from e
    except (KeyError, EOFError, zipfile.LargeZipFile) as e:
        raise ValueError(f"{path}: a damaged PyTorch file ({type(e).__name__}: {e}); download "
                         f"or save it again") from e
    return _tensors(obj, path)


def _is_class(module: str, name: str) -> bool:
    """Whether a refused callable is a model's class (torch.nn's, or a CamelCase name outside
    the standard library's modules that run commands)."""
    if module.startswith("torch.nn"):
        return True
    return name[:1].isupper() and module.split(".")[0] not in ("os", "posix", "nt", "subprocess",
                                                               "builtins", "sys", "shutil")


def _tensors(obj: Any, path: str) -> dict[str, np.ndarray]:
    """The state dict in `obj`: obj itself, or the `state_dict` / `state_dict_backbone` of a
    training checkpoint; a DistributedDataParallel `module.` prefix removed."""
    if isinstance(obj, dict):
        for key in ("state_dict_backbone", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
        raise ValueError(f"{path}: holds {type(obj).__name__}, not a state dict of tensors; save "
                         f"the weights with torch.save(model.state_dict(), 'backbone.pth')")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)
