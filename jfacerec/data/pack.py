"""python -m jfacerec.data.pack SRC DST [--shards N] [--size S --crop F] [--strict]
python -m jfacerec.data.pack --from-recordio ROOT DST [--shards N] [--strict]

Packs an identity-folder tree (`SRC/<identity>/<image>`) into ArrayRecord shards: the recommended
form for large datasets, where millions of small files make opening files the bottleneck. Every
image is decoded once while packing (unreadable files are skipped with a warning, or with
`--strict` stop the run); with `--size` it is also cropped to the face and stored small.

DST holds `index.json` (format version, identity names, images per identity, shard files) and
`shard-XXXXX-of-YYYYY.array_record`. A record is a 4-byte little-endian int32 label followed by the
encoded image; records are written identity by identity, so the labels follow from the counts.
Read them back with `jfacerec.data.records.ArrayRecordSource` (config `dataset.name="arrayrecord"`).

The other pack this module reads is mxnet's RecordIO, in which insightface ships its training sets
(`ROOT/train.rec`, `train.idx`, `property`): `open_recordio` gives random access to its images
(`dataset.name="recordio"` trains on it directly) and `--from-recordio` converts one, image bytes
unchanged, into the ArrayRecord form.

SRC, ROOT and DST may be on an object store (gs://; jfacerec.core.storage): a pack is written in a
local temporary folder, then uploaded, index.json last. A RecordIO pack on a store is read with
ranged requests (its headers while opening, in 16 MiB windows; then one request per image).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import struct
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
from absl import app, flags
from PIL import Image
from tqdm.auto import tqdm

from jfacerec.core import cli, storage
from jfacerec.data.folders import SkippedImageWarning, scan_identity_folders
from jfacerec.data.images import ImageDecodeError, decode, load_face

FORMAT_VERSION = 1
INDEX = "index.json"
_LABEL = struct.Struct("<i")


def encode_record(label: int, image: bytes) -> bytes:
    return _LABEL.pack(label) + image


def decode_record(record: bytes) -> tuple[int, bytes]:
    """record -> (label, encoded image bytes)."""
    return _LABEL.unpack_from(record)[0], record[_LABEL.size:]


def read_index(directory: str) -> dict:
    """The validated index of a packed dataset."""
    path = storage.join(directory, INDEX)
    if not storage.isfile(path):
        raise FileNotFoundError(f"{path}: no packed dataset here; make one with "
                                f"python -m jfacerec.data.pack SRC {directory}")
    index = json.loads(storage.read_text(path))
    if index.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {index.get('format_version')}; this "
                         f"jfacerec reads version {FORMAT_VERSION}: pack the images again")
    if len(index["names"]) != len(index["counts"]) or sum(index["counts"]) != index["num_records"]:
        raise ValueError(f"{path} is inconsistent (names, counts and num_records disagree)")
    for shard in index["shards"]:
        if not storage.isfile(storage.join(directory, shard)):
            raise FileNotFoundError(f"{directory}: shard {shard} named in {INDEX} is missing")
    return index


def _encoded(path: str, size: int | None, crop: float, quality: int) -> bytes:
    if size is None:
        return storage.read_bytes(path)
    face = load_face(path, crop_fraction=crop, size=size)
    buffer = io.BytesIO()
    Image.fromarray(face).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _shard_count(shards: int, total_bytes: int) -> int:
    """`shards`, or where it is 0 or less, about one per GiB."""
    return shards if shards > 0 else max(1, int(np.ceil(total_bytes / (1 << 30))))


def _upload(staging: str, dst: str) -> None:
    """The files of local folder `staging` as the objects of `dst`, replacing those there;
    index.json last, so that a reader never finds an index whose shards are not all there."""
    if storage.exists(dst):
        storage.rmtree(dst)
    names = sorted(os.listdir(staging), key=lambda name: name == INDEX)
    for name in tqdm(names, desc=f"uploading to {dst}", unit="file", leave=False):
        with open(os.path.join(staging, name), "rb") as source, \
                storage.epath_of(storage.join(dst, name)).open("wb") as target:
            shutil.copyfileobj(source, target, 1 << 24)


@contextlib.contextmanager
def _staged(dst: str) -> Iterator[str]:
    """A new folder beside `dst` (a local temporary one for a `dst` on an object store) to write
    the pack into; it replaces `dst` only once the body completes, and is removed if the body
    fails (`dst` untouched)."""
    if storage.is_remote(dst):
        with tempfile.TemporaryDirectory(prefix="jfacerec-pack-") as staging:
            yield staging
            _upload(staging, dst)
        return
    staging = dst.rstrip("/") + f".partial-{os.getpid()}"
    os.makedirs(staging, exist_ok=False)
    try:
        yield staging
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.replace(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_shards(directory: str, items: Iterator[tuple[int, bytes] | None], total: int,
                  shards: int, desc: str) -> list[str]:
    """Writes `total` items, each (label, encoded image) or None for one left out, into `shards`
    ArrayRecord files of `directory`; returns their names."""
    from array_record.python.array_record_module import ArrayRecordWriter

    shards = max(1, min(shards, total))
    names = [f"shard-{i:05d}-of-{shards:05d}.array_record" for i in range(shards)]
    # Contiguous runs of records per shard keep a shard's reads sequential in file order.
    bounds = np.linspace(0, total, shards + 1).round().astype(int)
    with tqdm(total=total, desc=desc, unit="img") as bar:
        for s, name in enumerate(names):
            writer = ArrayRecordWriter(os.path.join(directory, name), "group_size:1")
            for _ in range(bounds[s], bounds[s + 1]):
                item = next(items)
                if item is not None:
                    writer.write(encode_record(*item))
                bar.update(1)
            writer.close()
    return names


def _write_index(directory: str, index: dict) -> None:
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump(index, f, indent=1)


def pack(src: str, dst: str, *, shards: int = 0, size: int | None = None, crop: float = 1.0,
         quality: int = 95, strict: bool = False) -> dict:
    """Writes the packed dataset to `dst` (replacing one there only once the new one is
    complete) and returns its index. shards: 0 picks about 1 GiB per shard."""
    scanned = scan_identity_folders(storage.absolute(src), strict=strict)
    if shards <= 0:  # sizes only when needed: a request per file on an object store
        shards = _shard_count(shards, sum(storage.getsize(p) for p in scanned.paths))
    items = ((int(scanned.labels[i]), _encoded(scanned.paths[i], size, crop, quality))
             for i in range(len(scanned)))
    with _staged(dst) as staging:
        index = {
            "format_version": FORMAT_VERSION,
            "source": storage.absolute(src),
            "names": list(scanned.names),
            "counts": np.bincount(scanned.labels, minlength=len(scanned.names)).tolist(),
            "num_records": len(scanned),
            "shards": _write_shards(staging, items, len(scanned), shards, f"packing {src}"),
            "image_size": size,
            "crop_fraction": crop if size else None,
            "skipped": list(scanned.skipped),
        }
        _write_index(staging, index)
    return index


# RecordIO: mxnet's record format, in which insightface ships its training sets.
#
# A record: uint32 magic, uint32 (continuation flag << 29 | payload length), the payload, zero
# padding to 4 bytes. mxnet's writer splits a payload wherever an aligned word equals the magic,
# dropping that word: flag 0 is a whole record, 1, 2, 3 the first, middle and last part.
RECORDIO_MAGIC = 0xCED7230A
RECORDIO_FILES = ("train.rec", "train.idx", "property")
_MAGIC_WORD = struct.pack("<I", RECORDIO_MAGIC)
_RECORD_HEAD = struct.Struct("<II")
_LENGTH_MASK = (1 << 29) - 1
# A payload: label count, label, id, id2; `count` float32 labels follow when count > 0 (the label
# is then the first of them), then the encoded image.
_IMAGE_HEAD = struct.Struct("<IfQQ")
_SCAN_CHUNK = 1 << 16
# Record headers of a pack on an object store are read in windows of this many bytes: one
# request per window, not per record (insightface's MS1M pack holds 5.8 million).
_REMOTE_WINDOW = 1 << 24

# (length, position) -> the bytes there, fewer at the end of the file: os.pread on an open file,
# or a ranged request for an object.
ReadAt = Callable[[int, int], bytes]


def _padded(length: int) -> int:
    return (length + 3) & ~3


def read_recordio_property(path: str) -> tuple[int, int, int]:
    """`property`, the text `num_classes,height,width` -> those three integers."""
    text = storage.read_text(path).strip()
    try:
        num_classes, height, width = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{path}: expected 'num_classes,height,width' (three integers), got "
                         f"{text[:60]!r}") from None
    if min(num_classes, height, width) < 1:
        raise ValueError(f"{path}: num_classes, height and width must be positive, got {text!r}")
    return num_classes, height, width


def _index_line_error(path: str) -> ValueError:
    """The first line of a `train.idx` that is not `key<TAB>byte offset`, as an error."""
    with storage.open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if fields and (len(fields) != 2 or not all(v.isdigit() for v in fields)):
                return ValueError(f"{path} line {number}: expected 'key<TAB>byte offset' (two "
                                  f"non-negative integers), got {line.strip()[:60]!r}")
    return ValueError(f"{path}: expected lines 'key<TAB>byte offset'")


def read_recordio_index(path: str) -> tuple[np.ndarray, np.ndarray]:
    """`train.idx`, lines `key<TAB>byte offset` -> (keys, offsets), int64 [n] each, file order."""
    words = storage.read_text(path).split()
    if not words:
        raise ValueError(f"{path} lists no records; expected lines 'key<TAB>byte offset'")
    try:
        pairs = np.array(words, dtype=np.uint64).astype(np.int64)  # whole file at once: fast
    except (ValueError, OverflowError):
        raise _index_line_error(path) from None
    if len(pairs) % 2:
        raise _index_line_error(path)
    keys, offsets = pairs[0::2], pairs[1::2]
    unique, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{path} lists key {unique[counts > 1][0]} more than once; rebuild the "
                         f"index")
    return keys, offsets


def _reader(path: str) -> tuple[ReadAt, Callable[[], None]]:
    """(read_at, close) for the file `path`: os.pread on a descriptor for a local file, ranged
    requests for an object."""
    if storage.is_remote(path):
        return functools.partial(storage.read_range, path, storage.getsize(path)), lambda: None
    fd = os.open(path, os.O_RDONLY)
    return functools.partial(os.pread, fd), functools.partial(os.close, fd)


def read_record(read_at: ReadAt, offset: int, path: str, length_hint: int = 0) -> bytes:
    """The payload of the record starting at byte `offset` of the file `path`, read with
    `read_at`, its parts joined. length_hint: the first part's length where known (one read)."""
    parts: list[bytes] = []
    position = offset
    while True:
        chunk = read_at(_RECORD_HEAD.size + (0 if parts else length_hint), position)
        if len(chunk) < _RECORD_HEAD.size:
            raise ValueError(f"{path}: the record at byte offset {offset} is truncated (the file "
                             f"ends at byte {position + len(chunk)}); copy the file again")
        magic, word = _RECORD_HEAD.unpack_from(chunk)
        if magic != RECORDIO_MAGIC:
            raise ValueError(f"{path}: no record at byte offset {position} (magic {magic:#010x}, "
                             f"expected {RECORDIO_MAGIC:#010x}): the file is corrupt or train.idx "
                             f"belongs to another pack")
        flag, length = word >> 29, word & _LENGTH_MASK
        if flag not in ((2, 3) if parts else (0, 1)):
            raise ValueError(f"{path}: the record at byte offset {offset} has a part with "
                             f"continuation flag {flag} at byte offset {position}; the file is "
                             f"corrupt or train.idx belongs to another pack")
        data = chunk[_RECORD_HEAD.size:_RECORD_HEAD.size + length]
        if len(data) < length:
            data += read_at(length - len(data), position + _RECORD_HEAD.size + len(data))
        if len(data) < length:
            raise ValueError(f"{path}: the record at byte offset {offset} is truncated (a part "
                             f"of {length} bytes at byte offset {position}, the file ends "
                             f"{length - len(data)} bytes short); copy the file again")
        parts.append(data)
        if flag in (0, 3):
            return _MAGIC_WORD.join(parts)
        position += _RECORD_HEAD.size + _padded(length)


