"""Verification `.bin` sets (insightface's lfw.bin, cfp_fp.bin, agedb_30.bin ...): read and write.

A `.bin` is a pickle of `(images, issame)`: `images` the encoded images (JPEG or PNG bytes) of
`pairs` pairs, image 2i and 2i + 1 forming pair i, and `issame` one boolean per pair. insightface
wrote them with Python 2 (protocol 2, read with `encoding="bytes"`); later packs hold the images as
uint8 NumPy arrays of the encoded bytes. `read_bin` reads protocols 2 to 5 through the restricted
unpickler (jfacerec.core.safe_pickle): only NumPy's uint8 array reconstruction is admitted, mapped
to functions of ours, and anything else is refused naming the file. `write_bin` emits the pickle
opcodes itself, so the file holds data and nothing that runs.

    python -m jfacerec.data.bin --pairs lfw/pairs.txt --images lfw/lfw-deepfunneled --out lfw.bin
        [--crop 0.5] [--size 112] [--format jpeg] [--quality 95]

packs the pairs of an LFW pairs file (all its folds, in order) as insightface's lfw.bin is packed:
two images per pair, the central `--crop` of each image resized to `--size`. Every path may be on
an object store (gs://; jfacerec.core.storage).
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct
from typing import Any, Callable, Sequence

import numpy as np
from absl import flags
from PIL import Image
from tqdm.auto import tqdm

from jfacerec.core import cli, safe_pickle, storage
from jfacerec.core.atomic import atomic_open
from jfacerec.data import images as image_io
from jfacerec.data.pairs import read_lfw_pairs

# Encoded bytes (JPEG, PNG), a uint8 [nbytes] array of them, or uint8 RGB pixels [h, w, 3].
Encoded = bytes | np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)  # arrays have no one truth value to compare
class BinSet:
    """A verification set: `images` [2 * pairs], decoded on demand; `issame` bool [pairs]."""

    name: str  # the file name without .bin
    path: str
    images: list[Encoded]
    issame: np.ndarray

    def __len__(self) -> int:
        """The number of pairs."""
        return len(self.issame)

    def image(self, index: int, size: int | None = None) -> np.ndarray:
        """Image `index` as uint8 [size, size, 3] (its own shape when `size` is None). An image
        that does not decode is an ImageDecodeError naming the file and the index."""
        item = self.images[index]
        if isinstance(item, np.ndarray) and item.ndim == 3:
            pixels = np.ascontiguousarray(item)  # RGB; a Fortran-order pickle is not contiguous
        else:
            data = item.tobytes() if isinstance(item, np.ndarray) else item
            pixels = image_io.decode(data, name=f"{self.path}, image {index}")
        return pixels if size is None else image_io.resize(pixels, size)

    def decoded(self, size: int | None = None, start: int = 0, stop: int | None = None
                ) -> np.ndarray:
        """Images start..stop - 1 (all by default) as uint8 [n, size, size, 3]; without `size`
        they must share one shape."""
        faces = [self.image(i, size) for i in range(start, len(self.images) if stop is None
                                                    else stop)]
        if len({f.shape for f in faces}) > 1:
            raise ValueError(f"{self.path}: the images differ in size ({faces[0].shape[:2]}, ...); "
                             f"pass size= to resize them")
        return np.stack(faces) if faces else np.zeros((0, size or 0, size or 0, 3), np.uint8)


# -- Reading -------------------------------------------------------------------------------------

class _NdarrayClass:
    """Stands in for `numpy.ndarray`, the class argument of `_reconstruct`."""


class _Uint8Dtype:
    """What `numpy.dtype("u1", ...)` rebuilds; the pickled dtype state is checked, not applied."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple):
            raise safe_pickle.UnsafePickleError(f"a dtype state {type(state).__name__}")


class _PendingArray:
    """What `_reconstruct` returns: the uint8 array, once the pickle's BUILD gives its state
    `(version, shape, dtype, fortran_order, raw bytes)`."""

    array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise safe_pickle.UnsafePickleError("an array state that is not NumPy's")
        shape, dtype, fortran, raw = state[-4:]
        self.array = _uint8_array(raw, dtype, shape, "F" if fortran else "C")


