"""jfacerec.inference.wccn: whitening embeddings by their within-person covariance."""

import chex
import numpy as np
import pytest

from jfacerec import metrics
from jfacerec.inference import wccn


def people(rng: np.random.Generator, n_people: int, per_person: int, nuisance: float
           ) -> tuple[np.ndarray, np.ndarray]:
    """Unit embeddings [n_people * per_person, 8] and labels: a person is a random direction in
    the first 7 dimensions; within a person, dimension 7 varies `nuisance` times as widely as the
    rest (a pose the network never learnt to ignore)."""
    centres = rng.normal(size=(n_people, 8)) * np.array([1.0] * 7 + [0.0])
    labels = np.repeat(np.arange(n_people), per_person)
    noise = rng.normal(size=(len(labels), 8)) * np.array([0.3] * 7 + [0.3 * nuisance])
    x = centres[labels] + noise
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def pair_scores(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cosine [pairs], same [pairs]) of every pair of rows of unit embeddings x."""
    first, second = np.triu_indices(len(x), 1)
    return np.sum(x[first] * x[second], axis=-1), labels[first] == labels[second]


def test_whitening_the_within_person_covariance_makes_it_the_identity():
    x, labels = people(np.random.default_rng(0), 40, 5, nuisance=6.0)
    fitted = wccn.fit(x, labels, shrinkage=0.0)
    chex.assert_shape(fitted.mean, (8,))
    chex.assert_shape(fitted.transform, (8, 8))
    np.testing.assert_allclose(fitted.mean, x.mean(axis=0))
    means = np.stack([x[labels == c].mean(axis=0) for c in range(40)])
    within = (x - means[labels]) @ fitted.transform
    np.testing.assert_allclose(within.T @ within / len(x), np.eye(8), atol=1e-9)
    # full shrinkage leaves only the centring
    fitted = wccn.fit(x, labels, shrinkage=1.0)
    np.testing.assert_allclose(fitted.transform / fitted.transform[0, 0], np.eye(8), atol=1e-12)
    centred = (x - x.mean(axis=0)) / np.linalg.norm(x - x.mean(axis=0), axis=1, keepdims=True)
    np.testing.assert_allclose(wccn.apply(fitted, x), centred, atol=1e-6)


def test_wccn_fitted_on_some_people_verifies_others_better_than_the_cosine():
    rng = np.random.default_rng(1)
    train, train_labels = people(rng, 60, 4, nuisance=5.0)
    test, test_labels = people(rng, 30, 4, nuisance=5.0)
    whitened = wccn.apply(wccn.fit(train, train_labels, shrinkage=0.2), test)
    chex.assert_shape(whitened, test.shape)
    chex.assert_type(whitened, np.float32)
    np.testing.assert_allclose(np.linalg.norm(whitened, axis=1), 1.0, rtol=1e-6)
    plain_auc = metrics.roc_auc(*pair_scores(test, test_labels))
    whitened_auc = metrics.roc_auc(*pair_scores(whitened, test_labels))
    assert plain_auc < 0.95 and whitened_auc > 0.98, (plain_auc, whitened_auc)


def test_bad_inputs_are_refused_with_what_to_give():
    x, labels = people(np.random.default_rng(2), 5, 2, nuisance=1.0)
    with pytest.raises(ValueError, match=r"shrinkage 1.5 is outside \[0, 1\]"):
        wccn.fit(x, labels, shrinkage=1.5)
    with pytest.raises(ValueError, match="two or more images"):
        wccn.fit(x, np.arange(len(x)), shrinkage=0.2)
    with pytest.raises(ValueError, match=r"embeddings \[n, dim\] and labels \[n\]"):
        wccn.fit(x, labels[:-1], shrinkage=0.2)
