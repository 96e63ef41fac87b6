"""Within-class covariance normalisation (WCCN) of face embeddings.

A network trained on a few thousand faces leaves directions in its embedding along which one
person's faces still vary widely (pose, light, expression the training people did not cover);
the cosine counts those directions as fully as the ones that tell people apart. WCCN (Hatch,
Kajarekar and Stolcke, 2006, from speaker verification) fits the within-person covariance on
labelled faces and whitens it, so that a pair's cosine weighs each direction by how little it
varies within a person. The covariance is shrunk toward a multiple of the identity (Ledoit-Wolf
style, `shrinkage` in [0, 1]): with few images per person its small eigenvalues are noise, and
`shrinkage=1` leaves only the centring. Fit it on the training people's embeddings, never on the
pairs it will score.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Wccn(NamedTuple):
    """mean float64 [dim] (of the fitted embeddings) and transform float64 [dim, dim]."""

    mean: np.ndarray
    transform: np.ndarray


def fit(embeddings: np.ndarray, labels: np.ndarray, shrinkage: float) -> Wccn:
    """WCCN of embeddings [n, dim] with int labels [n] (people with one image add nothing to the
    within-person covariance, and at least one person needs two)."""
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"WCCN shrinkage {shrinkage} is outside [0, 1] (0: the within-person "
                         f"covariance as fitted, 1: only centring)")
    x = np.asarray(embeddings, np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or labels.shape != x.shape[:1]:
        raise ValueError(f"WCCN needs embeddings [n, dim] and labels [n]; got {x.shape} and "
                         f"{labels.shape}")
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if counts.max() < 2:
        raise ValueError("WCCN needs a person with two or more images; every label occurs once")
    class_means = np.zeros((len(counts), x.shape[1]))
    np.add.at(class_means, inverse, x)
    class_means /= counts[:, None]
    within = x - class_means[inverse]
    covariance = within.T @ within / np.sum(counts[counts > 1])
    average_variance = np.trace(covariance) / len(covariance)
    shrunk = (1.0 - shrinkage) * covariance + shrinkage * average_variance * np.eye(len(covariance))
    eigenvalues, eigenvectors = np.linalg.eigh(shrunk)
    # the symmetric inverse square root: whitening that keeps the embedding's axes where it can
    transform = (eigenvectors / np.sqrt(np.maximum(eigenvalues, 1e-12))) @ eigenvectors.T
    return Wccn(x.mean(axis=0), transform)


def apply(wccn: Wccn, embeddings: np.ndarray) -> np.ndarray:
    """Unit-norm float32 [n, dim]: embeddings [n, dim] centred and whitened."""
    y = (np.asarray(embeddings, np.float64) - wccn.mean) @ wccn.transform
    return (y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)).astype(np.float32)
