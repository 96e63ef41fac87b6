"""python -m jfacerec.evaluation.lfw --config configs/lfw.py --workdir W [--data DIR]
    [--pairs FILE] [--folds 0,3]

The LFW pairs protocol, unrestricted with labelled outside data drawn from LFW itself: for each
fold of the pairs file, train on every image of the people who do not appear in that fold's pairs
(W/fold_XX, resumable), then score the fold's pairs by the cosine of flip-averaged embeddings.
With `eval.every_steps` and `eval.sets=pairs`, each fold's training also validates on the fold's
pairs (its learning curve, W/fold_XX/validation.png beside training.png); the fold's newest
checkpoint is scored, never the best by validation, which would choose a step on the test pairs.

Accuracy per fold uses a threshold chosen on the other evaluated folds (the standard protocol);
with a single fold (View 1's pairsDevTest.txt, or one View 2 fold) it is chosen by 10-fold
cross-validation within the fold's pairs, each tenth holding a tenth of the matched and of the
mismatched pairs (metrics.stratified_folds: pairsDevTest.txt lists all its matched pairs
first). Also AUC, EER and TAR@FAR over all scored pairs.
With `eval.wccn` (a shrinkage in (0, 1]; 0: off), each fold's pair embeddings are first
whitened by the within-person covariance of that fold's own training faces (inference/wccn.py);
the plain cosine's figures are kept beside them under "without_wccn" (the learning curve is of
the plain cosine).
Writes W/lfw_results.json, W/lfw_roc.png and W/lfw_scores.png.
"""

from __future__ import annotations

import copy
import json
import time

import numpy as np
from absl import app, flags

from jfacerec import metrics
from jfacerec.data.pairs import LfwPair, pair_images, read_lfw_pairs
from jfacerec.data import sources
from jfacerec.evaluation import plots, protocols, validation
from jfacerec.inference import wccn
from jfacerec.inference.recognizer import FaceRecognizer, load
from jfacerec.core import cli, storage
from jfacerec.core.atomic import atomic_open


