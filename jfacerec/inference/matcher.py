"""Jitted, batched cosine-similarity search: the best k gallery entries for every query.

The gallery is walked in fixed-size chunks with `lax.scan`, keeping a running top-k, so memory is
`O(queries_per_block * gallery_chunk)` however large the gallery. Queries are processed in fixed-size
blocks too, so one compiled program serves any number of queries. Every score comes from a matmul of
the same shape: XLA picks its kernel by shape, and two kernels can round the same dot product
differently, which would split a tie between equal gallery rows.

The matmul is nearly the whole cost (benchmarks/matcher.py). Each [queries, chunk] score block is
first reduced to maxima over small groups, and the top k are picked among the few groups that can
hold them (`_candidates`): a top_k over the whole block would cost as much as the matmul again. Each
gallery chunk is normalised as the scan reaches it, so no normalised copy of the gallery is made.

A gallery too large for one device is split by rows over every device of a mesh (`shard_gallery`):
each device runs the same chunked search over its own rows, and the devices' [queries, k] results
are gathered and merged. Each device then holds its 1/n of the gallery and the same fixed-size
working set, and the answer is the single-device one, ties included.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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


def _chunk_rows(ng: int, gallery_chunk: int) -> int:
    """Rows per chunk for a gallery of ng rows: as many chunks as gallery_chunk-row ones would take,
    made about equal, so that the last one, moved back to end at row ng, repeats few rows.

    Rounded up to whole `_GROUP`s where that stays within gallery_chunk: a chunk of whole groups has
    no leftover columns to append in `_candidates` (a 10,000-row gallery: about 15% faster).
    """
    rows = -(-ng // -(-ng // gallery_chunk))
    grouped = -(-rows // _GROUP) * _GROUP
    return min(ng, grouped if grouped <= gallery_chunk else rows)


def _top(scores: jax.Array, indices: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k best of scores [q, m] with their indices [q, m]; equal scores keep the earlier one."""
    top, pos = jax.lax.top_k(scores, k)
    return top, jnp.take_along_axis(indices, pos, axis=1)


def _merge(best: tuple[jax.Array, jax.Array], new: tuple[jax.Array, jax.Array],
           k: int) -> tuple[jax.Array, jax.Array]:
    """Top k of the running best ([q, k] scores, indices) and candidates ([q, m], [q, m]).

    The running best comes first and holds only lower gallery indices, so top_k's preference for
    the earlier position keeps the lower index among equal scores.
    """
    return _top(jnp.concatenate([best[0], new[0]], axis=1),
                jnp.concatenate([best[1], new[1]], axis=1), k)


def _search(q: jax.Array, gallery: jax.Array, *, k: int, chunk: int, start: jax.Array | int = 0,
            real: jax.Array | None = None,
            axes: tuple[str, ...] = ()) -> tuple[jax.Array, jax.Array]:
    """Top-k of unit-norm queries q float32 [b, d] over gallery [g, d] (chunk <= g), chunk by chunk.

    Gallery row r is reported as index start + r. With `real`, rows r >= real are padding and score
    -inf, so they never outrank a real row. Inside a shard_map, `axes` are the mesh axes the gallery
    is split over. Returns (scores float32 [b, k], indices int32 [b, k]), ordered by score, then
    index.
    """
    g = gallery.shape[0]
    full = g // chunk

    def candidates(offset: jax.Array, seen: int = 0) -> tuple[jax.Array, jax.Array]:
        """Candidates of rows offset .. offset + chunk, where rows below `seen` score -inf."""
        # Normalising each chunk as it is used costs 1/(2b) of its matmul and needs no gallery copy.
        rows = jax.lax.dynamic_slice_in_dim(gallery, offset, chunk)
        scores = q @ l2_normalize(rows.astype(jnp.float32)).T  # [b, chunk]
        row = jnp.arange(chunk, dtype=jnp.int32) + offset
        if seen:
            scores = jnp.where(row >= seen, scores, -jnp.inf)
        if real is not None:
            scores = jnp.where(row < real, scores, -jnp.inf)
        return _candidates(scores, offset + start, k)

    def step(best, offset):
        return _merge(best, candidates(offset), k), None

    init = (jnp.full((q.shape[0], k), -jnp.inf, jnp.float32),
            jnp.zeros((q.shape[0], k), jnp.int32))
    if axes:  # shard_map types the scan's carry as per-device (it is, after the first chunk)
        init = jax.lax.pcast(init, axes, to="varying")
    best, _ = jax.lax.scan(step, init, jnp.arange(full, dtype=jnp.int32) * chunk)
    if g % chunk:
        # The rows after the last whole chunk are searched as the whole chunk that ends at row g
        # (its rows already searched masked to -inf), so that its matmul has the same shape as the
        # others.
        best = _merge(best, candidates(jnp.int32(g - chunk), seen=full * chunk), k)
    return best


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def _top_k_block(queries: jax.Array, gallery: jax.Array, *, k: int,
                 chunk: int) -> tuple[jax.Array, jax.Array]:
    """Top-k cosine of a block of queries over the whole gallery.

    queries [q, d], gallery [g, d] with chunk <= g, any float dtype, rows not normalised.
    Returns (scores float32 [q, k], indices int32 [q, k]).
    """
    return _search(l2_normalize(queries.astype(jnp.float32)), gallery, k=k, chunk=chunk)