def unpack_image(payload: bytes, where: str) -> tuple[np.ndarray, bytes]:
    """A record's payload -> (float32 [k] labels, the encoded image); `where` names it in
    errors."""
    if len(payload) < _IMAGE_HEAD.size:
        raise ValueError(f"{where} holds {len(payload)} bytes, fewer than the "
                         f"{_IMAGE_HEAD.size}-byte image header; the pack is corrupt")
    count, label, _, _ = _IMAGE_HEAD.unpack_from(payload)
    if count == 0:
        return np.array([label], np.float32), payload[_IMAGE_HEAD.size:]
    start = _IMAGE_HEAD.size + 4 * count
    if len(payload) < start:
        raise ValueError(f"{where} announces {count} labels but holds {len(payload)} bytes; the "
                         f"pack is corrupt")
    return np.frombuffer(payload, "<f4", count, _IMAGE_HEAD.size), payload[start:]


class RecordIOPack:
    """The images of a RecordIO pack (`open_recordio`), read by position.

    offsets: int64 [n] byte offset of each image's record in `rec`; lengths: int64 [n] the
    length of its first part; labels: int32 [n], in [0, num_classes). Reads go through the index
    (one positioned read per record: os.pread, or a ranged request for a pack on an object store),
    from any thread (neither shares a file position) and any process (the file is opened lazily
    in each; a pickled pack carries its arrays, not the file).
    """

    def __init__(self, rec: str, offsets: np.ndarray, lengths: np.ndarray, labels: np.ndarray,
                 num_classes: int, image_shape: tuple[int, int]):
        self.rec, self.num_classes, self.image_shape = rec, num_classes, image_shape
        self.offsets = np.asarray(offsets, np.int64)
        self.lengths = np.asarray(lengths, np.int64)
        self.labels = np.asarray(labels, np.int32)
        self._read_at: ReadAt | None = None
        self._close: Callable[[], None] | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.offsets)

    def subset(self, indices: np.ndarray) -> RecordIOPack:
        """The images at `indices`, in that order (labels unchanged)."""
        indices = np.asarray(indices, np.int64)
        return RecordIOPack(self.rec, self.offsets[indices], self.lengths[indices],
                            self.labels[indices], self.num_classes, self.image_shape)

    def where(self, index: int) -> str:
        return f"{self.rec} record at byte offset {self.offsets[index]}"

    def _file(self) -> ReadAt:
        if self._pid != os.getpid():  # first use in this process (or a forked child)
            with self._lock:
                if self._pid != os.getpid():
                    self._read_at, self._close = _reader(self.rec)
                    self._pid = os.getpid()
        return self._read_at

    def payload(self, index: int) -> bytes:
        return read_record(self._file(), int(self.offsets[index]), self.rec,
                           int(self.lengths[index]))

    def image(self, index: int) -> bytes:
        """The encoded image (JPEG or PNG bytes) of image `index`."""
        return unpack_image(self.payload(index), self.where(index))[1]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_read_at"], state["_close"], state["_pid"], state["_lock"] = None, None, None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self):
        if getattr(self, "_close", None) is not None and self._pid == os.getpid():
            self._close()

    def __repr__(self) -> str:
        return f"RecordIOPack({len(self)} images of {self.num_classes} classes in {self.rec})"


