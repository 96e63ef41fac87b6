"""Closed-set, verification and open-set metrics, computed on the host with NumPy.

Conventions: `scores` are similarities (higher means "same person"), `same` is a boolean array of
the same shape saying whether each pair really is one person.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of rows whose label is among the k largest logits. logits [n, c], labels [n]."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    k = min(k, logits.shape[-1])
    top = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=-1)))


def _check_pairs(scores, same) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, np.float64).reshape(-1)
    same = np.asarray(same, bool).reshape(-1)
    if scores.shape != same.shape:
        raise ValueError(f"scores {scores.shape} and same {same.shape} differ in shape")
    if same.all() or not same.any():
        raise ValueError("verification metrics need both matched and mismatched pairs")
    return scores, same


class RocCurve(NamedTuple):
    """False and true positive rates when accepting every score >= threshold, thresholds falling."""
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def roc_curve(scores, same) -> RocCurve:
    """The ROC curve, one point per distinct score plus the origin."""
    scores, same = _check_pairs(scores, same)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], same[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[last_of_value]
    fps = (last_of_value + 1) - tps
    tpr = np.r_[0.0, tps / same.sum()]
    fpr = np.r_[0.0, fps / (~same).sum()]
    return RocCurve(fpr, tpr, np.r_[np.inf, s[last_of_value]])


def roc_auc(scores, same) -> float:
    """Area under the ROC curve (trapezoids, so ties count one half)."""
    fpr, tpr, _ = roc_curve(scores, same)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def eer(scores, same) -> float:
    """Equal error rate: where the false accept rate equals the false reject rate (interpolated)."""
    fpr, tpr, _ = roc_curve(scores, same)
    fnr = 1.0 - tpr
    diff = fpr - fnr  # rises from -1 to +1 along the curve
    i = int(np.argmax(diff >= 0))
    if i == 0:
        return float(fpr[0])
    # Linear interpolation between the two points that straddle fpr == fnr.
    t = -diff[i - 1] / (diff[i] - diff[i - 1])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def tar_at_far(scores, same, far: float) -> float:
    """True accept rate at the strictest threshold whose false accept rate is at most `far`."""
    fpr, tpr, _ = roc_curve(scores, same)
    return float(tpr[fpr <= far + 1e-12].max())


def best_threshold(scores, same) -> tuple[float, float]:
    """The threshold maximising pair accuracy (accept score >= t), and that accuracy."""
    scores, same = _check_pairs(scores, same)
    fpr, tpr, thresholds = roc_curve(scores, same)
    n_pos, n_neg = same.sum(), (~same).sum()
    acc = (tpr * n_pos + (1.0 - fpr) * n_neg) / len(scores)
    i = int(np.argmax(acc))
    if i == 0:
        return float(thresholds[1] + 1e-6), float(acc[0])
    # Midway between this score and the next lower one generalises better than the score itself.
    lower = thresholds[i + 1] if i + 1 < len(thresholds) else thresholds[i] - 1e-6
    return float((thresholds[i] + lower) / 2.0), float(acc[i])


class KFoldResult(NamedTuple):
    mean: float
    std: float
    fold_accuracies: np.ndarray  # [folds]
    thresholds: np.ndarray  # [folds], each chosen on the other folds


def kfold_accuracy(scores, same, folds: int | np.ndarray = 10) -> KFoldResult:
    """LFW-style k-fold verification accuracy.

    For each fold, the threshold maximising accuracy on the other folds is applied to that fold.
    `folds` is either a number of folds (pairs are dealt out in order, pair i to fold
    i * folds // n, like LFW's contiguous folds) or an int array [n] giving each pair's fold
    (`stratified_folds` for a file that lists its pairs by kind).
    """
    scores, same = _check_pairs(scores, same)
    if np.isscalar(folds):
        n_folds = int(folds)
        if not 2 <= n_folds <= len(scores):
            raise ValueError(f"folds must be in [2, {len(scores)}], got {n_folds}")
        fold_of = np.arange(len(scores)) * n_folds // len(scores)
    else:
        fold_of = np.asarray(folds).reshape(-1)
        if fold_of.shape != scores.shape:
            raise ValueError("a fold index is needed for every pair")
    accs, thresholds = [], []
    for f in np.unique(fold_of):
        test = fold_of == f
        t, _ = best_threshold(scores[~test], same[~test])
        accs.append(np.mean((scores[test] >= t) == same[test]))
        thresholds.append(t)
    accs = np.array(accs)
    return KFoldResult(float(accs.mean()), float(accs.std()), accs, np.array(thresholds))


def stratified_folds(same, folds: int = 10) -> np.ndarray:
    """Each pair's fold [n]: fold b takes the b-th of `folds` consecutive blocks of the matched
    pairs and the b-th of the mismatched ones, in the order given.

    Every fold then holds both kinds in the file's proportion, as LFW View 2's folds do, even
    when a file lists all its matched pairs first (View 1's pairsDevTest.txt): contiguous folds
    of such a file hold one kind each, and a threshold fitted on nine folds where the other kind
    is the majority biases the accuracy low.
    """
    same = np.asarray(same, bool).reshape(-1)
    fold_of = np.empty(same.shape, np.int64)
    for kind in (True, False):
        count = int(np.sum(same == kind))
        fold_of[same == kind] = np.arange(count) * folds // max(count, 1)
    return fold_of


def open_set_accuracy(best_scores, best_labels, true_labels, threshold: float,
                      unknown_label: int = -1) -> float:
    """Open-set identification accuracy.

    A query is answered with its best gallery match when the score reaches `threshold`, else with
    "unknown". It is right when that answer equals its true label (`unknown_label` for people not in
    the gallery).
    """
    best_scores = np.asarray(best_scores).reshape(-1)
    answer = np.where(best_scores >= threshold, np.asarray(best_labels).reshape(-1), unknown_label)
    return float(np.mean(answer == np.asarray(true_labels).reshape(-1)))


def best_open_set_threshold(best_scores, best_labels, true_labels,
                            unknown_label: int = -1) -> tuple[float, float]:
    """The threshold maximising open-set accuracy on a validation split, and that accuracy."""
    best_scores = np.asarray(best_scores, np.float64).reshape(-1)
    best_labels = np.asarray(best_labels).reshape(-1)
    true_labels = np.asarray(true_labels).reshape(-1)
    order = np.argsort(-best_scores, kind="stable")
    s = best_scores[order]
    # With threshold just below s[i], queries 0..i are answered by their match, the rest "unknown".
    match_right = np.cumsum((best_labels == true_labels)[order])
    unknown_right = np.cumsum((true_labels == unknown_label)[order][::-1])[::-1]
    unknown_right = np.r_[unknown_right[1:], 0]
    acc = (match_right + unknown_right) / len(s)
    reject_all = float(np.mean(true_labels == unknown_label))
    # Only cut between distinct scores, so that equal scores get the same answer.
    valid = np.r_[s[1:] < s[:-1], True]
    acc = np.where(valid, acc, -1.0)
    i = int(np.argmax(acc))
    if reject_all >= acc[i]:
        return float(s[0] + 1e-6), reject_all
    below = s[i + 1] if i + 1 < len(s) else s[i] - 1e-6
    return float((s[i] + below) / 2.0), float(acc[i])
