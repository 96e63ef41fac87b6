"""python -m jfacerec.gallery enroll | identify: a pickle-free gallery, top-k matches, and galleries
of other models refused."""

import os

import numpy as np
import pytest

import jfacerec
from conftest import read_csv, run_module
from jfacerec.inference.gallery import Gallery

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
