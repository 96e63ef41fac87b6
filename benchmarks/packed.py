"""ArrayRecord packs against the identity-folder tree: how fast are records read back?

python benchmarks/packed.py [--data $JFACEREC_DATA/lfw/lfw-deepfunneled] [--records 3000]

Packs the tree twice into a temporary folder (original JPEG bytes; and faces cropped to 0.5 and
stored at 112 pixels, as `--size 112 --crop 0.5`), then reads the same random records from each,
interleaving the sides, in two ways: raw bytes (what the storage layer costs: one open/read/close
per file against one ArrayRecord read, and against one read of 128 records) and decoded 64-pixel
faces (what training sees). Every
figure is the median of `--repeats` passes over a warm page cache.

Last line: JSON with records/s of each side and the ratios packed / folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jfacerec.data import pack  # noqa: E402
from jfacerec.data.folders import scan_identity_folders  # noqa: E402
from jfacerec.data.records import ArrayRecordSource, ImageFileSource  # noqa: E402


def median_rate(fn, n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n / float(np.median(times))


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def main():
    parser = argparse.ArgumentParser()
    default = os.path.join(os.environ.get("JFACEREC_DATA", "../shared/data"), "lfw",
                           "lfw-deepfunneled")
    parser.add_argument("--data", default=default)
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    files = scan_identity_folders(os.path.abspath(args.data))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        pack.pack(args.data, os.path.join(tmp, "original"))
        pack_seconds = time.perf_counter() - start
        pack.pack(args.data, os.path.join(tmp, "small"), size=112, crop=0.5)
        idx = np.random.default_rng(0).choice(len(files), min(args.records, len(files)),
                                              replace=False)
        original = ArrayRecordSource(os.path.join(tmp, "original"), size=args.size,
                                     crop_fraction=0.5)
        small = ArrayRecordSource(os.path.join(tmp, "small"), size=args.size)
        folder = ImageFileSource(files, size=args.size, crop_fraction=0.5)
        n = len(idx)
        # Warm the page cache for both sides first: the comparison is of the read path.
        [read_file(files.paths[i]) for i in idx]
        [original.records[int(i)] for i in idx]
        rates = {
            "bytes/folder": median_rate(lambda: [read_file(files.paths[i]) for i in idx], n,
                                        args.repeats),
            "bytes/arrayrecord": median_rate(lambda: [original.records[int(i)] for i in idx], n,
                                             args.repeats),
            # A training batch's records in one call: the reader fetches them in parallel.
            "bytes/arrayrecord_batched": median_rate(
                lambda: [original.records.__getitems__([int(i) for i in idx[b:b + 128]])
                         for b in range(0, n, 128)], n, args.repeats),
            "faces/folder": median_rate(lambda: [folder[i] for i in idx], n, args.repeats),
            "faces/arrayrecord": median_rate(lambda: [original[i] for i in idx], n, args.repeats),
            "faces/arrayrecord_112": median_rate(lambda: [small[i] for i in idx], n,
                                                 args.repeats),
        }
    ratios = {
        "bytes arrayrecord/folder": rates["bytes/arrayrecord"] / rates["bytes/folder"],
        "bytes arrayrecord_batched/folder": (rates["bytes/arrayrecord_batched"]
                                             / rates["bytes/folder"]),
        "faces arrayrecord/folder": rates["faces/arrayrecord"] / rates["faces/folder"],
        "faces arrayrecord_112/folder": rates["faces/arrayrecord_112"] / rates["faces/folder"],
    }
    for key, value in rates.items():
        print(f"{key:<24} {value:10.0f} records/s")
    for key, value in ratios.items():
        print(f"{key:<30} {value:6.2f}x")
    print(json.dumps({"records": n, "files": len(files), "pack_seconds": pack_seconds,
                      "rates": rates, "ratios": ratios, "cpus": os.cpu_count(),
                      "machine": platform.platform(), "date": time.strftime("%Y-%m-%d")}))


if __name__ == "__main__":
    main()
