"""Softmax cross-entropy over class weights split by columns across the mesh's `model` axis.

Each device holds a [dim, C / model] slice of the class weights and computes only its own logits
[batch / data, C / model]; the softmax's max and sum of exponentials, the target logit and (for
label smoothing) the sum of the logits are reduced across `model` with pmax / psum. No device ever
holds all the classes, so a million identities train on devices that could not hold their logits.

Margin losses (ArcFace, CosFace, SphereFace, combined) change the target logit, whose column lives
on one shard: its cosine is summed across the shards (zero elsewhere), margined, and written back.

PartialFC (An et al. 2022): with `sample_rate` r < 1 each shard keeps the positive classes of the
global batch that it holds plus random negatives, about r of its columns (as insightface's
partial_fc_v2), and the softmax runs over those; only they get gradient. A shard keeps at least as
many columns as the global batch has rows, so every positive fits (fixed shapes under jit).

The columns must split evenly over `model` (shard_map's equal blocks): a class count that does not
is padded (core/parallel.py padded_classes). Padded columns are masked out: no probability in the
softmax, never a margin's target, never the top-1, never a sampled negative, so no gradient.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from jfacerec.core import parallel
from jfacerec.losses import functions as losses
from jfacerec.core.parallel import DATA_AXIS, MODEL_AXIS

# (target cosine [b], embeddings [b, D]) -> (target logit before scaling [b], scale: [b] or scalar)
MarginFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class ShardedHead:
    """The classifier head of a step, as the sharded losses see it.

    kernel [dim, columns] and bias [columns] (None for the cosine head) are the model's
    `params["classifier"]`, split over `model` by columns; `rng` draws PartialFC's negatives.
    The first `num_classes` columns are classes (0: all of them), the rest padding.
    """

    mesh: Mesh
    kind: str  # "linear" (x W + b) or "cosine" (scale * cos)
    scale: float  # the cosine head's scale
    kernel: jax.Array
    bias: jax.Array | None
    sample_rate: float
    rng: jax.Array
    num_classes: int = 0

    @property
    def columns(self) -> int:
        return self.kernel.shape[-1]

    @property
    def classes(self) -> int:
        return self.num_classes or self.columns


def _options(fn: Callable, options: dict[str, Any]) -> dict[str, Any]:
    """The loss function's keyword defaults updated with `options` (one source of defaults)."""
    defaults = {name: p.default for name, p in inspect.signature(fn).parameters.items()
                if p.kind is p.KEYWORD_ONLY}
    unknown = set(options) - set(defaults)
    if unknown:
        raise TypeError(f"{fn.__name__} takes no options {sorted(unknown)}")
    return {**defaults, **options}


def margin_fn(name: str, options: dict[str, Any]) -> MarginFn:
    """The target logit of the margin loss `name` ("arcface", ...) with its `options`."""
    o = _options(losses.get_loss(name), options)
    if name == "arcface":
        return lambda cos_y, x: (losses.arcface_target(cos_y, o["margin"]), o["scale"])
    if name == "cosface":
        return lambda cos_y, x: (losses.cosface_target(cos_y, o["margin"]), o["scale"])
    if name == "combined":
        return lambda cos_y, x: (losses.combined_target(cos_y, o["m1"], o["m2"], o["m3"]),
                                 o["scale"])
    if name == "sphereface":
        return lambda cos_y, x: (
            losses.sphereface_target(cos_y, o["margin"], o["anneal_lambda"]),
            losses.sphereface_row_scale(x, o["scale"])[:, None])
    raise ValueError(f"{name!r} is not a margin loss")


def _num_sampled(columns: int, sample_rate: float, global_batch: int) -> int:
    """Columns each shard keeps: about r of them, never fewer than the batch's positives need."""
    if sample_rate >= 1.0:
        return columns
    return min(columns, max(math.ceil(sample_rate * columns), global_batch))