def _image_positions(rec: str, keys: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The positions in train.idx of the image records. insightface's packs keep a header in
    record 0 (label count > 0) whose first label N ends the image keys [1, N) (the keys after
    hold per-identity key ranges); in other packs every indexed record is an image."""
    at_zero = np.flatnonzero(keys == 0)
    if not len(at_zero):
        return np.arange(len(keys))
    read_at, close = _reader(rec)
    try:
        payload = read_record(read_at, int(offsets[at_zero[0]]), rec)
    finally:
        close()
    if len(payload) < _IMAGE_HEAD.size or _IMAGE_HEAD.unpack_from(payload)[0] == 0:
        return np.arange(len(keys))
    end = int(unpack_image(payload, f"{rec} record 0 (the header)")[0][0])
    if end <= 1:
        raise ValueError(f"{rec}: its header (record 0) gives no image keys ([1, {end})); the "
                         f"pack is corrupt")
    wanted = np.arange(1, end, dtype=np.int64)
    order = np.argsort(keys)
    found = np.minimum(np.searchsorted(keys[order], wanted), len(keys) - 1)
    missing = wanted[keys[order][found] != wanted]
    if len(missing):
        raise ValueError(f"{rec}: its header (record 0) gives image keys [1, {end}), but "
                         f"train.idx lacks key {missing[0]}; the index belongs to another pack")
    return order[found]


def _windowed_heads(read_at: ReadAt, size: int, at: np.ndarray, width: int) -> np.ndarray:
    """uint8 [m, width]: the `width` bytes from each offset `at` [m] (the file's last byte
    repeated past its end), read in windows of _REMOTE_WINDOW bytes, one request each."""
    order = np.argsort(at, kind="stable")
    ordered = at[order]
    heads = np.empty((len(at), width), np.uint8)
    i = 0
    while i < len(ordered):
        start = int(ordered[i])
        j = max(i + 1, int(np.searchsorted(ordered, start + _REMOTE_WINDOW - width, "right")))
        end = min(size, int(ordered[j - 1]) + width)
        block = np.frombuffer(read_at(end - start, start), np.uint8)
        heads[order[i:j]] = block[np.minimum(ordered[i:j, None] - start + np.arange(width),
                                             len(block) - 1)]
        i = j
    return heads


def _header_reader(rec: str, size: int, read_at: ReadAt
                   ) -> Callable[[np.ndarray], np.ndarray]:
    """offsets int64 [m] -> uint8 [m, 36], the bytes of each record's headers (the file's last
    byte repeated past its end): memory-mapped for a local file, in windows for an object."""
    width = _RECORD_HEAD.size + _IMAGE_HEAD.size + 4
    if storage.is_remote(rec):
        return lambda at: _windowed_heads(read_at, size, at, width)
    mapped = np.memmap(rec, np.uint8, mode="r")
    span = np.arange(width)
    return lambda at: mapped[np.minimum(at[:, None] + span, size - 1)]


def _scan_labels(rec: str, offsets: np.ndarray, num_classes: int,
                 property_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(first-part lengths int64 [n], labels int32 [n]) of the records at `offsets`, read from
    their headers (a chunk of records at a time), every header checked."""
    size = storage.getsize(rec)
    read_at, close = _reader(rec)
    heads = _header_reader(rec, size, read_at)
    lengths = np.empty(len(offsets), np.int64)
    labels = np.empty(len(offsets), np.float32)

    def check(bad: np.ndarray, at: np.ndarray, problem) -> None:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{rec}: the record at byte offset {at[i]} {problem(i)}")

    bar = tqdm(total=len(offsets), desc=f"checking {rec}", unit="record", leave=False,
               disable=len(offsets) <= _SCAN_CHUNK)
    try:
        for start in range(0, len(offsets), _SCAN_CHUNK):
            at = offsets[start:start + _SCAN_CHUNK]
            head = heads(at)  # [m, 36] bytes
            magic, word = head[:, :8].copy().view("<u4").T
            flag, length = word >> 29, (word & _LENGTH_MASK).astype(np.int64)
            check(magic != RECORDIO_MAGIC, at,
                  lambda i: f"does not start with the record magic ({magic[i]:#010x}): the file "
                            f"is corrupt or train.idx belongs to another pack")
            check(flag > 1, at, lambda i: "is the middle of a split record, not the start of one: "
                                          "train.idx belongs to another pack")
            check(at + _RECORD_HEAD.size + length > size, at,
                  lambda i: f"is truncated ({length[i]} bytes announced, the file ends "
                            f"{at[i] + 8 + length[i] - size} bytes short); copy the file again")
            check(length < _IMAGE_HEAD.size, at,
                  lambda i: f"holds {length[i]} bytes, fewer than the {_IMAGE_HEAD.size}-byte "
                            f"image header; the pack is corrupt")
            body = head[:, 8:].copy()
            count = body[:, :4].copy().view("<u4")[:, 0].astype(np.int64)
            check((flag == 0) & (_IMAGE_HEAD.size + 4 * count > length), at,
                  lambda i: f"announces {count[i]} labels but holds {length[i]} bytes; the "
                            f"pack is corrupt")
            label = np.where(count > 0, body[:, 24:28].copy().view("<f4")[:, 0],
                             body[:, 4:8].copy().view("<f4")[:, 0])
            # A split record whose first part ends before its first label: read it whole.
            for i in np.flatnonzero((count > 0) & (length < _IMAGE_HEAD.size + 4)):
                payload = read_record(read_at, int(at[i]), rec)
                label[i] = unpack_image(payload, f"{rec} record at byte offset {at[i]}")[0][0]
            check((label != np.round(label)) | (label < 0) | (label >= num_classes), at,
                  lambda i: f"has label {label[i]:g}, not an identity in [0, {num_classes}) "
                            f"(num_classes from {property_path}); the property file belongs to "
                            f"another pack")
            lengths[start:start + len(at)], labels[start:start + len(at)] = length, label
            bar.update(len(at))
    finally:
        bar.close()
        close()
    return lengths, labels.astype(np.int32)


