"""python -m jfacerec.evaluation.orl --config configs/orl.py --workdir W [--splits 10] [--noopen_set]

The AT&T/ORL protocol, with an eigenfaces baseline (PCA + nearest neighbour, NumPy) computed on
the same images in the same run:
- closed set: for each random split, `train_images` images of each of the 40 subjects train and
  the rest are classified (W/closed_XX); mean +- std over splits. The same model answers twice:
  by its classification head ("cnn") and by the nearest subject's mean training embedding, as
  the open set matches ("cnn_templates");
- open set: 30 known subjects (their training images enrolled as the gallery), 10 unknown; every
  other image is a query, answered with a known subject or "unknown" (W/open_XX). The unknown
  threshold of each split is chosen on the other splits (on the split itself, flagged, when only
  one is run).
  With `eval.wccn` (a shrinkage; 0: off) the gallery and the queries are whitened by the
  within-person covariance of the enrolled images (inference/wccn.py) before they are matched.
With `dataset.validation_images=K`, every split tests on K held-out training images per subject
instead of its test images, so that settings (and the closed set's answer, head or templates)
are chosen without the test images; --noopen_set runs the closed set only.
Writes W/orl_results.json.
"""

from __future__ import annotations

import copy
import json

import numpy as np
from absl import flags

from jfacerec import metrics
from jfacerec.evaluation import protocols
from jfacerec.inference.recognizer import FaceRecognizer, load
from jfacerec.core import cli, storage
from jfacerec.core.atomic import atomic_open
from jfacerec.data import sources
from jfacerec.data.records import ImageFileSource
from jfacerec.data.folders import ImageFiles
from jfacerec.inference.gallery import Match, from_embeddings


def grey_pixels(source: ImageFileSource) -> np.ndarray:
    """float64 [n, size*size]: the source's faces in grey, as eigenfaces sees them."""
    images = np.stack([source[i]["image"] for i in range(len(source))]).astype(np.float64)
    return (images @ np.array([0.299, 0.587, 0.114])).reshape(len(images), -1)


def eigenfaces(train: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean [p], basis [p, k]): PCA of training images [n, p]."""
    mean = train.mean(axis=0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    return mean, vt[:components].T


def nearest(gallery: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index [q], negative Euclidean distance [q]) of each query's nearest gallery row."""
    d = np.linalg.norm(queries[:, None, :] - gallery[None, :, :], axis=-1)
    best = np.argmin(d, axis=1)
    return best, -d[np.arange(len(queries)), best]


def nearest_templates(recognizer: FaceRecognizer, enrolled: ImageFiles, queries: list[str],
                      wccn: float) -> list[Match]:
    """The best match of each query image file among the enrolled subjects' mean embeddings
    (after WCCN fitted on the enrolled faces when `wccn` > 0), with no unknown threshold."""
    known = recognizer.embed_files(list(enrolled.paths), desc="enroll")
    gallery = from_embeddings(recognizer, enrolled, known, wccn=wccn)
    return gallery.identify(recognizer.embed_files(queries), k=1, threshold=-np.inf)


def closed_set_split(config, workdir: str, split: int) -> dict[str, float]:
    from jfacerec.training import train

    c = copy.deepcopy(config)
    c.dataset.split, c.dataset.known_identities = split, 40
    data = sources.get_dataset(c)
    run_dir = storage.join(workdir, f"closed_{split:02d}")
    train(c, run_dir)
    test_names = [data.test.files.names[label] for label in data.test.labels()]
    recognizer = load(run_dir)
    predicted = recognizer.classify_files(list(data.test.files.paths))
    # the same model answering as the open set does
    matches = nearest_templates(recognizer, data.train.files, list(data.test.files.paths),
                                float(config.eval.wccn))
    train_x, test_x = grey_pixels(data.train), grey_pixels(data.test)
    mean, basis = eigenfaces(train_x, config.eigenfaces.components)
    best, _ = nearest((train_x - mean) @ basis, (test_x - mean) @ basis)
    return {"cnn": float(np.mean([p == t for p, t in zip(predicted, test_names)])),
            "cnn_templates": float(np.mean([m.name == t for m, t in zip(matches, test_names)])),
            "eigenfaces": float(np.mean(data.train.labels()[best] == data.test.labels()))}