def _cosines(embeddings: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """[pairs]: the cosine of each pair of unit embeddings [n, dim] (indices [pairs])."""
    return np.sum(embeddings[first] * embeddings[second], axis=-1)


def score_pairs(workdir: str, pairs: list[LfwPair], root: str) -> np.ndarray:
    """Cosine scores [len(pairs)] of the model trained in `workdir`."""
    unique, first, second = pair_images(pairs, root)
    return _cosines(load(workdir).embed_files(unique, desc="pairs"), first, second)


def training_embeddings(config, recognizer: FaceRecognizer) -> tuple[np.ndarray, np.ndarray]:
    """(unit embeddings [n, dim], labels [n]) by `recognizer` of the training faces `config`
    names: what WCCN is fitted on (a fold's own faces, never the pairs it scores)."""
    train = sources.get_dataset(config).train
    embeddings = recognizer.embed_files(list(train.files.paths), desc="training faces")
    return embeddings, train.files.labels


def fold_accuracies(scores: list[np.ndarray], same: list[np.ndarray]
                    ) -> tuple[list[float], list[float], float]:
    """(accuracy and threshold per fold, spread of accuracy), thresholds chosen as the module
    docstring says; with one fold the spread is that of its 10 cross-validation folds."""
    if len(scores) == 1:
        kfold = metrics.kfold_accuracy(scores[0], same[0], metrics.stratified_folds(same[0], 10))
        return [kfold.mean], [float(np.median(kfold.thresholds))], kfold.std
    thresholds = protocols.thresholds_from_other_folds(
        list(zip(scores, same)), lambda s, y: metrics.best_threshold(s, y)[0])
    accuracies = [float(np.mean((s >= t) == y)) for s, y, t in zip(scores, same, thresholds)]
    return accuracies, thresholds, float(np.std(accuracies))


def summary(folds: list[int], scores: list[np.ndarray], same: list[np.ndarray]) -> dict:
    """The protocol's figures of the scores [pairs] and truths [pairs] of each fold in `folds`:
    per fold (accuracy, threshold, AUC) and over all (accuracy mean and spread, AUC, EER, TAR)."""
    accuracies, thresholds, spread = fold_accuracies(scores, same)
    all_scores, all_same = np.concatenate(scores), np.concatenate(same)
    return {
        "per_fold": [{"fold": f, "accuracy": a, "threshold": t, "num_pairs": len(s),
                      "auc": metrics.roc_auc(s, y)}
                     for f, a, t, s, y in zip(folds, accuracies, thresholds, scores, same)],
        "accuracy_mean": float(np.mean(accuracies)),
        "accuracy_std": spread,
        "auc": metrics.roc_auc(all_scores, all_same),
        "eer": metrics.eer(all_scores, all_same),
        "tar@far=1e-2": metrics.tar_at_far(all_scores, all_same, 1e-2),
        "tar@far=1e-3": metrics.tar_at_far(all_scores, all_same, 1e-3),
    }


def run(config, workdir: str, folds: list[int] | None = None) -> dict:
    """Trains and scores the selected folds (all by default); returns the results dict."""
    from jfacerec.training import train  # deferred: after distributed initialisation

    all_folds = read_lfw_pairs(config.dataset.pairs)
    folds = list(range(len(all_folds))) if folds is None else folds
    if bad := [f for f in folds if not 0 <= f < len(all_folds)]:
        raise ValueError(f"{config.dataset.pairs} has {len(all_folds)} folds; no fold {bad}")
    cosines, whitened, same, durations = [], [], [], []
    for fold in folds:
        fold_config = copy.deepcopy(config)
        fold_config.dataset.fold = fold
        fold_dir = storage.join(workdir, f"fold_{fold:02d}")
        start = time.time()
        train(fold_config, fold_dir, validation.from_config(fold_config))
        plots.training_curves(fold_dir)
        pairs = all_folds[fold]
        recognizer = load(fold_dir)
        unique, first, second = pair_images(pairs, config.dataset.root)
        embeddings = recognizer.embed_files(unique, desc="pairs")
        cosines.append(_cosines(embeddings, first, second))
        if config.eval.wccn:
            whitening = wccn.fit(*training_embeddings(fold_config, recognizer),
                                 float(config.eval.wccn))
            whitened.append(_cosines(wccn.apply(whitening, embeddings), first, second))
        same.append(np.array([p.same for p in pairs]))
        durations.append(time.time() - start)
    scores = whitened or cosines
    results = {
        "pairs_file": storage.absolute(config.dataset.pairs),
        "folds": folds,
        "threshold_selection": "10-fold cross-validation within the fold, folds stratified by kind"
                               if len(folds) == 1
                               else "best threshold on the other evaluated folds",
        "flip_averaged": bool(config.eval.flip),
        "wccn": float(config.eval.wccn),
        **summary(folds, scores, same),
    }
    for fold, seconds in zip(results["per_fold"], durations):
        fold["seconds"] = seconds
    if whitened:
        results["without_wccn"] = summary(folds, cosines, same)
    with atomic_open(storage.join(workdir, "lfw_results.json")) as f:
        json.dump(results, f, indent=2)
    all_same = np.concatenate(same)
    curves = {f"{config.model.name}{', WCCN' if whitened else ''} (LFW)":
              (np.concatenate(scores), all_same)}
    if whitened:
        curves[f"{config.model.name}, cosine (LFW)"] = (np.concatenate(cosines), all_same)
    plots.roc_plot(storage.join(workdir, "lfw_roc.png"), curves)
    plots.score_histogram(storage.join(workdir, "lfw_scores.png"), np.concatenate(scores),
                          all_same, float(np.median([f["threshold"] for f in results["per_fold"]])))
    return results


def _figures(r: dict) -> str:
    return (f"{r['accuracy_mean']:.4f} +- {r['accuracy_std']:.4f}, AUC {r['auc']:.4f}, EER "
            f"{r['eer']:.4f}, TAR@FAR=1e-2 {r['tar@far=1e-2']:.4f}, TAR@FAR=1e-3 "
            f"{r['tar@far=1e-3']:.4f}")


def main(argv):
    del argv
    from jfacerec.core import parallel

    parallel.maybe_initialize_distributed()
    f = flags.FLAGS
    config = cli.config_from_flags()
    with config.unlocked():
        if f.data:
            config.dataset.root = f.data
        if f.pairs:
            config.dataset.pairs = f.pairs
    if f.folds and not all(x.strip().isdigit() for x in f.folds.split(",")):
        raise app.UsageError(f"--folds {f.folds}: give fold numbers separated by commas (0,3)")
    folds = [int(x) for x in f.folds.split(",")] if f.folds else None
    with cli.exit_on_user_error(output=f.workdir):
        results = run(config, f.workdir, folds)
    for fold in results["per_fold"]:
        print(f"fold {fold['fold']}: accuracy {fold['accuracy']:.4f} (threshold "
              f"{fold['threshold']:.3f}), AUC {fold['auc']:.4f}")
    print(f"LFW accuracy {_figures(results)} ({results['threshold_selection']}"
          f"{'; WCCN %g' % results['wccn'] if results['wccn'] else ''})")
    if "without_wccn" in results:
        print(f"without WCCN: accuracy {_figures(results['without_wccn'])}")
    print(f"wrote {storage.join(f.workdir, 'lfw_results.json')} and lfw_roc.png")


if __name__ == "__main__":
    cli.config_and_workdir_flags("LFW training config (configs/lfw.py).",
                                 "Where each fold's model and the results go.")
    flags.DEFINE_string("data", None, "LFW image folder (<name>/<name>_NNNN.jpg); default: the "
                        "config's dataset.root.")
    flags.DEFINE_string("pairs", None, "Pairs file (View 1 or View 2); default: the config's.")
    flags.DEFINE_string("folds", None, "Comma-separated folds to run (default: all).")
    cli.run(main)
