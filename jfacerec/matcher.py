"""Jitted, batched cosine-similarity search: the best k gallery entries for every query.

The gallery is walked in fixed-size chunks with `lax.scan`, keeping a running top-k, so memory is
`O(queries_per_block * gallery_chunk)` however large the gallery. Queries are processed in fixed-size
blocks too, so one compiled program serves any number of queries.

The matmul is nearly the whole cost (benchmarks/matcher.py). Each [queries, chunk] score block is
first reduced to maxima over small groups, and the top k are picked among the few groups that can
hold them (`_candidates`): a top_k over the whole block would cost as much as the matmul again. Each
gallery chunk is normalised as the scan reaches it, so no normalised copy of the gallery is made.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jfacerec.losses import l2_normalize

# Gallery entries per group in `_candidates`: the max over 32 contiguous scores is one vectorised
# pass, and the top k of a 4096-entry chunk then come from k * 32 candidates.
_GROUP = 32


def _candidates(scores: jax.Array, offset: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """A subset of each row's scores that holds its top k, in gallery order.

    scores [q, c] for gallery rows offset .. offset + c. Returns (scores [q, m], indices int32 [q, m])
    with m = k * _GROUP + c % _GROUP, or m = c when c holds at most k whole groups.

    XLA's CPU top_k over a whole [q, c] block costs as much as the matmul that made it; a max over
    groups of `_GROUP` contiguous entries is a cheap reduction. The row's top k lie in the k groups
    with the largest maxima (each group ranked ahead of an element's own group holds a distinct
    element ranked ahead of it, ties going to the lower group and so to the lower index), so only
    those are kept, plus the last c % _GROUP entries, which form no whole group. They are sorted
    back into gallery order so that a stable top_k downstream still breaks ties by the lower index.
    """
    nq, c = scores.shape
    whole = c - c % _GROUP
    indices = jnp.arange(c, dtype=jnp.int32) + offset
    if whole // _GROUP <= k:
        return scores, jnp.broadcast_to(indices, scores.shape)
    groups = scores[:, :whole].reshape(nq, whole // _GROUP, _GROUP)
    _, best_groups = jax.lax.top_k(groups.max(axis=-1), k)
    best_groups = jnp.sort(best_groups, axis=1)  # [q, k]
    kept = jnp.take_along_axis(groups, best_groups[:, :, None], axis=1).reshape(nq, k * _GROUP)
    rows = (best_groups[:, :, None] * _GROUP + jnp.arange(_GROUP, dtype=jnp.int32)).reshape(
        nq, k * _GROUP) + offset
    return (jnp.concatenate([kept, scores[:, whole:]], axis=1),
            jnp.concatenate([rows, jnp.broadcast_to(indices[whole:], (nq, c - whole))], axis=1))


def _merge(best: tuple[jax.Array, jax.Array], new: tuple[jax.Array, jax.Array],
           k: int) -> tuple[jax.Array, jax.Array]:
    """Top k of the running best ([q, k] scores, indices) and candidates ([q, m], [q, m]).

    The running best comes first and holds only lower gallery indices, so top_k's preference for
    the earlier position keeps the lower index among equal scores.
    """
    scores = jnp.concatenate([best[0], new[0]], axis=1)
    indices = jnp.concatenate([best[1], new[1]], axis=1)
    top, pos = jax.lax.top_k(scores, k)
    return top, jnp.take_along_axis(indices, pos, axis=1)


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def _top_k_block(queries: jax.Array, gallery: jax.Array, *, k: int,
                 chunk: int) -> tuple[jax.Array, jax.Array]:
    """Top-k cosine of a block of queries over the whole gallery.

    queries [q, d], gallery [g, d] with chunk <= g, any float dtype, rows not normalised.
    Returns (scores float32 [q, k], indices int32 [q, k]).
    """
    q = l2_normalize(queries.astype(jnp.float32))
    g = gallery.shape[0]

    def scores(offset: jax.Array, size: int) -> jax.Array:
        # Normalising each chunk as it is used costs 1/(2q) of its matmul and needs no gallery copy.
        rows = jax.lax.dynamic_slice_in_dim(gallery, offset, size)
        return q @ l2_normalize(rows.astype(jnp.float32)).T  # [q, size]

    def step(best, offset):
        return _merge(best, _candidates(scores(offset, chunk), offset, k), k), None

    init = (jnp.full((q.shape[0], k), -jnp.inf, jnp.float32),
            jnp.zeros((q.shape[0], k), jnp.int32))
    full = g // chunk
    best, _ = jax.lax.scan(step, init, jnp.arange(full, dtype=jnp.int32) * chunk)
    if g % chunk:  # the last, shorter chunk: its own shapes, outside the scan
        offset = jnp.int32(full * chunk)
        best = _merge(best, _candidates(scores(offset, g - full * chunk), offset, k), k)
    return best


def top_k_cosine(queries, gallery, *, k: int = 1, gallery_chunk: int = 4096,
                 query_block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity top-k of every query against the gallery.

    Args:
      queries: float [nq, d].
      gallery: float [ng, d]; rows need not be normalised. A jax.Array is used in place; anything
        else is copied to the device once per call.
      k: how many matches per query (at most ng).
      gallery_chunk: gallery rows compared at a time (bounds memory).
      query_block: queries compared at a time (bounds memory; one compilation for any nq).

    Returns:
      (scores float32 [nq, k], indices int32 [nq, k]), best first; ties keep the lower index.
    """
    queries = np.asarray(queries)
    gallery_shape = np.shape(gallery)
    if queries.ndim != 2 or len(gallery_shape) != 2 or queries.shape[1] != gallery_shape[1]:
        raise ValueError(f"need queries [nq, d] and gallery [ng, d], got {queries.shape} and "
                         f"{gallery_shape}")
    ng = gallery_shape[0]
    if not 1 <= k <= ng:
        raise ValueError(f"k must be in [1, {ng}] for a gallery of {ng}, got {k}")
    # device_put, not jnp.asarray: on CPU, for a NumPy gallery, it adds one gallery size to peak memory
    # where jnp.asarray adds two.
    gallery = jax.device_put(gallery)
    chunk = min(gallery_chunk, ng)
    block = min(query_block, max(len(queries), 1))
    scores, indices = [], []
    for start in range(0, len(queries), block):
        part = queries[start:start + block]
        n = len(part)
        part = np.pad(part, ((0, block - n), (0, 0)))
        s, i = _top_k_block(jnp.asarray(part), gallery, k=k, chunk=chunk)
        scores.append(np.asarray(s)[:n])
        indices.append(np.asarray(i)[:n])
    if not scores:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    return np.concatenate(scores), np.concatenate(indices)
