"""jfacerec.load: a trained model embeds, verifies, classifies and identifies faces (real LFW faces
in an HW2P2-shaped tree, the session's `hw2p2_model`)."""

import chex
import numpy as np
import pytest
from PIL import Image

import jfacerec
from jfacerec.data.folders import scan_identity_folders
from jfacerec.inference.gallery import enroll

pytestmark = pytest.mark.slow

def test_load_embeds_paths_pil_images_and_arrays_alike(hw2p2_model):
    workdir, root, _, known = hw2p2_model
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

def test_verify_without_a_calibrated_threshold_says_how_to_get_one(hw2p2_model):
    model = jfacerec.load(hw2p2_model[0])
    with pytest.raises(ValueError, match="jfacerec.evaluate"):
        model.verify(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8))

def test_identify_api_with_mean_gallery_finds_enrolled_images(hw2p2_model):
    workdir, root, _, known = hw2p2_model
    model = jfacerec.load(workdir)
    gallery = enroll(model, scan_identity_folders(str(root / "verification" / "known")))
    assert gallery.names.tolist() == sorted(known) and gallery.keep == "mean"
    queries = [str(root / "verification" / "known" / name / "1.jpg") for name in sorted(known)]
    matches = model.identify(queries, gallery, threshold=-1.0, k=3)
    assert all(m.known and len(m.candidates) == 3 for m in matches)
    rejected = model.identify(queries, gallery, threshold=1.01)
    assert [m.name for m in rejected] == ["n000000"] * len(known)


def test_load_restores_the_step_it_is_asked_for(tmp_path):
    from conftest import tiny_config
    from jfacerec.data.synthetic import render_faces
    from jfacerec.training import train

    workdir = str(tmp_path / "w")
    train(tiny_config(total_steps=20, checkpoint_every_steps=10), workdir)
    faces = render_faces([0, 1], [0, 0], image_size=16)
    early, newest = jfacerec.load(workdir, step=10), jfacerec.load(workdir)
    assert (early.step, newest.step) == (10, 20)
    assert early.fingerprint != newest.fingerprint
    assert not np.allclose(early.embed(faces), newest.embed(faces))
