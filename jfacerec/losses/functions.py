"""Losses as pure functions of arrays, and the `get_loss(name)` registry.

Every loss returns a scalar, the mean over the batch, computed in float32 at least (bfloat16
inputs are upcast; float64 inputs stay float64).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, *,
                          label_smoothing: float = 0.0) -> jax.Array:
    """Cross-entropy of softmax(logits) against (smoothed) one-hot labels.

    Args:
      logits: float [batch, num_classes].
      labels: int32 [batch].
      label_smoothing: eps; the target puts 1 - eps on the label and eps / num_classes everywhere.

    Returns:
      float32 scalar, the batch mean.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    logits = _at_least_f32(logits)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    targets = optax.smooth_labels(targets, label_smoothing) if label_smoothing else targets
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def _at_least_f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / |x| along `axis` in float32 or wider, safe at zero."""
    x = _at_least_f32(x)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def cosine_logits(embeddings: jax.Array, class_weights: jax.Array) -> jax.Array:
    """cos(theta_j) between each embedding [B, D] and each class weight column [D, C] -> [B, C]."""
    return l2_normalize(embeddings) @ l2_normalize(class_weights, axis=0)


def _with_target(cos: jax.Array, labels: jax.Array, target: jax.Array) -> jax.Array:
    """cos [B, C] with the label column of each row replaced by target [B]."""
    onehot = jax.nn.one_hot(labels, cos.shape[-1], dtype=bool)
    return jnp.where(onehot, target[:, None], cos)


def _target_cos(cos: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.take_along_axis(cos, labels[:, None], axis=-1)[:, 0]


# Clipping cos away from +-1 keeps d arccos / d cos = -1 / sqrt(1 - cos^2) finite (at most ~700).
_ARCCOS_EPS = 1e-6


def arcface_target(cos_y: jax.Array, margin: float) -> jax.Array:
    """cos(theta + m) while theta + m <= pi, else cos(theta) - m sin(m) (keeps it decreasing).

    Differentiated exactly through arccos (arcface_torch puts the margin under no_grad).
    """
    c = jnp.clip(cos_y, -1.0 + _ARCCOS_EPS, 1.0 - _ARCCOS_EPS)
    theta = jnp.arccos(c)
    return jnp.where(theta + margin <= jnp.pi, jnp.cos(theta + margin),
                     c - margin * jnp.sin(margin))


def arcface_loss(embeddings: jax.Array, class_weights: jax.Array, labels: jax.Array, *,
                 scale: float = 64.0, margin: float = 0.5,
                 label_smoothing: float = 0.0) -> jax.Array:
    """ArcFace (Deng et al. 2019): additive angular margin on the target class.

    embeddings [B, D], class_weights [D, C], labels int32 [B]. Returns the mean cross-entropy.
    """
    cos = cosine_logits(embeddings, class_weights)
    logits = _with_target(cos, labels, arcface_target(_target_cos(cos, labels), margin))
    return softmax_cross_entropy(scale * logits, labels, label_smoothing=label_smoothing)


def cosface_loss(embeddings: jax.Array, class_weights: jax.Array, labels: jax.Array, *,
                 scale: float = 64.0, margin: float = 0.35,
                 label_smoothing: float = 0.0) -> jax.Array:
    """CosFace (Wang et al. 2018): target logit s (cos(theta_y) - m), others s cos(theta_j)."""
    cos = cosine_logits(embeddings, class_weights)
    logits = _with_target(cos, labels, cosface_target(_target_cos(cos, labels), margin))
    return softmax_cross_entropy(scale * logits, labels, label_smoothing=label_smoothing)


def cosface_target(cos_y: jax.Array, margin: float) -> jax.Array:
    """cos(theta_y) - m."""
    return cos_y - margin


def combined_margin_loss(embeddings: jax.Array, class_weights: jax.Array, labels: jax.Array, *,
                         scale: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                         label_smoothing: float = 0.0) -> jax.Array:
    """insightface's combined margin: target s (cos(m1 theta_y + m2) - m3).

    (1, 0, 0) is the normalised softmax, (m, 0, 0) SphereFace's multiplicative margin,
    (1, m, 0) ArcFace without its fallback, (1, 0, m) CosFace.
    """
    cos = cosine_logits(embeddings, class_weights)
    target = combined_target(_target_cos(cos, labels), m1, m2, m3)
    return softmax_cross_entropy(scale * _with_target(cos, labels, target), labels,
                                 label_smoothing=label_smoothing)


def combined_target(cos_y: jax.Array, m1: float, m2: float, m3: float) -> jax.Array:
    """cos(m1 theta_y + m2) - m3, through a clipped arccos (finite gradient)."""
    c = jnp.clip(cos_y, -1.0 + _ARCCOS_EPS, 1.0 - _ARCCOS_EPS)
    return jnp.cos(m1 * jnp.arccos(c) + m2) - m3


def sphereface_psi(theta: jax.Array, margin: int) -> jax.Array:
    """psi(theta) = (-1)^k cos(m theta) - 2k for theta in [k pi / m, (k + 1) pi / m]."""
    k = jnp.clip(jnp.floor(margin * theta / jnp.pi), 0, margin - 1)
    sign = 1.0 - 2.0 * jnp.mod(k, 2)
    return sign * jnp.cos(margin * theta) - 2.0 * k


def sphereface_loss(embeddings: jax.Array, class_weights: jax.Array, labels: jax.Array, *,
                    margin: int = 4, scale: float | None = None, label_smoothing: float = 0.0,
                    anneal_lambda: float | jax.Array = 0.0) -> jax.Array:
    """SphereFace / A-Softmax (Liu et al. 2017) with normalised class weights.

    Target logit |x| psi(theta_y), other logits |x| cos(theta_j); `scale` replaces |x| by a fixed
    number. With `anneal_lambda` (lambda >= 0, decayed over training by the caller) the target is
    (lambda |x| cos(theta_y) + |x| psi(theta_y)) / (1 + lambda).
    """
    if int(margin) != margin or margin < 1:
        raise ValueError(f"SphereFace needs a positive integer margin, got {margin}")
    x = _at_least_f32(embeddings)
    norm = sphereface_row_scale(x, scale)
    cos = cosine_logits(x, class_weights)
    target = sphereface_target(_target_cos(cos, labels), margin, anneal_lambda)
    logits = norm[:, None] * _with_target(cos, labels, target)
    return softmax_cross_entropy(logits, labels, label_smoothing=label_smoothing)


def sphereface_target(cos_y: jax.Array, margin: int,
                      anneal_lambda: float | jax.Array = 0.0) -> jax.Array:
    """(lambda cos(theta_y) + psi(theta_y)) / (1 + lambda), cos clipped for a finite arccos."""
    cos_y = jnp.clip(cos_y, -1.0 + _ARCCOS_EPS, 1.0 - _ARCCOS_EPS)
    psi = sphereface_psi(jnp.arccos(cos_y), int(margin))
    return (anneal_lambda * cos_y + psi) / (1.0 + anneal_lambda)


def sphereface_row_scale(embeddings: jax.Array, scale: float | None) -> jax.Array:
    """SphereFace's logit scale per row [B]: the embedding norm |x|, or a fixed `scale`."""
    x = _at_least_f32(embeddings)
    if scale is None:
        return jnp.sqrt(jnp.sum(x * x, axis=-1))
    return jnp.full(x.shape[:1], scale, x.dtype)


