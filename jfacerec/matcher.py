"""Jitted, batched cosine-similarity search: the best k gallery entries for every query.

The gallery is walked in fixed-size chunks with `lax.scan`, keeping a running top-k, so memory is
`O(queries_per_block * gallery_chunk)` however large the gallery. Queries are processed in fixed-size
blocks too, so one compiled program serves any number of queries.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jfacerec.losses import l2_normalize


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def _top_k_block(queries: jax.Array, gallery: jax.Array, valid: jax.Array, *, k: int,
                 chunk: int) -> tuple[jax.Array, jax.Array]:
    """Top-k cosine over a gallery already padded to a multiple of `chunk`.

    queries [q, d], gallery [g, d] (g % chunk == 0), valid bool [g]. Returns ([q, k], [q, k]).
    """
    q = l2_normalize(queries.astype(jnp.float32))
    chunks = l2_normalize(gallery.astype(jnp.float32)).reshape(-1, chunk, gallery.shape[-1])
    valid = valid.reshape(-1, chunk)

    def step(carry, xs):
        best_s, best_i = carry
        block, ok, offset = xs
        s = jnp.where(ok[None, :], q @ block.T, -jnp.inf)  # [q, chunk]
        s, i = jax.lax.top_k(s, min(k, chunk))
        s = jnp.concatenate([best_s, s], axis=1)
        i = jnp.concatenate([best_i, i + offset], axis=1)
        top_s, pos = jax.lax.top_k(s, k)
        return (top_s, jnp.take_along_axis(i, pos, axis=1)), None

    init = (jnp.full((q.shape[0], k), -jnp.inf, jnp.float32),
            jnp.zeros((q.shape[0], k), jnp.int32))
    offsets = jnp.arange(chunks.shape[0], dtype=jnp.int32) * chunk
    (scores, indices), _ = jax.lax.scan(step, init, (chunks, valid, offsets))
    return scores, indices


def top_k_cosine(queries, gallery, *, k: int = 1, gallery_chunk: int = 16384,
                 query_block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity top-k of every query against the gallery.

    Args:
      queries: float [nq, d].
      gallery: float [ng, d]; rows need not be normalised.
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
    chunk = min(gallery_chunk, ng)
    padded = -(-ng // chunk) * chunk
    gallery = jnp.pad(jnp.asarray(gallery), ((0, padded - ng), (0, 0)))
    valid = jnp.arange(padded) < ng
    block = min(query_block, max(len(queries), 1))
    scores, indices = [], []
    for start in range(0, len(queries), block):
        part = queries[start:start + block]
        n = len(part)
        part = np.pad(part, ((0, block - n), (0, 0)))
        s, i = _top_k_block(jnp.asarray(part), gallery, valid, k=k, chunk=chunk)
        scores.append(np.asarray(s)[:n])
        indices.append(np.asarray(i)[:n])
    if not scores:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    return np.concatenate(scores), np.concatenate(indices)
