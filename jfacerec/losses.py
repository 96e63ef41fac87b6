"""Losses as pure functions of arrays, and the `get_loss(name)` registry.

Every loss returns a float32 scalar: the mean over the batch.
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
    logits = logits.astype(jnp.float32)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    targets = optax.smooth_labels(targets, label_smoothing) if label_smoothing else targets
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


# A classification loss takes the model outputs and the labels and returns a scalar.
LossFn = Callable[..., jax.Array]

_LOSSES: dict[str, LossFn] = {
    "softmax": softmax_cross_entropy,
}


def get_loss(name: str) -> LossFn:
    """The loss registered under `name`."""
    try:
        return _LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; registered: {sorted(_LOSSES)}") from None
