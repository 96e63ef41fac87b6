import chex
import numpy as np
import pytest

from jfacerec import metrics
from jfacerec.evaluation import protocols


@pytest.fixture
def pairs():
    rng = np.random.default_rng(0)
    same = rng.uniform(size=400) < 0.5
    # Rounded scores create ties, which every metric must handle.
    scores = np.round(rng.normal(size=400) + 1.5 * same, 1)
    return scores, same


def test_auc_equals_mann_whitney_u(pairs):
    scores, same = pairs
    pos, neg = scores[same], scores[~same]
    u = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    np.testing.assert_allclose(metrics.roc_auc(scores, same), u / (len(pos) * len(neg)), rtol=1e-12)


def test_perfect_and_reversed_scores():
    same = np.array([True, True, False, False])
    assert metrics.roc_auc([0.9, 0.8, 0.1, 0.2], same) == 1.0
    assert metrics.roc_auc([0.1, 0.2, 0.9, 0.8], same) == 0.0
    assert metrics.eer([0.9, 0.8, 0.1, 0.2], same) == 0.0


def test_eer_against_a_threshold_scan(pairs):
    scores, same = pairs
    ts = np.linspace(scores.min() - 1, scores.max() + 1, 20001)
    far = np.array([(scores[~same] >= t).mean() for t in ts])
    frr = np.array([(scores[same] < t).mean() for t in ts])
    i = np.argmin(np.abs(far - frr))
    assert abs(metrics.eer(scores, same) - (far[i] + frr[i]) / 2) < 0.02


def test_tar_at_far_against_brute_force(pairs):
    scores, same = pairs
    for far in (0.01, 0.1, 0.3):
        best = max((scores[same] >= t).mean() for t in np.unique(scores)
                   if (scores[~same] >= t).mean() <= far)
        assert metrics.tar_at_far(scores, same, far) == pytest.approx(best)


def test_best_threshold_against_brute_force(pairs):
    scores, same = pairs
    t, acc = metrics.best_threshold(scores, same)
    brute = max(((scores >= c) == same).mean() for c in np.unique(scores))
    assert acc == pytest.approx(brute)
    assert ((scores >= t) == same).mean() == pytest.approx(brute)


def test_kfold_accuracy_picks_thresholds_on_the_other_folds(pairs):
    scores, same = pairs
    result = metrics.kfold_accuracy(scores, same, 10)
    fold_of = np.arange(400) * 10 // 400
    manual = []
    for f in range(10):
        t, _ = metrics.best_threshold(scores[fold_of != f], same[fold_of != f])
        manual.append(((scores[fold_of == f] >= t) == same[fold_of == f]).mean())
    np.testing.assert_allclose(result.fold_accuracies, manual)
    assert result.mean == pytest.approx(np.mean(manual))
    assert result.std == pytest.approx(np.std(manual))
    explicit = metrics.kfold_accuracy(scores, same, fold_of)
    assert explicit.mean == pytest.approx(result.mean)


def test_stratified_folds_give_every_fold_a_share_of_each_kind_in_order():
    same = np.array([True] * 7 + [False] * 13)
    fold_of = metrics.stratified_folds(same, 3)
    chex.assert_shape(fold_of, (20,))
    np.testing.assert_array_equal(fold_of[:7], [0, 0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(fold_of[7:], np.arange(13) * 3 // 13)
    interleaved = np.tile([True, False], 50)
    counts = [(np.sum(interleaved[metrics.stratified_folds(interleaved, 10) == f]),
               np.sum(~interleaved[metrics.stratified_folds(interleaved, 10) == f]))
              for f in range(10)]
    assert counts == [(5, 5)] * 10


def test_stratified_folds_remove_the_bias_of_a_file_listing_one_kind_first():
    """View 1's pairsDevTest.txt layout: 500 matched pairs, then 500 mismatched."""
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0.5, 0.2, 500), rng.normal(0.2, 0.2, 500)])
    same = np.arange(1000) < 500
    _, best = metrics.best_threshold(scores, same)
    contiguous = metrics.kfold_accuracy(scores, same, 10)
    stratified = metrics.kfold_accuracy(scores, same, metrics.stratified_folds(same, 10))
    assert best - 0.02 <= stratified.mean <= best
    assert contiguous.mean < stratified.mean - 0.01
    assert stratified.std < contiguous.std


def test_top_k_accuracy():
    logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = np.array([2, 0, 0])
    assert metrics.top_k_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert metrics.top_k_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert metrics.top_k_accuracy(logits, labels, 5) == 1.0


def test_open_set_accuracy_and_threshold_choice():
    best_scores = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.2])
    best_labels = np.array([1, 2, 9, 4, 5, 6])
    true_labels = np.array([1, 2, -1, 3, -1, -1])
    # At 0.65 the answers are 1, 2, 9 (wrong), unknown (wrong), unknown, unknown.
    assert metrics.open_set_accuracy(best_scores, best_labels, true_labels, 0.65) == \
        pytest.approx(4 / 6)
    t, acc = metrics.best_open_set_threshold(best_scores, best_labels, true_labels)
    brute = max(metrics.open_set_accuracy(best_scores, best_labels, true_labels, c)
                for c in np.r_[best_scores, 1.0])
    assert acc == pytest.approx(brute) == pytest.approx(5 / 6)
    assert metrics.open_set_accuracy(best_scores, best_labels, true_labels, t) == pytest.approx(acc)


def test_one_class_pairs_are_refused():
    with pytest.raises(ValueError, match="both matched and mismatched"):
        metrics.roc_auc([0.1, 0.2], [True, True])


def test_pairs_are_balanced_distinct_and_correct():
    labels = np.repeat(np.arange(10), 4)
    first, second, same = protocols.make_pairs(labels, 100, seed=0)
    assert same.sum() == (~same).sum() == 50
    np.testing.assert_array_equal(labels[first] == labels[second], same)
    assert len({(a, b) for a, b in zip(first, second)}) == 100
    assert (first != second).all()


def test_open_set_splits_are_identity_disjoint():
    labels = np.repeat(np.arange(20), 3)
    val, test = protocols.open_set_splits(labels, seed=0)
    for split in (val, test):
        assert len(split.gallery) == 5
        enrolled = set(split.gallery_labels)
        known = split.query_labels != -1
        assert set(split.query_labels[known]) == enrolled
        assert not set(split.gallery) & set(split.queries)
        assert not enrolled & set(labels[split.queries[~known]])
    ids = lambda s: set(labels[np.r_[s.gallery, s.queries]])  # noqa: E731
    assert not ids(val) & ids(test)
