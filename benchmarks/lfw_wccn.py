"""How much WCCN's shrinkage lifts the LFW protocol's figures: trained workdirs rescored.

python benchmarks/lfw_wccn.py W1 [W2 ...] [--shrinkage 0.1,0.2,0.3]

Each W is a workdir of the LFW protocol (`python -m jfacerec.evaluation.lfw`; its fold_00 is
used, with the pairs file and fold its config.json names: choose on pairsDevTrain.txt, never on
the pairs you report). Its model embeds the fold's pairs and its own training faces once; then
WCCN (jfacerec.inference.wccn) is fitted on the training faces at each shrinkage and the pairs
are scored as the protocol scores them (10-fold accuracy on stratified tenths, AUC, TAR@FAR).
Prints a table per workdir, then each shrinkage's mean change over the workdirs against the
plain cosine. Last line: JSON with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jfacerec.core import workdir as workdir_files  # noqa: E402
from jfacerec.data.pairs import pair_images, read_lfw_pairs  # noqa: E402
from jfacerec.evaluation import lfw  # noqa: E402
from jfacerec.inference import wccn  # noqa: E402
from jfacerec.inference.recognizer import load  # noqa: E402

FIGURES = ("accuracy", "auc", "tar@far=1e-3")


def figures(embeddings: np.ndarray, first: np.ndarray, second: np.ndarray, same: np.ndarray
            ) -> dict[str, float]:
    """The protocol's figures of the cosines of unit embeddings [n, dim] paired by first and
    second [pairs] with truths same [pairs]."""
    scores = np.sum(embeddings[first] * embeddings[second], axis=-1)
    protocol = lfw.summary([0], [scores], [same])
    return {"accuracy": protocol["accuracy_mean"], "auc": protocol["auc"],
            "tar@far=1e-3": protocol["tar@far=1e-3"]}


def rescore(workdir: str, shrinkages: list[float]) -> dict[str, dict[str, float]]:
    """{"cosine" or str(shrinkage): figures} of workdir's fold_00 model."""
    fold_dir = os.path.join(workdir, "fold_00")
    config = workdir_files.read_config(fold_dir)
    pairs = read_lfw_pairs(config.dataset.pairs)[config.dataset.fold]
    same = np.array([p.same for p in pairs])
    unique, first, second = pair_images(pairs, config.dataset.root)
    recognizer = load(fold_dir)
    embeddings = recognizer.embed_files(unique, desc="pairs")
    training, labels = lfw.training_embeddings(config, recognizer)
    rows = {"cosine": figures(embeddings, first, second, same)}
    for shrinkage in shrinkages:
        whitening = wccn.fit(training, labels, shrinkage)
        rows[str(shrinkage)] = figures(wccn.apply(whitening, embeddings), first, second, same)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--shrinkage", default="0.1,0.15,0.2,0.25,0.3")
    args = parser.parse_args()
    shrinkages = [float(s) for s in args.shrinkage.split(",")]
    results = {w: rescore(w, shrinkages) for w in args.workdirs}
    for workdir, rows in results.items():
        print(f"\n{workdir} ({' / '.join(FIGURES)})")
        for name, row in rows.items():
            print(f"  {name:>8}: " + " / ".join(f"{row[k]:.4f}" for k in FIGURES))
    mean_change = {
        str(s): {k: float(np.mean([rows[str(s)][k] - rows["cosine"][k]
                                   for rows in results.values()])) for k in FIGURES}
        for s in shrinkages}
    print(f"\nmean change against the cosine over {len(results)} workdir(s):")
    for name, change in mean_change.items():
        print(f"  {name:>8}: " + " / ".join(f"{change[k]:+.4f}" for k in FIGURES))
    print(json.dumps({"workdirs": results, "mean_change": mean_change}))


if __name__ == "__main__":
    main()
