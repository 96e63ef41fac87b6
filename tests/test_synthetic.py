import chex
import numpy as np
import pytest

from jfacerec import metrics
from jfacerec.evaluation import protocols
from jfacerec.data.records import UNSEEN_IDENTITY_OFFSET, SyntheticSource
from jfacerec.data.synthetic import render_faces


def test_shape_and_dtype():
    x = render_faces([0, 1, 2], [0, 0, 5], image_size=24)
    chex.assert_shape(x, (3, 24, 24, 3))
    assert x.dtype == np.uint8
    assert x.std() > 10  # not a blank canvas


def test_same_identity_image_and_seed_give_the_same_picture_in_any_call():
    together = render_faces([3, 7, 3], [0, 2, 1], image_size=32, seed=5)
    alone = render_faces([7], [2], image_size=32, seed=5)
    np.testing.assert_array_equal(together[1], alone[0])
    np.testing.assert_array_equal(render_faces([3], [1], image_size=32, seed=5)[0], together[2])


def test_images_identities_and_seeds_differ():
    a = render_faces([3, 3, 4], [0, 1, 0], image_size=32, seed=0).astype(int)
    b = render_faces([3], [0], image_size=32, seed=1).astype(int)
    assert np.abs(a[0] - a[1]).mean() > 5  # two pictures of one person
    assert np.abs(a[0] - a[2]).mean() > 5  # two people
    assert np.abs(a[0] - b[0]).mean() > 5  # another seed: another dataset


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="differ"):
        render_faces([0, 1], [0])
    with pytest.raises(ValueError, match="non-negative"):
        render_faces([-1], [0])


def test_open_set_identities_are_disjoint_from_training_ones():
    train = SyntheticSource(np.arange(10), 3, image_size=16)
    unseen = SyntheticSource(UNSEEN_IDENTITY_OFFSET + np.arange(10), 3, image_size=16)
    assert not set(train.identity_ids) & set(unseen.identity_ids)
    # Each source labels its own identities from 0; the pictures differ.
    assert train[0]["label"] == unseen[0]["label"] == 0
    assert np.abs(train[0]["image"].astype(int) - unseen[0]["image"]).mean() > 5


def test_source_records_match_render_faces_and_cache_is_not_pickled():
    import pickle

    src = SyntheticSource(np.array([4, 9]), 3, image_offset=2, image_size=16, seed=1, chunk=4)
    rec = src[4]  # identity 9, image 2 + 1
    np.testing.assert_array_equal(rec["image"], render_faces([9], [3], image_size=16, seed=1)[0])
    assert rec["label"] == 1
    np.testing.assert_array_equal(src.labels(), [0, 0, 0, 1, 1, 1])
    clone = pickle.loads(pickle.dumps(src))  # grain ships sources to worker processes
    assert clone._cache == {}
    np.testing.assert_array_equal(clone[4]["image"], rec["image"])
    with pytest.raises(IndexError):
        src[6]


def test_raw_pixels_verify_poorly_on_200_unseen_identities():
    """The generator is hard enough that learning matters: raw-pixel cosine AUC <= 0.80."""
    ids = np.repeat(UNSEEN_IDENTITY_OFFSET + np.arange(200), 5)
    imgs = np.tile(np.arange(5), 200)
    pixels = render_faces(ids, imgs, image_size=32).reshape(len(ids), -1).astype(np.float64)
    first, second, same = protocols.make_pairs(ids, 2000, seed=0)
    a, b = pixels[first], pixels[second]
    scores = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    auc = metrics.roc_auc(scores, same)
    assert 0.5 < auc <= 0.80, auc
