"""The HW2P2 course's submission CSVs and dev report from a trained workdir: the library behind
`python -m jfacerec.predict`, whose docstring gives the layout read and the files written."""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from jfacerec import metrics
from jfacerec.core import storage
from jfacerec.core.atomic import atomic_open
from jfacerec.data.folders import scan_flat_folder, scan_identity_folders
from jfacerec.data.sources import Hw2p2Layout, read_id_label_csv
from jfacerec.inference.gallery import UNKNOWN, enroll
from jfacerec.inference.recognizer import FaceRecognizer, load


def write_csv(path: str, rows: list[tuple[str, str]]) -> None:
    with atomic_open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["id", "label"])
        out.writerows(rows)


def classification_rows(recognizer: FaceRecognizer, folder: str, *,
                        strict: bool) -> list[tuple[str, str]]:
    """(file name, predicted training identity) for each image of a flat folder."""
    files = scan_flat_folder(storage.absolute(folder), strict=strict)
    names = recognizer.classify_files(list(files.paths))
    return [(os.path.basename(p), n) for p, n in zip(files.paths, names)]


def classification_dev_accuracy(recognizer: FaceRecognizer, folder: str, *,
                                strict: bool) -> float:
    files = scan_identity_folders(storage.absolute(folder), strict=strict)
    predicted = recognizer.classify_files(list(files.paths))
    truth = [files.names[c] for c in files.labels]
    return float(np.mean([p == t for p, t in zip(predicted, truth)]))


def best_known_matches(recognizer: FaceRecognizer, gallery, folder: str, *,
                       strict: bool) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(file names, best scores [n], best gallery rows [n]) of a flat query folder."""
    files = scan_flat_folder(storage.absolute(folder), strict=strict)
    matches = gallery.identify(recognizer.embed_files(list(files.paths), desc=folder), k=1,
                               threshold=-np.inf)
    ids = [os.path.basename(p) for p in files.paths]
    return ids, np.array([m.score for m in matches]), np.array([m.name for m in matches])


def calibrate(scores: np.ndarray, best: np.ndarray, ids: list[str],
              truth: dict[str, str]) -> tuple[float, float]:
    """(threshold, dev accuracy at it): the unknown threshold that maximises accuracy."""
    missing = [i for i in ids if i not in truth]
    if missing:
        raise ValueError(f"dev_identities.csv has no label for {missing[:3]} "
                         f"({len(missing)} queries)")
    names = sorted(set(best.tolist()) | {truth[i] for i in ids} - {UNKNOWN})
    index = {n: k for k, n in enumerate(names)}
    code = lambda name: -1 if name == UNKNOWN else index[name]  # noqa: E731
    return metrics.best_open_set_threshold(scores, [code(n) for n in best],
                                           [code(truth[i]) for i in ids])


def check_layout(layout: Hw2p2Layout, split: str) -> None:
    """Raises FileNotFoundError naming what `predict` needs and `layout.root` lacks, before a
    model is loaded: classification/test/ (for classification.csv) or verification/known/ (for
    verification.csv, which then needs unknown_dev/, dev_identities.csv and unknown_<split>/)."""
    where = f"{layout.root} is not the HW2P2 layout"
    if not storage.isdir(layout.root):
        raise FileNotFoundError(f"{layout.root}: no such folder; --data is the HW2P2 root")
    if not storage.isdir(layout.test) and not storage.isdir(layout.known):
        raise FileNotFoundError(f"{where}: it has neither classification/test/ nor "
                                f"verification/known/; --data is the folder holding both")
    needed = [layout.unknown("dev"), layout.dev_identities, layout.unknown(split)]
    if storage.isdir(layout.known) and (missing := [os.path.relpath(p, layout.root) for p in needed
                                                    if not storage.exists(p)]):
        raise FileNotFoundError(f"{where}: verification/known/ is there but not "
                                f"{', '.join(missing)}, which verification.csv needs")


def predict(workdir: str, data: str, out: str, *, split: str = "test",
            strict: bool = False) -> dict[str, float]:
    """Writes the submission CSVs under `out`; returns the dev figures."""
    layout = Hw2p2Layout(data)
    check_layout(layout, split)
    recognizer = load(workdir)
    report: dict[str, float] = {"step": recognizer.step, "flip_averaged": recognizer.flip}
    storage.makedirs(out)
    if storage.isdir(layout.dev):
        report["classification/dev_top1"] = classification_dev_accuracy(recognizer, layout.dev,
                                                                         strict=strict)
    if storage.isdir(layout.test):
        write_csv(storage.join(out, "classification.csv"),
                  classification_rows(recognizer, layout.test, strict=strict))
    if storage.isdir(layout.known):
        gallery = enroll(recognizer, scan_identity_folders(storage.absolute(layout.known),
                                                           strict=strict))
        ids, scores, best = best_known_matches(recognizer, gallery, layout.unknown("dev"),
                                               strict=strict)
        threshold, accuracy = calibrate(scores, best, ids,
                                        read_id_label_csv(layout.dev_identities))
        report.update({"verification/threshold": threshold, "verification/dev_accuracy": accuracy})
        if split != "dev":
            ids, scores, best = best_known_matches(recognizer, gallery, layout.unknown(split),
                                                   strict=strict)
        labels = np.where(scores >= threshold, best, UNKNOWN)
        write_csv(storage.join(out, "verification.csv"), list(zip(ids, labels.tolist())))
    with atomic_open(storage.join(out, "report.json")) as f:
        json.dump(report, f, indent=2, sort_keys=True)
    return report
