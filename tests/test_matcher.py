import chex
import numpy as np
import pytest

from jfacerec.matcher import top_k_cosine


def brute_force(q, g, k):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    s = qn @ gn.T
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, 1), idx


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("chunk,block", [(7, 4), (64, 1024), (1000, 3)])
def test_equals_numpy_brute_force(k, chunk, block):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(23, 16)).astype(np.float32)
    g = rng.normal(size=(50, 16)).astype(np.float32) * rng.uniform(0.1, 10, (50, 1))
    scores, idx = top_k_cosine(q, g, k=k, gallery_chunk=chunk, query_block=block)
    want_s, want_i = brute_force(q.astype(np.float64), g.astype(np.float64), k)
    chex.assert_shape([scores, idx], (23, k))
    chex.assert_type([scores, idx], [np.float32, np.int32])
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_allclose(scores, want_s, atol=1e-5)


def test_gallery_much_larger_than_a_chunk_with_padding():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(1003, 8)).astype(np.float32)
    q = g[[5, 500, 1002]] * 3.0  # each query's best match is itself
    scores, idx = top_k_cosine(q, g, k=3, gallery_chunk=100)
    np.testing.assert_array_equal(idx[:, 0], [5, 500, 1002])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-6)
    assert (idx < 1003).all()  # padding rows are never returned


def test_bad_shapes_and_k_are_refused():
    with pytest.raises(ValueError, match="k must be"):
        top_k_cosine(np.ones((2, 4)), np.ones((3, 4)), k=4)
    with pytest.raises(ValueError, match="need queries"):
        top_k_cosine(np.ones((2, 4)), np.ones((3, 5)))


@pytest.mark.parametrize("k", [1, 5])
def test_ties_keep_the_lower_index_across_groups_and_chunks(k):
    # +-1 vectors of 16 dims normalise to +-0.25 exactly, so every score is an exact multiple of
    # 1/8 and the 1,000 rows share 17 values: ties everywhere, inside and across the 32-row groups
    # and 256-row chunks (the last chunk, 232 rows, ends in 8 rows outside any group).
    rng = np.random.default_rng(2)
    g = rng.choice([-1.0, 1.0], size=(1000, 16)).astype(np.float32)
    q = rng.choice([-1.0, 1.0], size=(37, 16)).astype(np.float32)
    scores, idx = top_k_cosine(q, g, k=k, gallery_chunk=256, query_block=16)
    want_s, want_i = brute_force(q.astype(np.float64), g.astype(np.float64), k)
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_array_equal(scores, want_s)


@pytest.mark.parametrize("k", [1, 5])
def test_default_chunks_equal_numpy_brute_force(k):
    rng = np.random.default_rng(3)
    q = rng.normal(size=(40, 32)).astype(np.float32)
    g = rng.normal(size=(9000, 32)).astype(np.float32)  # two 4,096-row chunks and a tail of 808
    scores, idx = top_k_cosine(q, g, k=k)
    want_s, want_i = brute_force(q.astype(np.float64), g.astype(np.float64), k)
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_allclose(scores, want_s, atol=1e-5)
