"""The user-facing applications on real faces: jfacerec.load, the gallery and predict commands,
and the LFW and ORL protocols. One tiny model is trained on an HW2P2-shaped tree of LFW images."""

import csv
import json
import os
import subprocess
import sys

import chex
import ml_collections
import numpy as np
import pytest
from PIL import Image

import jfacerec
from conftest import DATA, LFW, REPO, hw2p2_tree, needs_lfw, needs_orl, tiny_config
from jfacerec.core.atomic import atomic_open
from jfacerec.inference.gallery import Gallery, enroll
from jfacerec.data.folders import scan_identity_folders

pytestmark = pytest.mark.slow


def run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, hw2p2 root, training names, known names): a 12-step model on real faces."""
    if not os.path.isdir(LFW):
        pytest.skip(f"no LFW at {LFW}")
    from jfacerec.training import train

    tmp = tmp_path_factory.mktemp("apps")
    root, train_people, known_people = hw2p2_tree(tmp / "hw2p2")
    config = tiny_config(total_steps=12, checkpoint_every_steps=12)
    config.dataset = ml_collections.ConfigDict(dict(name="hw2p2", root=str(root),
                                                    crop_fraction=0.5))
    workdir = str(tmp / "workdir")
    train(config, workdir)
    return workdir, root, train_people, known_people


def test_load_embeds_paths_pil_images_and_arrays_alike(trained):
    workdir, root, _, known = trained
    model = jfacerec.load(workdir, threshold=0.5)
    path = str(root / "verification" / "known" / known[0] / "1.jpg")
    pil = Image.open(path)
    array = np.asarray(pil.convert("RGB"))
    e = model.embed([path, pil, array, array.astype(np.float32) / 255.0])
    chex.assert_shape(e, (4, model.embedding_dim))
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    # Files decode through the pipeline (JPEG draft mode); in-memory images at full size: close.
    np.testing.assert_allclose(e[1], e[2], atol=1e-5)
    assert float(e[0] @ e[1]) > 0.98
    score, same = model.verify(path, array)
    assert score > 0.98 and same is True
    other = str(root / "verification" / "known" / known[1] / "1.jpg")
    score_other, same_other = model.verify(path, other, threshold=1.0)
    assert score_other < score and same_other is False
    assert model.classify([path])[0] in model.class_names


def test_verify_without_a_calibrated_threshold_says_how_to_get_one(trained):
    model = jfacerec.load(trained[0])
    with pytest.raises(ValueError, match="jfacerec.evaluate"):
        model.verify(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8))


def test_gallery_commands_enroll_identify_and_refuse_other_models(trained, tmp_path):
    workdir, root, _, known = trained
    gallery_path = str(tmp_path / "gallery.npz")
    out = run("jfacerec.gallery", "enroll", "--workdir", workdir, "--images",
              str(root / "verification" / "known"), "--out", gallery_path, "--keep", "all")
    assert out.returncode == 0, out.stderr
    assert f"enrolled {len(known)} identities" in out.stdout
    with np.load(gallery_path, allow_pickle=False) as z:  # no pickle needed to read it
        assert z["embeddings"].shape == (2 * len(known), int(z["dim"]))
        assert int(z["format_version"]) == 1
    matches_path = str(tmp_path / "matches.csv")
    out = run("jfacerec.gallery", "identify", "--gallery", gallery_path, "--images",
              str(root / "verification" / "unknown_dev"), "--out", matches_path, "--top-k", "2",
              "--threshold", "0.3")
    assert out.returncode == 0, out.stderr
    rows = read_csv(matches_path)
    assert rows[0] == ["id", "label", "score", "label_2", "score_2"]
    assert sorted(r[0] for r in rows[1:]) == sorted(os.listdir(root / "verification" /
                                                               "unknown_dev"))
    for r in rows[1:]:
        assert r[1] in set(known) | {"n000000"} and r[3] in known and r[1] != r[3]
        assert (r[1] == "n000000") == (float(r[2]) < 0.3) and float(r[2]) >= float(r[4])
    # A gallery from another model (another fingerprint) or another dimension is refused.
    gallery = Gallery.load(gallery_path)
    forged = tmp_path / "forged.npz"
    Gallery(gallery.names, gallery.embeddings, "0" * 16, gallery.model, gallery.keep,
            workdir=gallery.workdir).save(str(forged))
    out = run("jfacerec.gallery", "identify", "--gallery", str(forged), "--images",
              str(root / "verification" / "unknown_dev"), "--out", str(tmp_path / "m2.csv"),
              "--threshold", "0.3")
    assert out.returncode == 1 and "enrolled by another model" in out.stderr
    assert not os.path.exists(tmp_path / "m2.csv")
    model = jfacerec.load(workdir)
    narrow = Gallery(gallery.names, gallery.embeddings[:, :3], model.fingerprint, "x", "all")
    with pytest.raises(ValueError, match="3-dimensional"):
        model.identify([str(root / "classification" / "test" / os.listdir(
            root / "classification" / "test")[0])], narrow, threshold=0.0)


def test_identify_api_with_mean_gallery_finds_enrolled_images(trained):
    workdir, root, _, known = trained
    model = jfacerec.load(workdir)
    gallery = enroll(model, scan_identity_folders(str(root / "verification" / "known")))
    assert gallery.names.tolist() == sorted(known) and gallery.keep == "mean"
    queries = [str(root / "verification" / "known" / name / "1.jpg") for name in sorted(known)]
    matches = model.identify(queries, gallery, threshold=-1.0, k=3)
    assert all(m.known and len(m.candidates) == 3 for m in matches)
    rejected = model.identify(queries, gallery, threshold=1.01)
    assert [m.name for m in rejected] == ["n000000"] * len(known)


def test_predict_writes_the_submission_files(trained, tmp_path):
    workdir, root, train_people, known = trained
    out_dir = tmp_path / "submission"
    out = run("jfacerec.predict", "--workdir", workdir, "--data", str(root), "--out",
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


def test_atomic_writes_leave_the_old_file_whole_on_failure(tmp_path):
    path = tmp_path / "result.csv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_open(str(path)) as f:
            f.write("half of the new")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["result.csv"]


@needs_lfw
def test_lfw_protocol_on_two_view2_folds(tmp_path):
    from jfacerec.evaluation import lfw

    people = sorted(n for n in os.listdir(LFW) if len(os.listdir(os.path.join(LFW, n))) >= 3)
    folds = [people[0:4], people[4:8]]
    lines = ["2\t2"]
    for a, b, c, d in folds:  # per fold: 2 matched then 2 mismatched pairs, disjoint people
        lines += [f"{a}\t1\t2", f"{b}\t1\t3", f"{c}\t1\t{d}\t2", f"{a}\t3\t{d}\t1"]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("\n".join(lines) + "\n")
    sys.path.insert(0, os.path.join(REPO, "configs"))
    from lfw import get_config

    config = get_config("runlocal")
    config.update(image_size=16, total_steps=4, checkpoint_every_steps=4, num_devices=1)
    config.dataset.update(root=LFW, pairs=str(pairs), min_images=3)
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


@needs_orl
def test_orl_protocol_reports_cnn_and_eigenfaces(tmp_path):
    from jfacerec.evaluation import orl

    sys.path.insert(0, os.path.join(REPO, "configs"))
    from orl import get_config

    config = get_config("runlocal")
    config.update(total_steps=4, checkpoint_every_steps=4, num_devices=1)
    config.dataset.root = os.path.join(DATA, "att_faces")
    results = orl.run(config, str(tmp_path / "w"), splits=2)
    eigen = results["eigenfaces"]
    assert len(eigen["closed_set_accuracy"]) == 2
    # Eigenfaces on 16-pixel ORL faces, 5 training images per subject: well above chance (2.5%).
    assert eigen["closed_set_mean"] > 0.8
    assert 0.25 <= eigen["open_set_mean"] <= 1.0
    assert 0.0 <= results["cnn"]["closed_set_mean"] <= 1.0
    assert results["open_set_threshold"] == "chosen on the other splits"
    assert json.loads((tmp_path / "w" / "orl_results.json").read_text()) == results