def _distances(embeddings: jax.Array) -> jax.Array:
    """Euclidean distances [B, B] between L2-normalised embeddings; gradient-safe at zero."""
    x = l2_normalize(embeddings)
    d2 = jnp.maximum(2.0 - 2.0 * x @ x.T, 0.0)
    return jnp.sqrt(jnp.maximum(d2, 1e-12))


TRIPLET_MINING = ("batch_all", "batch_hard", "semi_hard")


def triplet_loss(embeddings: jax.Array, labels: jax.Array, *, margin: float = 0.2,
                 mining: str = "batch_all") -> jax.Array:
    """Triplet loss (Schroff et al. 2015) relu(d(a, p) - d(a, n) + margin), mined in the batch.

    Embeddings [B, D] are L2-normalised; d is Euclidean. Mining, all with masks:
    - batch_all: the mean over valid triplets whose loss is positive;
    - batch_hard (Hermans et al. 2017): per anchor, the farthest positive and nearest negative;
    - semi_hard (FaceNet): per positive pair, the nearest negative farther than the positive if it
      lies within the margin, else the nearest negative of all.
    Anchors without a positive or a negative in the batch contribute nothing; 0 if none remain.
    """
    d = _distances(embeddings)
    same = labels[:, None] == labels[None, :]
    eye = jnp.eye(len(labels), dtype=bool)
    pos = same & ~eye  # [a, p]
    neg = ~same  # [a, n]
    if mining == "batch_all":
        loss = jax.nn.relu(d[:, :, None] - d[:, None, :] + margin)  # [a, p, n]
        valid = pos[:, :, None] & neg[:, None, :]
        active = valid & (loss > 1e-16)
        return jnp.sum(jnp.where(active, loss, 0.0)) / jnp.maximum(jnp.sum(active), 1)
    big = 4.0  # larger than any distance between unit vectors (at most 2)
    if mining == "batch_hard":
        hardest_pos = jnp.max(jnp.where(pos, d, -big), axis=1)
        hardest_neg = jnp.min(jnp.where(neg, d, big), axis=1)
        ok = jnp.any(pos, axis=1) & jnp.any(neg, axis=1)
        loss = jax.nn.relu(hardest_pos - hardest_neg + margin)
        return jnp.sum(jnp.where(ok, loss, 0.0)) / jnp.maximum(jnp.sum(ok), 1)
    if mining == "semi_hard":
        d_ap = d[:, :, None]  # [a, p, 1]
        d_an = d[:, None, :]  # [a, 1, n]
        band = neg[:, None, :] & (d_an > d_ap) & (d_an < d_ap + margin)
        semi = jnp.min(jnp.where(band, d_an, big), axis=2)  # [a, p]
        hardest = jnp.min(jnp.where(neg, d, big), axis=1)[:, None]  # [a, 1]
        chosen = jnp.where(jnp.any(band, axis=2), semi, hardest)
        ok = pos & jnp.any(neg, axis=1)[:, None]
        loss = jax.nn.relu(d - chosen + margin)
        return jnp.sum(jnp.where(ok, loss, 0.0)) / jnp.maximum(jnp.sum(ok), 1)
    raise ValueError(f"unknown triplet mining {mining!r}; choose one of {TRIPLET_MINING}")


