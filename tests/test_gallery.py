"""python -m jfacerec.gallery enroll | identify: a pickle-free gallery, top-k matches, and galleries
of other models refused."""

import dataclasses
import os

import chex
import numpy as np
import pytest

import jfacerec
from conftest import read_csv, run_module
from jfacerec.data.folders import scan_identity_folders
from jfacerec.inference import wccn
from jfacerec.inference.gallery import Gallery, from_embeddings

pytestmark = pytest.mark.slow


def test_gallery_commands_enroll_identify_and_refuse_other_models(hw2p2_model, tmp_path):
    workdir, root, _, known = hw2p2_model
    gallery_path = str(tmp_path / "gallery.npz")
    out = run_module("jfacerec.gallery", "enroll", "--workdir", workdir, "--images",
              str(root / "verification" / "known"), "--out", gallery_path, "--keep", "all")
    assert out.returncode == 0, out.stderr
    assert f"enrolled {len(known)} identities" in out.stdout
    with np.load(gallery_path, allow_pickle=False) as z:  # no pickle needed to read it
        assert z["embeddings"].shape == (2 * len(known), int(z["dim"]))
        assert int(z["format_version"]) == 1
    matches_path = str(tmp_path / "matches.csv")
    out = run_module("jfacerec.gallery", "identify", "--gallery", gallery_path, "--images",
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
    out = run_module("jfacerec.gallery", "identify", "--gallery", str(forged), "--images",
              str(root / "verification" / "unknown_dev"), "--out", str(tmp_path / "m2.csv"),
              "--threshold", "0.3")
    assert out.returncode == 1 and "enrolled by another model" in out.stderr
    assert not os.path.exists(tmp_path / "m2.csv")
    model = jfacerec.load(workdir)
    narrow = Gallery(gallery.names, gallery.embeddings[:, :3], model.fingerprint, "x", "all")
    with pytest.raises(ValueError, match="3-dimensional"):
        model.identify([str(root / "classification" / "test" / os.listdir(
            root / "classification" / "test")[0])], narrow, threshold=0.0)


def test_wccn_gallery_whitens_rows_and_queries_and_refuses_the_cosine_threshold(hw2p2_model,
                                                                               tmp_path):
    workdir, root, _, known = hw2p2_model
    known_root = root / "verification" / "known"
    gallery_path = str(tmp_path / "whitened.npz")
    out = run_module("jfacerec.gallery", "enroll", "--workdir", workdir, "--images",
                     str(known_root), "--out", gallery_path, "--wccn", "0.2")
    assert out.returncode == 0, out.stderr
    assert "WCCN 0.2" in out.stdout
    gallery = Gallery.load(gallery_path)
    model = jfacerec.load(workdir)
    files = scan_identity_folders(str(known_root), strict=True)
    raw = model.embed_files(list(files.paths))
    # the whitening is the one fitted on the enrolled images; each row is its identity's mean
    # whitened embedding
    expected = wccn.fit(raw, files.labels, 0.2)
    chex.assert_trees_all_close(tuple(gallery.whitening), tuple(expected), rtol=1e-4, atol=1e-5)
    white = wccn.apply(expected, raw)
    for name, row in zip(gallery.names, gallery.embeddings):
        mean = white[np.array(files.names)[files.labels] == name].mean(axis=0)
        np.testing.assert_allclose(row, mean / np.linalg.norm(mean), atol=1e-4)
    # the queries are whitened too: the scores are the whitened cosines, not the plain ones
    queries = sorted(str(p) for p in (root / "verification" / "unknown_dev").iterdir())
    matches = model.identify(queries, gallery, threshold=-1.0)
    whitened_q = wccn.apply(expected, model.embed_files(queries))
    np.testing.assert_allclose([m.score for m in matches],
                               (whitened_q @ gallery.embeddings.T).max(axis=1), atol=1e-4)
    plain = from_embeddings(model, files, raw)
    assert not np.allclose([m.score for m in matches],
                           [m.score for m in model.identify(queries, plain, threshold=-1.0)],
                           atol=1e-3)
    # the model's calibrated threshold is a cosine's: a whitened gallery needs its own
    with pytest.raises(ValueError, match="whitened by WCCN"):
        dataclasses.replace(gallery, threshold=None).resolve_threshold(None, 0.5)
    # a reader of version 1 would refuse it; a version-2 file without its whitening is refused
    with np.load(gallery_path, allow_pickle=False) as z:
        assert int(z["format_version"]) == 2
        stripped = {k: z[k] for k in z.files if k != "wccn_transform"}
    np.savez(tmp_path / "stripped.npz", **stripped)
    with pytest.raises(ValueError, match="without its whitening"):
        Gallery.load(str(tmp_path / "stripped.npz"))
