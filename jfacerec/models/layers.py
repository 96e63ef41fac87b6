"""Building blocks shared by the backbones: normalisation chosen by name."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ("batch", "group", "layer", "instance")


def _divisor_at_most(channels: int, groups: int) -> int:
    """The largest divisor of `channels` that is at most `groups` (GroupNorm needs one)."""
    return max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)


class Norm(nn.Module):
    """Normalisation of a `[batch, ..., channels]` tensor, selected by `kind`.

    - batch: statistics over batch and space; running averages at eval. Under `jit` with the batch
      sharded over the `data` mesh axis, the mean is taken over the global batch.
    - group: `groups` channel groups (reduced to a divisor of the channel count), stats per example.
    - layer: one group spanning all of space and channels (LayerNorm over H, W, C).
    - instance: one group per channel.
    """

    kind: str = "group"
    groups: int = 32
    eps: float = 1e-5
    momentum: float = 0.9
    dtype: Any = jnp.float32
    scale_init: Any = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        channels = x.shape[-1]
        if self.kind == "batch":
            return nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                                epsilon=self.eps, dtype=self.dtype,
                                scale_init=self.scale_init)(x)
        if self.kind == "group":
            groups = _divisor_at_most(channels, self.groups)
        elif self.kind == "layer":
            groups = 1
        elif self.kind == "instance":
            groups = channels
        else:
            raise ValueError(f"unknown norm {self.kind!r}; choose one of {NORMS}")
        return nn.GroupNorm(num_groups=groups, epsilon=self.eps, dtype=self.dtype,
                            scale_init=self.scale_init)(x)


def conv_kernel_init() -> Any:
    """He-normal (fan-out) initialisation, as torchvision and arcface_torch use for convs."""
    return nn.initializers.variance_scaling(2.0, "fan_out", "normal")

