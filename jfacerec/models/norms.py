"""Normalisations chosen by name (`Norm`), with flax's variables and a hand-written backward.

`Norm` and its submodules keep flax's BatchNorm / GroupNorm variables and module names, so
checkpoints carry over; `_normalize` computes both, its custom VJP doing in two passes over the
activations what autodiff does in several.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ("batch", "group", "layer", "instance")


def _divisor_at_most(channels: int, groups: int) -> int:
    """The largest divisor of `channels` that is at most `groups` (GroupNorm needs one)."""
    return max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, over_batch: bool,
               eps: float, dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Normalises x [batch, positions, channels] per group of channels, then scales and shifts.

    Statistics are taken over the positions and the group's channels, and also over the batch
    when `over_batch` (BatchNorm: one group per channel). scale, bias: float32 [channels].
    Returns y [batch, positions, channels] in `dtype`, and the mean and var [1 or batch, groups]:
    flax's BatchNorm / GroupNorm arithmetic (statistics in float32 or wider, var = E[x^2] -
    E[x]^2 clipped at 0, y = (x - mean) * scale / sqrt(var + eps) + bias).

    Why not flax's modules: the gradient autodiff derives from them is several passes over the
    activations per norm; the backward below is one reducing pass over (dy, x) and one
    elementwise pass. Every large reduction is a per-channel sum over positions (and batch),
    which XLA:CPU hands to its fast reduction library; the group sums come after, on
    [batch, channels].
    """
    return _normalize_fwd(x, scale, bias, groups, over_batch, eps, dtype)[0]


def _per_channel(x: jax.Array, over_batch: bool) -> jax.Array:
    """Sums of x [batch, positions, channels] over positions (and batch): [1 or batch, channels]."""
    return jnp.sum(x, (0, 1))[None] if over_batch else jnp.sum(x, 1)


def _group_sum(x: jax.Array, groups: int) -> jax.Array:
    """[rows, channels] -> [rows, groups]: sums over each group's consecutive channels."""
    return jnp.sum(x.reshape(x.shape[0], groups, -1), -1)


def _count(x: jax.Array, groups: int, over_batch: bool) -> int:
    """How many values of x [batch, positions, channels] each group's statistics cover."""
    return x.shape[1] * x.shape[2] // groups * (x.shape[0] if over_batch else 1)


def _to_channels(x: jax.Array, channels: int) -> jax.Array:
    """[rows, groups] -> [rows, 1, channels]: each group's value on each of its channels."""
    return jnp.repeat(x, channels // x.shape[1], axis=1)[:, None, :]


def _normalize_fwd(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
                   over_batch: bool, eps: float, dtype: Any) -> tuple[tuple, tuple]:
    """(_normalize's outputs, the residuals its backward needs)."""
    channels, count = x.shape[2], _count(x, groups, over_batch)
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = _group_sum(_per_channel(x32, over_batch), groups) / count
    var = jnp.maximum(_group_sum(_per_channel(x32 * x32, over_batch), groups) / count
                      - mean * mean, 0.0)
    inv = jax.lax.rsqrt(var + eps)
    y = (x32 - _to_channels(mean, channels)) * (_to_channels(inv, channels) * scale) + bias
    return (y.astype(dtype), mean, var), (x, scale, mean, inv)


def _normalize_bwd(groups: int, over_batch: bool, eps: float, dtype: Any, residuals: tuple,
                   cotangents: tuple) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cotangents of (x, scale, bias) from those of (y, mean, var)."""
    del eps, dtype
    x, scale, mean, inv = residuals
    dy, dmean, dvar = cotangents
    channels, count = x.shape[2], _count(x, groups, over_batch)
    dy = dy.astype(mean.dtype)
    centred = x.astype(mean.dtype) - _to_channels(mean, channels)
    inv_c = _to_channels(inv, channels)  # [rows, 1, channels]
    # One pass over (dy, x): per channel, the sums of dy and of dy * (x - mean).
    sum_dy = _per_channel(dy, over_batch)
    sum_dyc = _per_channel(dy * centred, over_batch)
    dbias = jnp.sum(sum_dy, 0)
    dscale = jnp.sum(sum_dyc * inv_c[:, 0], 0)  # sum of dy * xhat, xhat = (x - mean) * inv
    # With dxhat = dy * scale: dx = inv (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), plus the
    # mean and var outputs' own cotangents (d mean / dx = 1 / n, d var / dx = 2 (x - mean) / n),
    # gathered as dx = inv * scale * dy + c1 * (x - mean) + c0, c1 and c0 per group.
    g = _group_sum(scale * sum_dy, groups)  # sum of dxhat
    gx = _group_sum(scale * sum_dyc, groups) * inv  # sum of dxhat * xhat
    c1 = (2.0 * dvar - inv * inv * gx) / count
    c0 = (dmean - inv * g) / count
    dx = dy * (inv_c * scale) + centred * _to_channels(c1, channels) + _to_channels(c0, channels)
    return dx.astype(x.dtype), dscale, dbias


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


class _BatchNorm(nn.Module):
    """flax's nn.BatchNorm over every axis but the last: the same variables and arithmetic."""

    momentum: float
    eps: float
    dtype: Any
    scale_init: Any

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        channels = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        scale = self.param("scale", self.scale_init, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        if not train:
            y = (x.astype(jnp.float32) - ra_mean.value) * (
                jax.lax.rsqrt(ra_var.value + self.eps) * scale) + bias
            return y.astype(self.dtype)
        y, mean, var = _normalize(x.reshape(x.shape[0], -1, channels), scale, bias, channels,
                                  True, self.eps, self.dtype)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean[0]
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var[0]
        return y.reshape(x.shape)


class _GroupNorm(nn.Module):
    """flax's nn.GroupNorm: per example, statistics over space and each group's channels."""

    groups: int
    eps: float
    dtype: Any
    scale_init: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", self.scale_init, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        y, _, _ = _normalize(x.reshape(x.shape[0], -1, channels), scale, bias, self.groups,
                             False, self.eps, self.dtype)
        return y.reshape(x.shape)


class Norm(nn.Module):
    """Normalisation of a `[batch, ..., channels]` tensor, selected by `kind`.

    - batch: statistics over batch and space; running averages at eval. Under `jit` with the batch
      sharded over the `data` mesh axis, the mean is taken over the global batch.
    - group: `groups` channel groups (reduced to a divisor of the channel count), stats per example.
    - layer: one group spanning all of space and channels (LayerNorm over H, W, C).
    - instance: one group per channel.

    Variables and outputs are those of flax's nn.BatchNorm and nn.GroupNorm, in submodules of the
    same names (BatchNorm_0, GroupNorm_0) so that checkpoints carry over; see `_normalize` for
    why the arithmetic is written out here.
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
            return _BatchNorm(self.momentum, self.eps, self.dtype, self.scale_init,
                              name="BatchNorm_0")(x, train=train)
        if self.kind == "group":
            groups = _divisor_at_most(channels, self.groups)
        elif self.kind == "layer":
            groups = 1
        elif self.kind == "instance":
            groups = channels
        else:
            raise ValueError(f"unknown norm {self.kind!r}; choose one of {NORMS}")
        return _GroupNorm(groups, self.eps, self.dtype, self.scale_init, name="GroupNorm_0")(x)