@dataclasses.dataclass(frozen=True)
class ShardedGallery:
    """A gallery [size, d] split by rows over every device of a mesh (made by `shard_gallery`).

    rows: [devices * per_device, d]; device i (in the order of the mesh's devices, flattened) holds
    rows i * per_device onwards. Rows from `size` on are zero padding, never returned.
    """

    rows: jax.Array
    size: int

    @property
    def mesh(self) -> Mesh:
        return self.rows.sharding.mesh

    @property
    def shape(self) -> tuple[int, int]:
        return self.size, self.rows.shape[1]


def shard_gallery(gallery: np.ndarray, mesh: Mesh) -> ShardedGallery:
    """Places gallery [ng, d] on the mesh, rows split over all its devices, for `top_k_cosine`.

    Each device's rows are sliced from `gallery` and copied to that device alone, so the whole
    gallery is never gathered on one device (a np.memmap is read shard by shard). ng need not divide
    the device count: the last shards are padded with zero rows.
    """
    if np.ndim(gallery) != 2:
        raise ValueError(f"need a gallery [ng, d], got shape {np.shape(gallery)}")
    ng, d = gallery.shape
    padded = -(-ng // mesh.size) * mesh.size

    def rows(index: tuple[slice, ...]) -> np.ndarray:
        start, stop, _ = index[0].indices(padded)
        block = np.asarray(gallery[min(start, ng):min(stop, ng)])
        if len(block) == stop - start:
            return block
        return np.pad(block, ((0, stop - start - len(block)), (0, 0)))

    sharding = NamedSharding(mesh, P(mesh.axis_names))
    return ShardedGallery(jax.make_array_from_callback((padded, d), sharding, rows), ng)


@functools.partial(jax.jit, static_argnames=("mesh", "k", "chunk", "size"))
def _sharded_top_k_block(queries: jax.Array, rows: jax.Array, *, mesh: Mesh, k: int, chunk: int,
                         size: int) -> tuple[jax.Array, jax.Array]:
    """`_top_k_block` over a ShardedGallery's rows: a top k on every device, then one merge.

    queries [q, d] (replicated), rows [n * per_device, d] split over the mesh's n devices, of which
    the first `size` are real; chunk <= size. Returns (scores float32 [q, k], indices int32 [q, k]).
    """
    axes = mesh.axis_names
    per_device = rows.shape[0] // mesh.size

    def local(queries: jax.Array, shard: jax.Array) -> tuple[jax.Array, jax.Array]:
        start = jax.lax.axis_index(axes) * per_device
        # Every matmul has the [q, chunk] shape of the single-device search, so every score is
        # rounded exactly as there: a shard smaller than a chunk is padded up to one (a copy of at
        # most one chunk).
        if per_device < chunk:
            shard = jnp.pad(shard, ((0, chunk - per_device), (0, 0)))
        padded = per_device < chunk or rows.shape[0] > size
        return _search(l2_normalize(queries.astype(jnp.float32)), shard, k=k, chunk=chunk,
                       start=start, real=jnp.minimum(size - start, per_device) if padded else None,
                       axes=axes)

    # [q, n * k] in device order, which is gallery order, and each device's k are ordered by score
    # then index: top_k's preference for the earlier of equal scores keeps the lower index.
    every = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes)),
                          out_specs=(P(None, axes), P(None, axes)))(queries, rows)
    return _top(*every, k)


def top_k_cosine(queries, gallery, *, k: int = 1, gallery_chunk: int = 4096,
                 query_block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity top-k of every query against the gallery.

    Args:
      queries: float [nq, d].
      gallery: float [ng, d]; rows need not be normalised. A jax.Array is used in place; a
        ShardedGallery (`shard_gallery`) is searched on every device of its mesh, with the same
        result; anything else is copied to the device once per call.
      k: how many matches per query (at most ng).
      gallery_chunk: at most this many gallery rows compared at a time, per device (bounds
        memory).
      query_block: queries compared at a time (bounds memory; one compilation for any nq).

    Returns:
      (scores float32 [nq, k], indices int32 [nq, k]), best first; ties keep the lower index.
    """
    queries = np.asarray(queries)
    sharded = isinstance(gallery, ShardedGallery)
    gallery_shape = gallery.shape if sharded else np.shape(gallery)
    if queries.ndim != 2 or len(gallery_shape) != 2 or queries.shape[1] != gallery_shape[1]:
        raise ValueError(f"need queries [nq, d] and gallery [ng, d], got {queries.shape} and "
                         f"{gallery_shape}")
    ng = gallery_shape[0]
    if not 1 <= k <= ng:
        raise ValueError(f"k must be in [1, {ng}] for a gallery of {ng}, got {k}")
    chunk = _chunk_rows(ng, gallery_chunk)
    if sharded:
        search = functools.partial(_sharded_top_k_block, rows=gallery.rows, mesh=gallery.mesh, k=k,
                                   chunk=chunk, size=ng)
        place = functools.partial(jax.device_put, device=NamedSharding(gallery.mesh, P()))
    else:
        # device_put, not jnp.asarray: on CPU, for a NumPy gallery, it adds one gallery size to
        # peak memory where jnp.asarray adds two.
        search = functools.partial(_top_k_block, gallery=jax.device_put(gallery), k=k, chunk=chunk)
        place = jnp.asarray
    block = min(query_block, max(len(queries), 1))
    scores, indices = [], []
    for start in range(0, len(queries), block):
        part = queries[start:start + block]
        n = len(part)
        s, i = search(place(np.pad(part, ((0, block - n), (0, 0)))))
        scores.append(np.asarray(s)[:n])
        indices.append(np.asarray(i)[:n])
    if not scores:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    return np.concatenate(scores), np.concatenate(indices)
