"""IJB-B/IJB-C 1:1 verification: reading a release, pooling faces into templates, TAR@FAR, and the
command on a tiny synthetic release."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import run_module, tiny_config
from jfacerec.data import align as align_lib
from jfacerec.data.synthetic import render_faces
from jfacerec.evaluation import ijb


def test_pooling_averages_each_media_and_sums_a_templates_media():
    # Template 7: media 1 = faces (2, 0) and (0, 2) -> mean (1, 1); media 2 = (0, 3).
    # Sum (1, 4), normalised (1, 4) / sqrt(17). Template 3: one face (5, 0) -> (1, 0).
    features = np.array([[2.0, 0.0], [0.0, 2.0], [0.0, 3.0], [5.0, 0.0]])
    ids, embeddings = ijb.template_embeddings(features, np.array([7, 7, 7, 3]),
                                              np.array([1, 1, 2, 1]))
    np.testing.assert_array_equal(ids, [3, 7])
    np.testing.assert_allclose(embeddings, [[1.0, 0.0], [1 / 17 ** 0.5, 4 / 17 ** 0.5]])
    # The same media id in another template is another media.
    ids, embeddings = ijb.template_embeddings(features[:3], np.array([7, 7, 8]),
                                              np.array([1, 1, 1]))
    np.testing.assert_allclose(embeddings, [[0.5 ** 0.5, 0.5 ** 0.5], [0.0, 1.0]])


def test_face_features_weigh_by_norm_and_detection_score():
    raw = np.array([[3.0, 4.0], [0.0, 2.0]])
    faceness = np.array([0.5, 1.0])
    np.testing.assert_allclose(
        ijb.face_features(raw, faceness, norm_score=True, detector_score=True),
        [[1.5, 2.0], [0.0, 2.0]])
    np.testing.assert_allclose(
        ijb.face_features(raw, faceness, norm_score=False, detector_score=True),
        [[0.3, 0.4], [0.0, 1.0]])
    np.testing.assert_allclose(
        ijb.face_features(raw, faceness, norm_score=False, detector_score=False),
        [[0.6, 0.8], [0.0, 1.0]])


def test_pair_scores_and_tar_at_far_by_hand():
    # Four templates in two dimensions: scores are cosines of the unit vectors at these angles.
    angles = np.radians([0.0, 10.0, 60.0, 90.0])
    ids = np.array([1, 2, 3, 4])
    embeddings = np.stack([np.cos(angles), np.sin(angles)], 1)
    first, second = np.array([1, 1, 3, 1, 2, 2]), np.array([2, 3, 4, 4, 4, 3])
    same = np.array([True, True, True, False, False, False])
    scores = ijb.score_pairs(ids, embeddings, first, second)
    np.testing.assert_allclose(scores, np.cos(np.radians([10, 60, 30, 90, 80, 50])))
    # Genuine cos 10, 30, 60 (0.985, 0.866, 0.5); impostor cos 50, 80, 90 (0.643, 0.174, 0).
    # No false accept (every FAR below 1/3): accept >= 0.866, TAR 2/3. FAR 1/3 is reached only
    # at 1e-0 (not reported), so every reported TAR is 2/3.
    results = ijb.verification_metrics(scores, same)
    for far in ("1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"):
        assert results[f"tar@far={far}"] == pytest.approx(2 / 3)
    # AUC: of the 9 genuine-impostor comparisons, only cos 60 < cos 50 is ordered wrong.
    assert results["auc"] == pytest.approx(8 / 9)


def _release(root, identities=4, templates_per_identity=2, faces_per_template=3, seed=0):
    """A tiny IJB-style release under root (meta/ and loose_crop/, target IJBC): synthetic
    32-pixel faces posed by random similarities on 48-pixel pictures; each template two media
    (the first with two frames); every pair of templates, labelled."""
    rng = np.random.default_rng(seed)
    os.makedirs(root / "meta")
    os.makedirs(root / "loose_crop")
    faces, points, template, media = [], [], 0, 0
    owner = {}
    for identity in range(identities):
        pictures = render_faces(np.full(templates_per_identity * faces_per_template, identity),
                                np.arange(templates_per_identity * faces_per_template),
                                image_size=32)
        for t in range(templates_per_identity):
            template += 1
            owner[template] = identity
            for k in range(faces_per_template):
                media += k != 1  # frames 0 and 1 share a media
                name = f"{len(faces) + 1}.jpg"
                c, s = np.cos(rng.uniform(-0.4, 0.4)), np.sin(rng.uniform(-0.4, 0.4))
                scale = rng.uniform(0.8, 1.1)
                matrix = np.array([[scale * c, -scale * s, rng.uniform(2, 10)],
                                   [scale * s, scale * c, rng.uniform(2, 10)]])
                picture = align_lib.warp(pictures[t * faces_per_template + k], matrix, 48)
                Image.fromarray(picture).save(root / "loose_crop" / name, quality=95)
                landmarks = align_lib.template(32) @ matrix[:, :2].T + matrix[:, 2]
                faces.append(f"{name} {template} {media}")
                points.append(f"{name} " + " ".join(f"{v:.3f}" for v in landmarks.reshape(-1))
                              + f" {rng.uniform(0.5, 1.0):.3f}")
    pairs = [f"{a} {b} {int(owner[a] == owner[b])}"
             for a in owner for b in owner if a < b]
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(faces) + "\n")
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(points) + "\n")
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    return root


def test_reading_a_release(tmp_path):
    root = _release(tmp_path / "IJBC", identities=2, templates_per_identity=2)
    release = ijb.read_release(str(root), "IJBC")
    assert len(release.images) == 12 and release.landmarks.shape == (12, 5, 2)
    np.testing.assert_array_equal(release.templates, np.repeat([1, 2, 3, 4], 3))
    np.testing.assert_array_equal(release.medias[:6], [1, 1, 2, 3, 3, 4])
    assert release.same.tolist() == [True, False, False, False, False, True]
    assert 0.5 <= release.faceness.min() and release.faceness.max() <= 1.0


def test_release_errors_name_the_file_and_line(tmp_path):
    root = _release(tmp_path / "IJBC", identities=2, templates_per_identity=1)
    pairs = root / "meta" / "ijbc_template_pair_label.txt"
    pairs.write_text("1 2 0\n1 9 1\n")
    with pytest.raises(ValueError, match=r"ijbc_template_pair_label\.txt line 2: template 9 is "
                                         r"not in .*ijbc_face_tid_mid\.txt"):
        ijb.read_release(str(root), "IJBC")
    points = root / "meta" / "ijbc_name_5pts_score.txt"
    lines = points.read_text().splitlines()
    points.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"ijbc_face_tid_mid\.txt line 6: 6\.jpg has no line in"):
        ijb.read_release(str(root), "IJBC")
    points.write_text("\n".join(lines[:2] + ["3.jpg" + " 10" * 10 + " 0.9"] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"ijbc_name_5pts_score\.txt line 3: .*all the same"):
        ijb.read_release(str(root), "IJBC")
    os.remove(points)
    with pytest.raises(FileNotFoundError, match=r"meta/ijbc_name_5pts_score\.txt: missing"):
        ijb.read_release(str(root), "IJBC")


def test_the_command_scores_a_tiny_release(tmp_path):
    from jfacerec.training import train

    workdir = str(tmp_path / "workdir")
    train(tiny_config(total_steps=4, checkpoint_every_steps=4), workdir)
    root = _release(tmp_path / "IJBC")
    result = run_module("jfacerec.evaluation.ijb", "--workdir", workdir, "--root", str(root),
                        "--target", "IJBC")
    assert result.returncode == 0, result.stderr
    assert "IJBC 1:1 verification, 28 template pairs (24 impostor)" in result.stdout
    with open(os.path.join(workdir, "eval", "ijb_ijbc.json")) as f:
        results = json.load(f)
    assert (results["num_faces"], results["num_templates"], results["num_genuine"]) == (24, 8, 4)
    tars = [results[f"tar@far=1e-{k}"] for k in range(6, 0, -1)]
    assert all(0.0 <= t <= 1.0 for t in tars) and tars == sorted(tars)
    assert tars[0] in (0.0, 0.25, 0.5, 0.75, 1.0)  # four genuine pairs
    assert os.path.getsize(os.path.join(workdir, "eval", "ijb_ijbc.png")) > 0
    assert sorted(os.listdir(os.path.join(workdir, "eval"))) == ["ijb_ijbc.json", "ijb_ijbc.png"]
