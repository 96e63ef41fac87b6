"""python -m jfacerec.data.pack SRC DST [--shards N] [--size S --crop F] [--strict]

Packs an identity-folder tree (`SRC/<identity>/<image>`) into ArrayRecord shards: the recommended
form for large datasets, where millions of small files make opening files the bottleneck. Every
image is decoded once while packing (unreadable files are skipped with a warning, or with
`--strict` stop the run); with `--size` it is also cropped to the face and stored small.

DST holds `index.json` (format version, identity names, images per identity, shard files) and
`shard-XXXXX-of-YYYYY.array_record`. A record is a 4-byte little-endian int32 label followed by the
encoded image; records are written identity by identity, so the labels follow from the counts.
Read them back with `jfacerec.data.records.ArrayRecordSource` (config `dataset.name="arrayrecord"`).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import time

import numpy as np
from absl import app, flags
from PIL import Image
from tqdm.auto import tqdm

from jfacerec.core import cli
from jfacerec.data.folders import scan_identity_folders
from jfacerec.data.images import load_face

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
    path = os.path.join(directory, INDEX)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no packed dataset here; make one with "
                                f"python -m jfacerec.data.pack SRC {directory}")
    with open(path) as f:
        index = json.load(f)
    if index.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {index.get('format_version')}; this "
                         f"jfacerec reads version {FORMAT_VERSION}: pack the images again")
    if len(index["names"]) != len(index["counts"]) or sum(index["counts"]) != index["num_records"]:
        raise ValueError(f"{path} is inconsistent (names, counts and num_records disagree)")
    for shard in index["shards"]:
        if not os.path.isfile(os.path.join(directory, shard)):
            raise FileNotFoundError(f"{directory}: shard {shard} named in {INDEX} is missing")
    return index


def _encoded(path: str, size: int | None, crop: float, quality: int) -> bytes:
    if size is None:
        with open(path, "rb") as f:
            return f.read()
    face = load_face(path, crop_fraction=crop, size=size)
    buffer = io.BytesIO()
    Image.fromarray(face).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def pack(src: str, dst: str, *, shards: int = 0, size: int | None = None, crop: float = 1.0,
         quality: int = 95, strict: bool = False) -> dict:
    """Writes the packed dataset to `dst` (replacing one there only once the new one is
    complete) and returns its index. shards: 0 picks about 1 GiB per shard."""
    from array_record.python.array_record_module import ArrayRecordWriter

    files = scan_identity_folders(os.path.abspath(src), strict=strict)
    if shards <= 0:
        total = sum(os.path.getsize(p) for p in files.paths)
        shards = max(1, int(np.ceil(total / (1 << 30))))
    shards = min(shards, len(files))
    names = [f"shard-{i:05d}-of-{shards:05d}.array_record" for i in range(shards)]
    # Contiguous runs of records per shard keep a shard's reads sequential in file order.
    bounds = np.linspace(0, len(files), shards + 1).round().astype(int)
    staging = dst.rstrip("/") + f".partial-{os.getpid()}"
    os.makedirs(staging, exist_ok=False)
    try:
        with tqdm(total=len(files), desc=f"packing {src}", unit="img") as bar:
            for s, name in enumerate(names):
                writer = ArrayRecordWriter(os.path.join(staging, name), "group_size:1")
                for i in range(bounds[s], bounds[s + 1]):
                    writer.write(encode_record(int(files.labels[i]),
                                               _encoded(files.paths[i], size, crop, quality)))
                    bar.update(1)
                writer.close()
        index = {
            "format_version": FORMAT_VERSION,
            "source": os.path.abspath(src),
            "names": list(files.names),
            "counts": np.bincount(files.labels, minlength=len(files.names)).tolist(),
            "num_records": len(files),
            "shards": names,
            "image_size": size,
            "crop_fraction": crop if size else None,
            "skipped": list(files.skipped),
        }
        with open(os.path.join(staging, INDEX), "w") as f:
            json.dump(index, f, indent=1)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.replace(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return index


def main(argv):
    if len(argv) != 3:
        raise app.UsageError("usage: python -m jfacerec.data.pack SRC DST [options]")
    f = flags.FLAGS
    start = time.time()
    with cli.exit_on_user_error(output=argv[2]):
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
    cli.strict_flag()
    cli.run(main)