def open_recordio(root: str) -> RecordIOPack:
    """The images of the RecordIO pack in folder `root` (`train.rec`, `train.idx`, `property`),
    every record header checked: a bad magic, a truncated record, an index pointing past the end
    of train.rec or a label outside [0, num_classes) is a ValueError naming the file and byte
    offset."""
    if not storage.isdir(root):
        raise FileNotFoundError(f"{root}: no such folder (expected a RecordIO pack: "
                                f"{', '.join(RECORDIO_FILES)}); check the path")
    rec, idx, prop = (storage.join(root, name) for name in RECORDIO_FILES)
    for path in (rec, idx, prop):
        if not storage.isfile(path):
            raise FileNotFoundError(f"{path}: no such file; a RecordIO pack holds "
                                    f"{', '.join(RECORDIO_FILES)}")
    num_classes, height, width = read_recordio_property(prop)
    keys, offsets = read_recordio_index(idx)
    size = storage.getsize(rec)
    beyond = np.flatnonzero(offsets + _RECORD_HEAD.size > size)
    if len(beyond):
        i = beyond[0]
        raise ValueError(f"{idx}: key {keys[i]} points at byte offset {offsets[i]}, past the end "
                         f"of {rec} ({size} bytes); the index belongs to another pack: use the "
                         f"train.idx written with this train.rec")
    offsets = offsets[_image_positions(rec, keys, offsets)]
    lengths, labels = _scan_labels(rec, offsets, num_classes, prop)
    return RecordIOPack(rec, offsets, lengths, labels, num_classes, (height, width))


