"""python -m jfacerec.evaluation.lfw: one model per fold of an LFW pairs file, never trained on that
fold's people."""

import json
import os

import numpy as np
import pytest

from conftest import LFW, needs_lfw, small_lfw_config, small_lfw_pairs

pytestmark = pytest.mark.slow

@needs_lfw
def test_lfw_protocol_on_two_view2_folds(tmp_path):
    from jfacerec import metrics
    from jfacerec.data.pairs import pair_images, read_lfw_pairs
    from jfacerec.evaluation import lfw
    from jfacerec.inference import wccn
    from jfacerec.inference.recognizer import load

    pairs = tmp_path / "pairs.txt"
    folds = small_lfw_pairs(pairs)
    config = small_lfw_config(pairs)
    # the learning curve: each fold validated on its own pairs during its training
    config.eval.update(every_steps=2, sets="pairs", folds=4)
    results = lfw.run(config, str(tmp_path / "w"), folds=[0, 1])
    assert [f["fold"] for f in results["per_fold"]] == [0, 1]
    assert all(f["num_pairs"] == 4 for f in results["per_fold"])
    assert results["threshold_selection"] == "best threshold on the other evaluated folds"
    assert 0.0 <= results["accuracy_mean"] <= 1.0 and 0.0 <= results["auc"] <= 1.0
    saved = json.loads((tmp_path / "w" / "lfw_results.json").read_text())
    assert saved["accuracy_mean"] == results["accuracy_mean"]
    assert os.path.getsize(tmp_path / "w" / "lfw_roc.png") > 1000
    # Each fold's model never saw that fold's people.
    for fold, names in enumerate(folds):
        trained_on = json.loads((tmp_path / "w" / f"fold_{fold:02d}" / "identities.json")
                                .read_text())
        assert not set(names) & set(trained_on)
    # The recipe's scores whiten by each fold's own training faces; the plain cosine's figures
    # stay beside them.
    assert results["wccn"] == config.eval.wccn > 0
    cosine = results["without_wccn"]
    for fold, plain in zip(results["per_fold"], cosine["per_fold"]):
        fold_dir = tmp_path / "w" / f"fold_{fold['fold']:02d}"
        pairs = read_lfw_pairs(str(tmp_path / "pairs.txt"))[fold["fold"]]
        same = np.array([p.same for p in pairs])
        fold_config = config.copy_and_resolve_references()
        fold_config.dataset.fold = fold["fold"]
        whitening = wccn.fit(*lfw.training_embeddings(fold_config, load(str(fold_dir))),
                             config.eval.wccn)
        unique, first, second = pair_images(pairs, LFW)
        embeddings = wccn.apply(whitening, load(str(fold_dir)).embed_files(unique))
        whitened = np.sum(embeddings[first] * embeddings[second], axis=-1)
        assert fold["auc"] == pytest.approx(metrics.roc_auc(whitened, same), abs=1e-6)
        # Its last validation is the protocol's cosine scoring of the same model on the same
        # pairs,
        records = [json.loads(line) for line in (fold_dir / "metrics.jsonl").read_text()
                   .splitlines()]
        curve = [(r["step"], r["val/pairs/auc"], r["val/pairs/accuracy"]) for r in records
                 if "val/pairs/auc" in r]
        assert [step for step, _, _ in curve] == [2, 4]
        assert curve[-1][1] == pytest.approx(plain["auc"], abs=1e-6)
        # and its accuracy is cross-validated on folds holding both kinds, as the protocol's
        scores = lfw.score_pairs(str(fold_dir), pairs, LFW)
        stratified = metrics.kfold_accuracy(scores, same, metrics.stratified_folds(same, 4))
        assert curve[-1][2] == pytest.approx(stratified.mean, abs=1e-6)
        assert os.path.getsize(fold_dir / "validation.png") > 1000


def test_one_fold_is_cross_validated_on_tenths_holding_both_kinds():
    """pairsDevTest.txt's layout, 500 matched pairs then 500 mismatched: every tenth the
    threshold is fitted for must hold both kinds, or the accuracy is biased low."""
    from jfacerec import metrics
    from jfacerec.evaluation import lfw

    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0.5, 0.2, 500), rng.normal(0.2, 0.2, 500)])
    same = np.arange(1000) < 500
    accuracies, thresholds, spread = lfw.fold_accuracies([scores], [same])
    stratified = metrics.kfold_accuracy(scores, same, metrics.stratified_folds(same, 10))
    assert accuracies == [pytest.approx(stratified.mean)]
    assert spread == pytest.approx(stratified.std)
    assert thresholds == [pytest.approx(float(np.median(stratified.thresholds)))]
    assert accuracies[0] > metrics.kfold_accuracy(scores, same, 10).mean + 0.01