def _per_example(head: ShardedHead, embeddings: jax.Array, labels: jax.Array,
                 margin: MarginFn | None, label_smoothing: float) -> tuple[jax.Array, jax.Array]:
    """(cross-entropy [batch], top-1 correct [batch]) with the class weights split over `model`.

    embeddings [batch, dim], labels int32 [batch]; the margin (None: the head's own logits) changes
    the target logit. Correctness uses the head's logits without margin, as the unsharded metric.
    """
    mesh = head.mesh
    parallel.check_class_split(head.columns, mesh)
    if head.classes > head.columns:
        raise ValueError(f"{head.classes} classes do not fit a head of {head.columns} columns")
    columns = head.columns // mesh.shape[MODEL_AXIS]
    # Static: the masks cost a logit-sized temporary each, so only a padded head pays for them.
    padded = head.classes < head.columns
    keep = _num_sampled(columns, head.sample_rate, labels.shape[0])
    bias = head.bias if head.bias is not None else jnp.zeros((head.columns,))

    def body(x, w, b, y, key_data):
        # x [b, D] (this data shard's rows, on each of its model shards), w [D, c], b [c], y [b].
        first = lax.axis_index(MODEL_AXIS) * columns
        cols = first + jnp.arange(columns)  # global class of each local column
        if keep < columns:
            # Positives of the whole global batch that this shard holds are always kept.
            local = lax.all_gather(y, DATA_AXIS, tiled=True) - first
            local = jnp.where((local >= 0) & (local < columns), local, columns)
            positive = jnp.zeros((columns,), bool).at[local].set(True, mode="drop")
            key = jax.random.fold_in(jax.random.wrap_key_data(key_data),
                                     lax.axis_index(MODEL_AXIS))
            # Positives first, then random classes; padding only where no class is left.
            score = jnp.where(positive, 2.0, jax.random.uniform(key, (columns,)))
            if padded:
                score = jnp.where(cols < head.classes, score, -1.0)
            chosen = jnp.sort(lax.top_k(score, keep)[1])
            w, b, cols = w[:, chosen], b[chosen], cols[chosen]
        onehot = cols[None, :] == y[:, None]  # [b, c]; the label column, on one shard only
        valid = (cols < head.classes)[None, :]  # [1, c]; False on padded columns
        cos = losses.cosine_logits(x, w)
        raw = head.scale * cos if head.kind == "cosine" else x.astype(jnp.float32) @ w + b

        def across(v):  # sum over the classes of every shard: [b, c] -> [b]
            return lax.psum(jnp.sum(v, axis=-1), MODEL_AXIS)

        if margin is None:
            z = raw
        else:
            target, scale = margin(across(jnp.where(onehot, cos, 0.0)), x)
            z = scale * jnp.where(onehot, target[:, None], cos)
        if padded:
            z = jnp.where(valid, z, -jnp.inf)
        z_y = across(jnp.where(onehot, z, 0.0))
        # The max only steadies exp; the log-sum-exp's gradient does not flow through it.
        m = lax.pmax(lax.stop_gradient(jnp.max(z, axis=-1)), MODEL_AXIS)
        lse = m + jnp.log(across(jnp.exp(z - m[:, None])))
        loss = lse - z_y
        if label_smoothing:
            # Target (1 - eps) on the label and eps / K on each of the K classes in the softmax.
            if padded:
                k, z_sum = across(valid.astype(jnp.float32)), across(jnp.where(valid, z, 0.0))
            else:
                k, z_sum = keep * mesh.shape[MODEL_AXIS], across(z)
            loss = lse - (1.0 - label_smoothing) * z_y - label_smoothing / k * z_sum
        # Top-1: the best local score, then the smallest class among the shards that hold the max.
        scores = lax.stop_gradient(raw)
        if padded:
            scores = jnp.where(valid, scores, -jnp.inf)
        best = jnp.max(scores, axis=-1)
        candidate = jnp.where(best == lax.pmax(best, MODEL_AXIS),
                              cols[jnp.argmax(scores, axis=-1)], jnp.iinfo(jnp.int32).max)
        return loss, lax.pmin(candidate, MODEL_AXIS) == y

    rows, by_class = P(DATA_AXIS), P(None, MODEL_AXIS)
    split = jax.shard_map(body, mesh=mesh, in_specs=(rows, by_class, P(MODEL_AXIS), rows, P()),
                          out_specs=(rows, rows))
    return split(embeddings, head.kernel, bias, labels, jax.random.key_data(head.rng))


def cross_entropy(head: ShardedHead, embeddings: jax.Array, labels: jax.Array, *,
                  margin: MarginFn | None = None, label_smoothing: float = 0.0) -> jax.Array:
    """The batch-mean cross-entropy (float32 scalar) of the sharded head, with an optional margin.

    embeddings [batch, dim], labels int32 [batch]. At sample_rate 1 this equals
    `losses.softmax_cross_entropy` on the head's logits (margin None) or the margin loss.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return jnp.mean(_per_example(head, embeddings, labels, margin, label_smoothing)[0])


def accuracy(head: ShardedHead, embeddings: jax.Array, labels: jax.Array) -> jax.Array:
    """The fraction [] of the batch whose highest head logit is its label (over sampled classes)."""
    return jnp.mean(_per_example(head, embeddings, labels, None, 0.0)[1])
