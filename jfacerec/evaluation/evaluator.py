"""Evaluation of a trained workdir (`python -m jfacerec.evaluate`).

`evaluate(config, workdir)` restores the newest checkpoint and measures both jobs of the model:
- classification (closed set): top-1 / top-5 on held-out images of the training identities;
- verification on identities never trained on: pair ROC AUC, EER, 10-fold accuracy, TAR@FAR,
  and open-set identification against a gallery, "unknown" below a threshold chosen on a disjoint
  validation split;
- with `.bin` verification sets (lfw.bin, cfp_fp.bin ...), arcface_torch's figures on each
  (jfacerec/evaluation/bin_sets.py) under `bin/<set>/...`, and their ROC curves in eval/roc_bin.png.
Writes WORKDIR/eval/metrics.json, roc.png and scores.png (names in jfacerec/core/workdir.py).
"""

from __future__ import annotations

import sys
from typing import Sequence

import jax
import ml_collections
import numpy as np

from jfacerec import metrics
from jfacerec.core import storage
from jfacerec.core import workdir as workdir_files
from jfacerec.data import sources
from jfacerec.data.bin import read_bin
from jfacerec.data.pipeline import eval_batches
from jfacerec.data.records import Source
from jfacerec.evaluation import bin_sets as bins
from jfacerec.evaluation import plots, protocols
from jfacerec.inference import matcher
from jfacerec.inference.restore import make_embed_fn, make_logits_fn, restore, run_over


def verification_metrics(scores: np.ndarray, same: np.ndarray, folds: int) -> dict[str, float]:
    kfold = metrics.kfold_accuracy(scores, same, folds)
    return {
        "verification/auc": metrics.roc_auc(scores, same),
        "verification/eer": metrics.eer(scores, same),
        "verification/accuracy": kfold.mean,
        "verification/accuracy_std": kfold.std,
        "verification/tar@far=1e-2": metrics.tar_at_far(scores, same, 1e-2),
        "verification/tar@far=1e-3": metrics.tar_at_far(scores, same, 1e-3),
    }


def open_set_metrics(embeddings: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, float]:
    """Threshold chosen on the validation half, accuracy measured on the test half."""
    val, test = protocols.open_set_splits(labels, seed=seed)

    def best_matches(split):
        scores, idx = matcher.top_k_cosine(embeddings[split.queries], embeddings[split.gallery], k=1)
        return scores[:, 0], split.gallery_labels[idx[:, 0]]

    v_scores, v_labels = best_matches(val)
    threshold, _ = metrics.best_open_set_threshold(v_scores, v_labels, val.query_labels)
    t_scores, t_labels = best_matches(test)
    known = test.query_labels != -1
    answer = np.where(t_scores >= threshold, t_labels, -1)
    return {
        "openset/accuracy": metrics.open_set_accuracy(t_scores, t_labels, test.query_labels,
                                                      threshold),
        "openset/threshold": threshold,
        "openset/known_identified": float(np.mean(answer[known] == test.query_labels[known])),
        "openset/unknown_rejected": float(np.mean(answer[~known] == -1)),
        "openset/rank1": float(np.mean(t_labels[known] == test.query_labels[known])),
    }


def pixel_embeddings(source: Source, image_size: int) -> np.ndarray:
    """Raw pixels as embeddings: the no-learning baseline. float32 [n, size*size*3]."""
    return np.concatenate([b["image"].reshape(len(b["image"]), -1) + 1.0  # back to >= 0
                           for b in eval_batches(source, batch_size=256, image_size=image_size)])


def cosine_of_pairs(embeddings: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    a, b = embeddings[first], embeddings[second]
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)



def evaluate(config: ml_collections.ConfigDict, workdir: str,
             bin_paths: Sequence[str] = ()) -> dict[str, float]:
    """Runs every evaluation that the dataset supports, and the .bin sets at `bin_paths`;
    returns the flat metrics dict."""
    bin_data = [read_bin(p) for p in bin_paths]  # a bad file fails before any work
    bins.check_names(bin_data)
    dataset = sources.get_dataset(config)
    # A converted model (python -m jfacerec.convert) carries a head of its own class count:
    # its embeddings are evaluated, its classes are not the dataset's.
    restored = restore(config, workdir)
    classes = restored.model.num_classes
    storage.makedirs(workdir_files.path(workdir, workdir_files.EVAL))
    variables = restored.variables
    run = dict(batch_size=config.eval.batch_size, image_size=config.image_size,
               mesh=restored.mesh)
    results: dict[str, float] = {
        "step": restored.step,
        "num_parameters": int(sum(x.size for x in jax.tree.leaves(variables["params"]))),
        "flip_averaged": bool(config.eval.flip),
    }

    if dataset.test is not None and classes != dataset.num_classes:
        print(f"classification skipped: the model's head has {classes} classes, "
              f"{config.dataset.name} has {dataset.num_classes}", file=sys.stderr)
    elif dataset.test is not None:
        logits_fn = make_logits_fn(restored.model, flip=config.eval.flip)
        logits, labels = run_over(logits_fn, variables, dataset.test, desc="classification", **run)
        results["classification/top1"] = metrics.top_k_accuracy(logits, labels, 1)
        results["classification/top5"] = metrics.top_k_accuracy(logits, labels, 5)

    if dataset.unseen is not None:
        embeddings, labels = run_over(make_embed_fn(restored.model, flip=config.eval.flip),
                                      variables, dataset.unseen, desc="verification", **run)
        first, second, same = protocols.make_pairs(labels, config.eval.num_pairs, seed=config.seed)
        scores = cosine_of_pairs(embeddings, first, second)
        results.update(verification_metrics(scores, same, config.eval.folds))
        pixels = pixel_embeddings(dataset.unseen, config.image_size)
        pixel_scores = cosine_of_pairs(pixels, first, second)
        results["baseline/pixel_auc"] = metrics.roc_auc(pixel_scores, same)
        results.update(open_set_metrics(embeddings, labels, config.seed))
        threshold, _ = metrics.best_threshold(scores, same)
        results["verification/threshold"] = threshold
        plots.roc_plot(workdir_files.path(workdir, workdir_files.ROC_PLOT),
                        {config.model.name: (scores, same), "raw pixels": (pixel_scores, same)})
        plots.score_histogram(workdir_files.path(workdir, workdir_files.SCORES_PLOT), scores, same,
                              threshold)

    if bin_data:
        bin_results, curves = bins.evaluate_bins(
            restored, bin_data, image_size=config.image_size, batch_size=config.eval.batch_size,
            flip=config.eval.flip, folds=config.eval.folds)
        results.update(bin_results)
        if jax.process_index() == 0:
            plots.roc_plot(workdir_files.path(workdir, workdir_files.ROC_BIN_PLOT), curves)

    if jax.process_index() == 0:
        workdir_files.write_eval_metrics(results, workdir)
        plots.training_curves(workdir)
    return results


def format_table(results: dict[str, float]) -> str:
    width = max(len(k) for k in results)
    rows = [f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
            for k, v in sorted(results.items())]
    return "\n".join(rows)