def _checked_image(records: RecordIOPack, index: int) -> tuple[bytes, ImageDecodeError | None]:
    """(image bytes, None) or, when they do not decode, (bytes, the error). JPEGs are decoded at
    1/8 scale, as folder scans check files."""
    image = records.image(index)
    try:
        decode(image, name=records.where(index), min_side=8)
    except ImageDecodeError as e:
        return image, e
    return image, None


def pack_recordio(src: str, dst: str, *, shards: int = 0, strict: bool = False) -> dict:
    """Converts the RecordIO pack in `src` (`open_recordio`) into ArrayRecord shards in `dst`,
    identity by identity, the image bytes unchanged; identity i is named str(its RecordIO label).
    Every image is decoded once (unreadable ones are skipped with a warning, or with `strict`
    stop the run). Replaces `dst` only once the new pack is complete; returns its index."""
    records = open_recordio(src)
    order = np.argsort(records.labels, kind="stable")
    names: list[str] = []
    counts: list[int] = []
    skipped: list[str] = []

    def items() -> Iterator[tuple[int, bytes] | None]:
        # Threads overlap reading and decoding (Pillow releases the GIL); a block at a time
        # keeps memory bounded.
        with ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
            for block in range(0, len(order), 256):
                chosen = order[block:block + 256]
                for i, (image, error) in zip(chosen, pool.map(
                        lambda i: _checked_image(records, i), chosen)):
                    if error is not None:
                        if strict:
                            raise error
                        warnings.warn(f"skipping {error}", SkippedImageWarning, stacklevel=2)
                        skipped.append(records.where(i))
                        yield None
                        continue
                    name = str(records.labels[i])
                    if not names or names[-1] != name:
                        names.append(name)
                        counts.append(0)
                    counts[-1] += 1
                    yield len(names) - 1, image

    shards = _shard_count(shards, storage.getsize(records.rec))
    height, width = records.image_shape
    with _staged(dst) as staging:
        shard_names = _write_shards(staging, items(), len(records), shards,
                                    f"converting {src}")
        index = {
            "format_version": FORMAT_VERSION,
            "source": storage.absolute(src),
            "names": names,
            "counts": counts,
            "num_records": sum(counts),
            "shards": shard_names,
            "image_size": height if height == width else None,
            "crop_fraction": None,
            "skipped": skipped,
        }
        _write_index(staging, index)
    return index