def explicit_triplet_loss(anchor: jax.Array, positive: jax.Array, negative: jax.Array, *,
                          margin: float = 0.2) -> jax.Array:
    """The course's triplet mode: given triplets [B, D] each, mean relu(d(a,p) - d(a,n) + m)."""
    a, p, n = l2_normalize(anchor), l2_normalize(positive), l2_normalize(negative)
    d_ap = jnp.sqrt(jnp.maximum(jnp.sum((a - p) ** 2, -1), 1e-12))
    d_an = jnp.sqrt(jnp.maximum(jnp.sum((a - n) ** 2, -1), 1e-12))
    return jnp.mean(jax.nn.relu(d_ap - d_an + margin))


def center_loss(embeddings: jax.Array, centers: jax.Array, labels: jax.Array) -> jax.Array:
    """Center loss (Wen et al. 2016): 0.5 * mean_i |x_i - c_{y_i}|^2.

    embeddings [B, D], centers [num_classes, D] (one row per class), labels int32 [B].
    """
    diff = _at_least_f32(embeddings) - centers[labels]
    return 0.5 * jnp.mean(jnp.sum(diff * diff, axis=-1))


def center_update(centers: jax.Array, embeddings: jax.Array, labels: jax.Array,
                  alpha: float) -> jax.Array:
    """The paper's rule: c_j -= alpha * sum_{i: y_i = j} (c_j - x_i) / (1 + n_j)."""
    x = jax.lax.stop_gradient(embeddings).astype(centers.dtype)
    onehot = jax.nn.one_hot(labels, centers.shape[0], dtype=centers.dtype)  # [B, C]
    counts = jnp.sum(onehot, axis=0)  # [C]
    sums = onehot.T @ x  # [C, D]
    delta = (counts[:, None] * centers - sums) / (1.0 + counts[:, None])
    return centers - alpha * delta


# A loss's inputs, so that the training objective knows what to hand each registered loss.
LOGITS, MARGIN, METRIC, CENTER = "logits", "margin", "metric", "center"

_LOSSES: dict[str, tuple[Callable[..., jax.Array], str]] = {
    "softmax": (softmax_cross_entropy, LOGITS),
    "arcface": (arcface_loss, MARGIN),
    "cosface": (cosface_loss, MARGIN),
    "sphereface": (sphereface_loss, MARGIN),
    "combined": (combined_margin_loss, MARGIN),
    "triplet": (triplet_loss, METRIC),
    "center": (center_loss, CENTER),
}


def get_loss(name: str) -> Callable[..., jax.Array]:
    """The loss function registered under `name`."""
    return _entry(name)[0]


def loss_kind(name: str) -> str:
    """What the loss takes: LOGITS, MARGIN (embeddings + class weights), METRIC or CENTER."""
    return _entry(name)[1]


def _entry(name: str):
    try:
        return _LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; registered: {sorted(_LOSSES)}") from None
