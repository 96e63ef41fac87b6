"""Evaluation protocols: verification pairs and the open-set split built from labels, and the
threshold of each fold chosen on the others. (LFW pairs files are read by jfacerec.data.pairs.)"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np


def make_pairs(labels: np.ndarray, num_pairs: int, *, seed: int) -> tuple[np.ndarray, np.ndarray,
                                                                           np.ndarray]:
    """Half matched, half mismatched distinct image pairs drawn from `labels` ([n] ints).

    Returns (first [p], second [p], same bool [p]) with p <= num_pairs (fewer when the labels cannot
    give that many distinct matched pairs).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 7])
    by_label = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    multi = [g for g in by_label if len(g) > 1]
    if not multi or len(by_label) < 2:
        raise ValueError("pairs need an identity with two images and at least two identities")
    max_matched = sum(len(g) * (len(g) - 1) // 2 for g in multi)
    half = min(num_pairs // 2, max_matched)
    matched: set[tuple[int, int]] = set()
    while len(matched) < half:
        g = multi[rng.integers(len(multi))]
        a, b = sorted(rng.choice(g, 2, replace=False))
        matched.add((int(a), int(b)))
    mismatched: set[tuple[int, int]] = set()
    while len(mismatched) < half:
        a, b = rng.integers(len(labels), size=2)
        if labels[a] != labels[b]:
            mismatched.add((int(min(a, b)), int(max(a, b))))
    pairs = sorted(matched) + sorted(mismatched)
    first, second = np.array(pairs, np.int64).T
    same = np.r_[np.ones(half, bool), np.zeros(half, bool)]
    # Deal matched and mismatched pairs evenly over k-fold splits (pair i goes to fold i*k//n).
    order = rng.permutation(len(same))
    return first[order], second[order], same[order]


@dataclasses.dataclass
class OpenSetSplit:
    """Indices into the evaluated images, for one gallery and its queries.

    gallery: one image of each enrolled identity; gallery_labels their identity labels.
    queries: other images of enrolled identities and every image of non-enrolled ones;
    query_labels the true answer, -1 for "unknown".
    """

    gallery: np.ndarray
    gallery_labels: np.ndarray
    queries: np.ndarray
    query_labels: np.ndarray


def open_set_splits(labels: np.ndarray, *, seed: int,
                    known_fraction: float = 0.5) -> tuple[OpenSetSplit, OpenSetSplit]:
    """(validation, test): identity-disjoint open-set problems from one labelled image set.

    Identities are shuffled and halved; in each half a `known_fraction` of identities are enrolled
    with their first image, the others are unknown. The validation half picks the threshold, the
    test half measures it.
    """
    labels = np.asarray(labels)
    ids = np.random.default_rng([seed, 11]).permutation(np.unique(labels))
    if len(ids) < 4:
        raise ValueError(f"the open-set protocol needs at least 4 identities, got {len(ids)}")
    splits = []
    for part in (ids[: len(ids) // 2], ids[len(ids) // 2:]):
        n_known = max(1, min(len(part) - 1, int(round(len(part) * known_fraction))))
        known = set(part[:n_known].tolist())
        gallery, queries, query_labels = [], [], []
        for c in part:
            members = np.flatnonzero(labels == c)
            if c in known:
                gallery.append(members[0])
                queries.extend(members[1:])
                query_labels.extend([c] * (len(members) - 1))
            else:
                queries.extend(members)
                query_labels.extend([-1] * len(members))
        gallery = np.array(gallery, np.int64)
        splits.append(OpenSetSplit(gallery, labels[gallery], np.array(queries, np.int64),
                                   np.array(query_labels, labels.dtype)))
    return splits[0], splits[1]


def thresholds_from_other_folds(folds: Sequence[tuple[np.ndarray, ...]],
                                choose: Callable[..., float]) -> list[float]:
    """For each fold, `choose(*arrays)` on the other folds' arrays concatenated: the standard
    protocol's threshold, never fitted on the fold it is applied to. Needs two folds or more."""
    if len(folds) < 2:
        raise ValueError("thresholds from other folds need at least two folds")
    out = []
    for i in range(len(folds)):
        others = [f for j, f in enumerate(folds) if j != i]
        out.append(float(choose(*(np.concatenate(parts) for parts in zip(*others)))))
    return out
