import chex
import jax
import numpy as np
import pytest

from jfacerec.inference.matcher import shard_gallery, top_k_cosine
from jfacerec.core.parallel import make_mesh


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
@pytest.mark.parametrize("chunk", [256, 4096])
def test_ties_keep_the_lower_index_across_groups_and_chunks(chunk, k):
    # +-1 vectors of 16 dims normalise to +-0.25 exactly, so every score is an exact multiple of
    # 1/8 and the 1,000 rows share 17 values: ties everywhere, inside and across the 32-row groups
    # and the chunks: four of 256 rows (the last one ends at row 1,000, overlapping the one
    # before), or one of 1,000 (31 groups and 8 rows outside any group).
    rng = np.random.default_rng(2)
    g = rng.choice([-1.0, 1.0], size=(1000, 16)).astype(np.float32)
    q = rng.choice([-1.0, 1.0], size=(37, 16)).astype(np.float32)
    scores, idx = top_k_cosine(q, g, k=k, gallery_chunk=chunk, query_block=16)
    want_s, want_i = brute_force(q.astype(np.float64), g.astype(np.float64), k)
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_array_equal(scores, want_s)


@pytest.mark.parametrize("k", [1, 5])
def test_default_chunks_equal_numpy_brute_force(k):
    rng = np.random.default_rng(3)
    q = rng.normal(size=(40, 32)).astype(np.float32)
    g = rng.normal(size=(9000, 32)).astype(np.float32)  # three 3,008-row chunks, overlapping
    scores, idx = top_k_cosine(q, g, k=k)
    want_s, want_i = brute_force(q.astype(np.float64), g.astype(np.float64), k)
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_allclose(scores, want_s, atol=1e-5)


def gallery_with_ties(kind):
    """(queries, gallery) whose top 5 are full of exact ties.

    "gaussian": 1,003 rows (no mesh here divides it), one vector copied to rows on both sides of
    shard boundaries of 8, 4 and 2 devices (126, 251, 502 rows per device) and queries close to
    it. "signs": 1,000 +-1 rows, whose scores share 17 exact values (ties everywhere).
    """
    rng = np.random.default_rng(4)
    if kind == "signs":
        return (rng.choice([-1.0, 1.0], size=(37, 16)).astype(np.float32),
                rng.choice([-1.0, 1.0], size=(1000, 16)).astype(np.float32))
    g = rng.normal(size=(1003, 16)).astype(np.float32)
    g[[1002, 755, 502, 501, 252, 251, 250, 126, 125]] = g[600]
    q = rng.normal(size=(37, 16)).astype(np.float32)
    q[:20] = g[600] + 0.01 * q[:20]
    return q, g


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("devices,model", [(8, 1), (4, 1), (2, 1), (8, 2)])
@pytest.mark.parametrize("kind", ["gaussian", "signs"])
def test_sharded_search_equals_single_device(kind, devices, model, k):
    q, g = gallery_with_ties(kind)
    sharded = shard_gallery(g, make_mesh(devices, model))
    # 64-row chunks, a whole number of which no shard holds (each device's last chunk overlaps the
    # one before), and query blocks of 16 (the last one padded).
    scores, idx = top_k_cosine(q, sharded, k=k, gallery_chunk=64, query_block=16)
    want_s, want_i = top_k_cosine(q, g, k=k, gallery_chunk=64, query_block=16)
    chex.assert_shape([scores, idx], (37, k))
    chex.assert_type([scores, idx], [np.float32, np.int32])
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_array_equal(scores, want_s)  # the same matmul shapes: the same roundings
    tied = 20 if kind == "gaussian" else 0
    # Equal rows tie exactly and go to the lower index. (NumPy's float64 matmul does not score
    # equal rows alike everywhere either, so the ties among copies are written out.)
    np.testing.assert_array_equal(idx[:tied], np.tile([125, 126, 250, 251, 252][:k], (tied, 1)))
    np.testing.assert_array_equal(
        idx[tied:], brute_force(q[tied:].astype(np.float64), g.astype(np.float64), k)[1])


@pytest.mark.parametrize("ng,k", [(12, 5), (3, 3), (300, 5)])
def test_sharded_search_with_shards_smaller_than_k_or_a_chunk(ng, k):
    # 8 devices: 12 rows are 2 per device (fewer than k); 3 rows leave 5 devices only padding;
    # 300 rows are 38 per device, fewer than a 64-row chunk, so each shard is padded up to one.
    rng = np.random.default_rng(5)
    g = rng.normal(size=(ng, 16)).astype(np.float32)
    q = rng.normal(size=(9, 16)).astype(np.float32)
    scores, idx = top_k_cosine(q, shard_gallery(g, make_mesh(8)), k=k, gallery_chunk=64)
    want_s, want_i = top_k_cosine(q, g, k=k, gallery_chunk=64)
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_array_equal(scores, want_s)
    np.testing.assert_array_equal(idx, brute_force(q.astype(np.float64), g.astype(np.float64), k)[1])
    assert np.isfinite(scores).all()  # no padding row, nor an empty slot, is ever returned


def test_shard_gallery_puts_only_its_rows_on_each_device():
    g = np.random.default_rng(6).normal(size=(1003, 16)).astype(np.float32)
    mesh = make_mesh(8, model=2)
    sharded = shard_gallery(g, mesh)
    assert sharded.shape == (1003, 16) and sharded.mesh == mesh
    padded = np.concatenate([g, np.zeros((5, 16), np.float32)])
    shards = sorted(sharded.rows.addressable_shards, key=lambda s: s.index[0].start)
    assert [s.device for s in shards] == list(mesh.devices.flat)
    for i, shard in enumerate(shards):
        chex.assert_shape(shard.data, (126, 16))
        np.testing.assert_array_equal(shard.data, padded[i * 126:(i + 1) * 126])
    assert jax.device_count() == 8 and sharded.rows.is_fully_addressable