def main(argv):
    if len(argv) != 3:
        raise app.UsageError("usage: python -m jfacerec.data.pack SRC DST [options], or "
                             "python -m jfacerec.data.pack --from-recordio ROOT DST")
    f = flags.FLAGS
    from_recordio = f["from-recordio"].value
    if from_recordio and (f.size is not None or f["crop"].present or f["quality"].present):
        raise app.UsageError("--size, --crop and --quality do not apply to --from-recordio, "
                             "which copies the image bytes unchanged")
    start = time.time()
    with cli.exit_on_user_error(output=argv[2]):
        if from_recordio:
            index = pack_recordio(argv[1], argv[2], shards=f.shards, strict=f.strict)
        else:
            index = pack(argv[1], argv[2], shards=f.shards, size=f.size, crop=f.crop,
                         quality=f.quality, strict=f.strict)
    skipped = f", skipped {len(index['skipped'])} unreadable files" if index["skipped"] else ""
    print(f"packed {index['num_records']} images of {len(index['names'])} identities into "
          f"{len(index['shards'])} shards in {argv[2]} ({time.time() - start:.1f} s{skipped})")


if __name__ == "__main__":
    flags.DEFINE_integer("shards", 0, "Number of shards; 0 picks about 1 GiB each.")
    flags.DEFINE_integer("size", None, "Store faces cropped and resized to SIZE x SIZE JPEGs "
                         "(smaller and faster to read); default stores the original files.")
    flags.DEFINE_float("crop", 1.0, "With --size: the central fraction of each side to keep.")
    flags.DEFINE_integer("quality", 95, "With --size: JPEG quality.")
    flags.DEFINE_bool("from-recordio", False, "SRC is a RecordIO pack (train.rec, train.idx, "
                      "property: insightface's training sets); its image bytes are copied.")
    cli.strict_flag()
    cli.run(main)
