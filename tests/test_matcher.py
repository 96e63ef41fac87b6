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
