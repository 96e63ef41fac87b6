"""python -m jfacerec.predict: the HW2P2 submission files from a trained workdir."""

import json
import os

import pytest

from conftest import read_csv, run_module

pytestmark = pytest.mark.slow


def test_predict_writes_the_submission_files(hw2p2_model, tmp_path):
    workdir, root, train_people, known = hw2p2_model
    out_dir = tmp_path / "submission"
    out = run_module("jfacerec.predict", "--workdir", workdir, "--data", str(root), "--out",
              str(out_dir))
    assert out.returncode == 0, out.stderr
    classification = read_csv(out_dir / "classification.csv")
    assert classification[0] == ["id", "label"]
    assert sorted(r[0] for r in classification[1:]) == sorted(
        os.listdir(root / "classification" / "test"))
    assert {r[1] for r in classification[1:]} <= set(train_people)
    verification = read_csv(out_dir / "verification.csv")
    assert verification[0] == ["id", "label"]
    assert sorted(r[0] for r in verification[1:]) == sorted(
        os.listdir(root / "verification" / "unknown_test"))
    assert {r[1] for r in verification[1:]} <= set(known) | {"n000000"}
    report = json.loads((out_dir / "report.json").read_text())
    assert 0.0 <= report["classification/dev_top1"] <= 1.0
    # The threshold is the best one on dev: at least as good as calling everyone unknown (2/5).
    assert report["verification/dev_accuracy"] >= 2 / 5
    assert sorted(os.listdir(out_dir)) == ["classification.csv", "report.json",
                                           "verification.csv"]  # no temporary files left