def _text(value: Any) -> str:
    """A Python 2 `str` arrives as bytes (encoding="bytes"): as text."""
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _uint8_array(raw: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if not isinstance(dtype, _Uint8Dtype):
        raise safe_pickle.UnsafePickleError("an array whose dtype is not uint8")
    if not isinstance(raw, (bytes, bytearray)) or not isinstance(shape, tuple) or not all(
            isinstance(s, int) and s >= 0 for s in shape) or _text(order) not in ("C", "F"):
        raise safe_pickle.UnsafePickleError("an array state that is not NumPy's")
    if len(raw) != int(np.prod(shape)):
        raise safe_pickle.UnsafePickleError(f"an array of shape {shape} with {len(raw)} bytes")
    return np.frombuffer(bytes(raw), np.uint8).reshape(shape, order=_text(order))


def _numpy_callables() -> safe_pickle.Allowed:
    """NumPy's array pickling (numpy.core before NumPy 2, numpy._core after), for uint8 only;
    an UnsafePickleError says what else the pickle holds."""

    def dtype(name: Any, align: Any = False, copy: Any = False) -> _Uint8Dtype:
        if _text(name) not in ("u1", "|u1", "uint8"):
            raise safe_pickle.UnsafePickleError(f"an array of dtype {_text(name)}")
        return _Uint8Dtype()

    def reconstruct(cls: Any, shape: Any, code: Any) -> _PendingArray:
        if cls is not _NdarrayClass:
            raise safe_pickle.UnsafePickleError(f"_reconstruct of {cls!r}")
        return _PendingArray()

    def frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
        return _uint8_array(buffer, dtype, shape, order)  # protocol 5

    allowed: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "dtype"): dtype, ("numpy", "ndarray"): _NdarrayClass}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


def _image(item: Any, path: str, index: int) -> Encoded:
    if isinstance(item, _PendingArray):
        item = item.array
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and (item.ndim == 1 or (item.ndim == 3
                                                            and item.shape[-1] == 3)):
        return item
    what = f"an array of shape {item.shape}" if isinstance(item, np.ndarray) else \
        type(item).__name__
    raise ValueError(f"{path}, image {index}: {what}, not an encoded image (bytes, or uint8 "
                     f"[nbytes]) nor uint8 pixels [h, w, 3]")


def read_bin(path: str) -> BinSet:
    """The verification set in `path`. ValueError naming the file (and the image or pair) for a
    pickle that would run code, a truncated file, or lists that do not pair up."""
    data = storage.read_bytes(path)
    try:
        loaded = safe_pickle.load(data, path, allowed=_numpy_callables(), encoding="bytes")
    except safe_pickle.UnsafePickleError as e:
        if str(e).startswith(path):
            raise
        raise safe_pickle.UnsafePickleError(
            f"{path}: refused to load: the pickle holds {e}; a .bin holds encoded images (bytes "
            f"or uint8 arrays) and booleans only") from None
    if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2
            and all(isinstance(x, (list, tuple)) for x in loaded)):
        raise ValueError(f"{path}: not a verification .bin (expected a pickled pair "
                         f"(images, issame) of two lists)")
    raw_images, raw_issame = loaded
    if not raw_issame:
        raise ValueError(f"{path}: no pairs; the file is damaged or not a verification set")
    if len(raw_images) != 2 * len(raw_issame):
        first = min(len(raw_images), 2 * len(raw_issame))
        raise ValueError(
            f"{path}: {len(raw_images)} images for {len(raw_issame)} pairs (a .bin holds two per "
            f"pair, {2 * len(raw_issame)}): from image {first} on they do not pair up; the file "
            f"is damaged or not a verification set")
    for i, same in enumerate(raw_issame):
        if not isinstance(same, (bool, np.bool_)) and same not in (0, 1):
            raise ValueError(f"{path}, pair {i}: issame is {same!r}, not a boolean")
    images = [_image(item, path, i) for i, item in enumerate(raw_images)]
    name = os.path.basename(path).removesuffix(".bin")
    return BinSet(name, path, images, np.array([bool(s) for s in raw_issame]))


# -- Writing -------------------------------------------------------------------------------------

# Pickle opcodes (Lib/pickletools.py). BINBYTES and SHORT_BINBYTES are protocol 3's bytes, which
# every Python 3 reads whatever its `encoding`; the header says 3 so that a reader that cannot
# read them (Python 2) says so at once.
_PROTO, _EMPTY_LIST, _MARK, _APPENDS = b"\x80\x03", b"]", b"(", b"e"
_SHORT_BINBYTES, _BINBYTES, _NEWTRUE, _NEWFALSE, _TUPLE2, _STOP = b"C", b"B", b"\x88", b"\x89", \
    b"\x86", b"."


