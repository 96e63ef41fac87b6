"""RecordIO packs read directly against ArrayRecord packs and a folder of JPEG files.

python benchmarks/recordio.py [--data $JFACEREC_DATA/lfw/lfw-deepfunneled] [--images 2000]

Takes `--images` LFW faces (a seeded choice), center-cropped to 0.5 and stored as 112-pixel JPEGs
(insightface's form), and writes the same JPEG bytes three ways into a temporary folder: a
RecordIO pack in insightface's layout (train.rec, train.idx, property; header record 0), an
ArrayRecord pack (`python -m jfacerec.data.pack`) and a folder tree of files. Then reads every image
of each in one shuffled order, the sides interleaved in each of `--repeats` rounds, in two ways:
raw (the encoded bytes: what the storage layer costs) and decoded (uint8 [112, 112, 3], what
training sees). Every figure is the median of the rounds, over a warm page cache.

Last line: JSON with images/s of each side and the ratios RecordIO / ArrayRecord and
RecordIO / folder.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import struct
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jfacerec.data import pack  # noqa: E402
from jfacerec.data.folders import scan_identity_folders  # noqa: E402
from jfacerec.data.images import load_face  # noqa: E402
from jfacerec.data.recordio import RecordIOSource  # noqa: E402
from jfacerec.data.records import ArrayRecordSource, ImageFileSource  # noqa: E402

SIZE = 112
_MAGIC = struct.pack("<I", pack.RECORDIO_MAGIC)


def rec_record(payload: bytes) -> bytes:
    """One record as mxnet writes it: split at every aligned word equal to the magic."""
    cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i:i + 4] == _MAGIC]
    bounds = [0] + [c for cut in cuts for c in (cut, cut + 4)] + [len(payload)]
    parts = [payload[bounds[k]:bounds[k + 1]] for k in range(0, len(bounds), 2)]
    flags = [0] if len(parts) == 1 else [1] + [2] * (len(parts) - 2) + [3]
    return b"".join(_MAGIC + struct.pack("<I", flag << 29 | len(part)) + part
                    + b"\0" * (-len(part) % 4) for flag, part in zip(flags, parts))


def write_recordio(root: str, images: list[bytes], labels: np.ndarray) -> None:
    """insightface's layout: record 0 a header giving the image keys [1, n + 1)."""
    os.makedirs(root)
    entries = [struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", len(images) + 1,
                                                                len(images) + 1)]
    entries += [struct.pack("<IfQQ", 0, float(label), 0, 0) + image
                for label, image in zip(labels, images)]
    offset = 0
    with open(os.path.join(root, "train.rec"), "wb") as rec, \
            open(os.path.join(root, "train.idx"), "w") as idx:
        for key, entry in enumerate(entries):
            record = rec_record(entry)
            rec.write(record)
            idx.write(f"{key}\t{offset}\n")
            offset += len(record)
    with open(os.path.join(root, "property"), "w") as f:
        f.write(f"{int(labels.max()) + 1},{SIZE},{SIZE}")


def faces(data: str, n: int) -> tuple[list[str], list[bytes], np.ndarray]:
    """(identity names, 112-pixel JPEG bytes, labels) of n seeded LFW images, identity by
    identity."""
    files = scan_identity_folders(os.path.abspath(data), check=False)  # load_face checks each
    chosen = np.sort(np.random.default_rng(0).choice(len(files), min(n, len(files)),
                                                     replace=False))
    present, labels = np.unique(files.labels[chosen], return_inverse=True)
    encoded = []
    for i in chosen:
        buffer = io.BytesIO()
        Image.fromarray(load_face(files.paths[i], crop_fraction=0.5, size=SIZE)).save(
            buffer, format="JPEG", quality=95)
        encoded.append(buffer.getvalue())
    return [files.names[c] for c in present], encoded, labels.astype(np.int32)


def write_tree(root: str, names: list[str], images: list[bytes], labels: np.ndarray) -> None:
    for k, (image, label) in enumerate(zip(images, labels)):
        folder = os.path.join(root, names[label])
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{k:05d}.jpg"), "wb") as f:
            f.write(image)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def interleaved_rates(passes: dict, n: int, repeats: int) -> dict[str, float]:
    """Images/s of each pass: the median over `repeats` rounds, each round running every pass."""
    times = {name: [] for name in passes}
    for _ in range(repeats):
        for name, run in passes.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: n / float(np.median(t)) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser()
    default = os.path.join(os.environ.get("JFACEREC_DATA", "../shared/data"), "lfw",
                           "lfw-deepfunneled")
    parser.add_argument("--data", default=default)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    names, images, labels = faces(args.data, args.images)
    n = len(images)
    with tempfile.TemporaryDirectory() as tmp:
        write_recordio(os.path.join(tmp, "rec"), images, labels)
        write_tree(os.path.join(tmp, "tree"), names, images, labels)
        pack.pack(os.path.join(tmp, "tree"), os.path.join(tmp, "ar"))
        start = time.perf_counter()
        recordio = RecordIOSource(pack.open_recordio(os.path.join(tmp, "rec")), size=SIZE)
        open_seconds = time.perf_counter() - start
        arrayrecord = ArrayRecordSource(os.path.join(tmp, "ar"), size=SIZE)
        folder = ImageFileSource(scan_identity_folders(os.path.join(tmp, "tree")), size=SIZE)
        # The same images on every side, in one shuffled order.
        assert recordio.records.image(5) == pack.decode_record(arrayrecord.records[5])[1]
        order = np.random.default_rng(1).permutation(n)
        passes = {
            "raw/recordio": lambda: [recordio.records.image(i) for i in order],
            "raw/arrayrecord": lambda: [pack.decode_record(arrayrecord.records[int(i)])[1]
                                        for i in order],
            "raw/folder": lambda: [read_file(folder.files.paths[i]) for i in order],
            "decoded/recordio": lambda: [recordio[i] for i in order],
            "decoded/arrayrecord": lambda: [arrayrecord[i] for i in order],
            "decoded/folder": lambda: [folder[i] for i in order],
        }
        for run in passes.values():  # warm the page cache and the readers
            run()
        rates = interleaved_rates(passes, n, args.repeats)
    ratios = {f"{kind} recordio/{other}": rates[f"{kind}/recordio"] / rates[f"{kind}/{other}"]
              for kind in ("raw", "decoded") for other in ("arrayrecord", "folder")}
    for key, value in rates.items():
        print(f"{key:<22} {value:10.0f} images/s")
    for key, value in ratios.items():
        print(f"{key:<32} {value:6.2f}x")
    print(f"opening the RecordIO pack (index and every record header): {open_seconds:.3f} s")
    print(json.dumps({"images": n, "identities": len(names), "image_size": SIZE,
                      "repeats": args.repeats, "open_seconds": open_seconds,
                      "images_per_second": rates, "ratios": ratios, "cpus": os.cpu_count(),
                      "machine": platform.platform(), "date": time.strftime("%Y-%m-%d")}))


if __name__ == "__main__":
    main()