def open_set_split(config, workdir: str, split: int) -> dict[str, tuple[np.ndarray, ...]]:
    """Per method: (best scores [q], best labels [q], true labels [q], -1 = unknown)."""
    from jfacerec.training import train

    c = copy.deepcopy(config)
    c.dataset.split, c.dataset.known_identities = split, config.dataset.open_set_known
    data = sources.get_dataset(c)
    run_dir = storage.join(workdir, f"open_{split:02d}")
    train(c, run_dir)
    matches = nearest_templates(load(run_dir), data.train.files,
                                list(data.test.files.paths) + list(data.unseen.files.paths),
                                float(config.eval.wccn))
    known_names = list(data.train.files.names)
    truth = np.r_[data.test.labels(), np.full(len(data.unseen), -1)]
    cnn = (np.array([m.score for m in matches]),
           np.array([known_names.index(m.name) for m in matches]), truth)
    train_x = grey_pixels(data.train)
    query_x = np.concatenate([grey_pixels(data.test), grey_pixels(data.unseen)])
    mean, basis = eigenfaces(train_x, config.eigenfaces.components)
    best, score = nearest((train_x - mean) @ basis, (query_x - mean) @ basis)
    return {"cnn": cnn, "eigenfaces": (score, data.train.labels()[best], truth)}


def open_set_accuracies(per_split: list[tuple[np.ndarray, ...]]) -> list[float]:
    choose = lambda s, b, t: metrics.best_open_set_threshold(s, b, t)[0]  # noqa: E731
    thresholds = (protocols.thresholds_from_other_folds(per_split, choose) if len(per_split) > 1
                  else [choose(*per_split[0])])
    return [metrics.open_set_accuracy(s, b, t, th) for (s, b, t), th in zip(per_split, thresholds)]


def run(config, workdir: str, splits: int, open_set: bool = True) -> dict:
    closed = [closed_set_split(config, workdir, s) for s in range(splits)]
    opened = [open_set_split(config, workdir, s) for s in range(splits)] if open_set else []
    results: dict = {"splits": splits, "flip_averaged": bool(config.eval.flip),
                     "validation_images": int(config.dataset.validation_images)}
    if open_set:
        results["open_set_threshold"] = ("chosen on the other splits" if splits > 1
                                         else "chosen on the same split (optimistic)")
    for method in ("cnn", "cnn_templates", "eigenfaces"):
        c = [r[method] for r in closed]
        results[method] = {"closed_set_accuracy": c, "closed_set_mean": float(np.mean(c)),
                           "closed_set_std": float(np.std(c))}
        if open_set and method != "cnn_templates":
            o = open_set_accuracies([r[method] for r in opened])
            results[method].update(open_set_accuracy=o, open_set_mean=float(np.mean(o)),
                                   open_set_std=float(np.std(o)))
    with atomic_open(storage.join(workdir, "orl_results.json")) as f:
        json.dump(results, f, indent=2)
    return results


def main(argv):
    del argv
    f = flags.FLAGS
    with cli.exit_on_user_error(output=f.workdir):
        results = run(cli.config_from_flags(), f.workdir, f.splits, f.open_set)
    for method in ("cnn", "cnn_templates", "eigenfaces"):
        r = results[method]
        line = (f"{method:<13} closed set {r['closed_set_mean']:.4f} +- "
                f"{r['closed_set_std']:.4f}")
        if "open_set_mean" in r:
            line += f"   open set {r['open_set_mean']:.4f} +- {r['open_set_std']:.4f}"
        print(line)
    tested = (f"{results['validation_images']} held-out training images per subject"
              if results["validation_images"] else "the test images")
    threshold = (f"; open-set threshold {results['open_set_threshold']}"
                 if "open_set_threshold" in results else "")
    print(f"({results['splits']} splits on {tested}{threshold}); "
          f"wrote {storage.join(f.workdir, 'orl_results.json')}")


if __name__ == "__main__":
    cli.config_and_workdir_flags("ORL config (configs/orl.py).",
                                 "Where the models and results go.")
    flags.DEFINE_integer("splits", 10, "Number of random splits.")
    flags.DEFINE_bool("open_set", True, "Also run the open-set splits (--noopen_set: closed only).")
    cli.run(main)