def _bytes_op(data: bytes) -> bytes:
    if len(data) < 256:
        return _SHORT_BINBYTES + bytes([len(data)]) + data
    if len(data) >= 1 << 32:
        raise ValueError(f"an image of {len(data)} bytes: a .bin image must be under 4 GiB")
    return _BINBYTES + struct.pack("<I", len(data)) + data


def write_bin(path: str, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Writes `(images, issame)` as a `.bin` (atomically) that insightface's reader
    (`pickle.load(f, encoding="bytes")`) and `read_bin` read. images: encoded bytes
    [2 * pairs]; issame: [pairs]."""
    if len(images) != 2 * len(issame) or not issame:
        raise ValueError(f"{path}: {len(images)} images for {len(issame)} pairs; give two images "
                         f"per pair")
    with atomic_open(path, "wb") as f:
        f.write(_PROTO + _EMPTY_LIST + _MARK)
        for i, image in enumerate(images):
            if not isinstance(image, (bytes, bytearray)):
                raise ValueError(f"{path}, image {i}: {type(image).__name__}, not encoded bytes")
            f.write(_bytes_op(bytes(image)))
        f.write(_APPENDS + _EMPTY_LIST + _MARK)
        f.write(b"".join(_NEWTRUE if same else _NEWFALSE for same in issame))
        f.write(_APPENDS + _TUPLE2 + _STOP)


def encode(image: np.ndarray, image_format: str = "jpeg", quality: int = 95) -> bytes:
    """uint8 [h, w, 3] -> JPEG (at `quality`, insightface's packs: 95) or PNG (lossless) bytes."""
    if image_format not in ("jpeg", "png"):
        raise ValueError(f"image format {image_format!r}: choose jpeg or png")
    out = io.BytesIO()
    options = {"quality": quality} if image_format == "jpeg" else {}
    Image.fromarray(image).save(out, format=image_format.upper(), **options)
    return out.getvalue()


def pack_pairs(pairs_path: str, root: str, out: str, *, crop_fraction: float = 0.5,
               size: int = 112, image_format: str = "jpeg", quality: int = 95) -> int:
    """The pairs of an LFW pairs file (every fold, in order) as a .bin at `out`: each image's
    central `crop_fraction`, resized to `size` and encoded. Returns the number of pairs."""
    pairs = [p for fold in read_lfw_pairs(pairs_path) for p in fold]
    paths = [p for pair in pairs for p in pair.paths(root)]
    encoded: dict[str, bytes] = {}
    for p in tqdm(paths, desc=os.path.basename(out), unit="img"):
        if p not in encoded:
            face = image_io.load_face(p, crop_fraction=crop_fraction, size=size)
            encoded[p] = encode(face, image_format, quality)
    write_bin(out, [encoded[p] for p in paths], [p.same for p in pairs])
    return len(pairs)


def main(argv):
    del argv
    f = flags.FLAGS
    with cli.exit_on_user_error(output=f.out):
        n = pack_pairs(f.pairs, f.images, f.out, crop_fraction=f.crop, size=f.size,
                       image_format=f.format, quality=f.quality)
    print(f"wrote {f.out}: {n} pairs, {2 * n} images")


if __name__ == "__main__":
    flags.DEFINE_string("pairs", None, "LFW pairs file (pairs.txt, pairsDevTest.txt).")
    flags.DEFINE_string("images", None, "Image folder: <name>/<name>_NNNN.jpg.")
    flags.DEFINE_string("out", None, "The .bin to write.")
    flags.DEFINE_float("crop", 0.5, "Central fraction of each image side kept (deep-funneled LFW "
                       "faces fill about the central half); 1 keeps the image.")
    flags.DEFINE_integer("size", 112, "Side of the stored images, as insightface's packs.")
    flags.DEFINE_enum("format", "jpeg", ["jpeg", "png"], "Encoding (png: lossless).")
    flags.DEFINE_integer("quality", 95, "JPEG quality.")
    flags.mark_flags_as_required(["pairs", "images", "out"])
    cli.run(main)
