"""Evaluation protocols: verification pairs and the open-set split built from labels, and the LFW
pairs files."""

from __future__ import annotations

import dataclasses
import os
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


@dataclasses.dataclass(frozen=True)
class LfwPair:
    """One line of an LFW pairs file: two images, of one person (`same`) or of two."""

    names: tuple[str, str]
    numbers: tuple[int, int]
    same: bool

    def paths(self, root: str) -> tuple[str, str]:
        """The two image files under LFW's `root/<name>/<name>_<number:04d>.jpg`."""
        return tuple(os.path.join(root, n, f"{n}_{i:04d}.jpg")  # type: ignore[return-value]
                     for n, i in zip(self.names, self.numbers))


def read_lfw_pairs(path: str) -> list[list[LfwPair]]:
    """An LFW pairs file -> its folds, each a list of pairs (matched first, then mismatched).

    The header says the format: `N` (View 1: one set of N matched then N mismatched pairs) or
    `FOLDS<tab>N` (View 2: FOLDS identity-disjoint folds of 2N pairs each).
    """
    with open(path) as f:
        lines = [line.split() for line in f if line.strip()]
    if not lines or not all(x.isdigit() for x in lines[0]) or len(lines[0]) not in (1, 2):
        raise ValueError(f"{path}: the first line must be 'N' (View 1) or 'FOLDS<tab>N' (View 2)")
    folds, n = (1, int(lines[0][0])) if len(lines[0]) == 1 else map(int, lines[0])
    body = lines[1:]
    if len(body) != folds * 2 * n:
        raise ValueError(f"{path}: the header promises {folds} x {2 * n} pairs, the file holds "
                         f"{len(body)}")
    pairs = []
    for number, fields in enumerate(body, start=2):
        try:
            if len(fields) == 3:
                pairs.append(LfwPair((fields[0], fields[0]), (int(fields[1]), int(fields[2])), True))
            elif len(fields) == 4:
                pairs.append(LfwPair((fields[0], fields[2]), (int(fields[1]), int(fields[3])),
                                     False))
            else:
                raise ValueError(f"{len(fields)} fields")
        except ValueError as e:
            raise ValueError(f"{path}, line {number}: expected 'name n1 n2' or "
                             f"'name1 n1 name2 n2' ({e})") from None
    out = [pairs[i * 2 * n:(i + 1) * 2 * n] for i in range(folds)]
    for i, fold in enumerate(out):
        if [p.same for p in fold] != [True] * n + [False] * n:
            raise ValueError(f"{path}: fold {i} is not {n} matched then {n} mismatched pairs")
    return out


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
