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



CONV_KINDS = ("standard", "depthwise", "pointwise", "separable")


def _out_size(size: int, kernel: int, stride: int, padding: str) -> int:
    return -(-size // stride) if padding == "SAME" else (size - kernel) // stride + 1


def conv_multiplies(kind: str, height: int, width: int, in_channels: int, out_channels: int,
                    kernel: int, *, stride: int = 1, padding: str = "SAME",
                    multiplier: int = 1) -> int:
    """Multiplications one convolution layer performs on one [height, width, in_channels] input.

    standard:  H' W' N M K^2;  depthwise: H' W' M mult K^2 (N = M mult);  pointwise: H W N M;
    separable: depthwise (mult 1) then pointwise, H' W' M K^2 + H' W' M N.
    """
    h = _out_size(height, kernel, stride, padding)
    w = _out_size(width, kernel, stride, padding)
    if kind == "standard":
        return h * w * out_channels * kernel * kernel * in_channels
    if kind == "depthwise":
        return h * w * in_channels * multiplier * kernel * kernel
    if kind == "pointwise":
        return _out_size(height, 1, stride, padding) * _out_size(width, 1, stride, padding) * \
            in_channels * out_channels
    if kind == "separable":
        return h * w * in_channels * kernel * kernel + h * w * in_channels * out_channels
    raise ValueError(f"unknown conv kind {kind!r}; choose one of {CONV_KINDS}")


def conv_parameters(kind: str, in_channels: int, out_channels: int, kernel: int, *,
                    bias: bool = False, multiplier: int = 1) -> int:
    """Parameters of one convolution layer: standard N M K^2 (+N), separable M K^2 + N M (+M+N)."""
    if kind == "standard":
        return out_channels * in_channels * kernel * kernel + (out_channels if bias else 0)
    if kind == "depthwise":
        n = in_channels * multiplier
        return n * kernel * kernel + (n if bias else 0)
    if kind == "pointwise":
        return in_channels * out_channels + (out_channels if bias else 0)
    if kind == "separable":
        return (in_channels * kernel * kernel + in_channels * out_channels
                + ((in_channels + out_channels) if bias else 0))
    raise ValueError(f"unknown conv kind {kind!r}; choose one of {CONV_KINDS}")


class Conv(nn.Module):
    """One convolution of a given kind on [batch, height, width, channels].

    standard: a full k x k conv to `features`; depthwise: one k x k filter per input channel
    (groups = input channels), `multiplier` outputs each, so `features` is ignored; pointwise:
    1 x 1; separable: depthwise (multiplier 1), then pointwise to `features`.
    """

    kind: str
    features: int
    kernel: int = 3
    strides: int = 1
    multiplier: int = 1
    use_bias: bool = False
    padding: str = "SAME"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, s, groups, name: nn.Conv(  # noqa: E731
            f, (k, k), (s, s), padding=self.padding, feature_group_count=groups,
            use_bias=self.use_bias, kernel_init=conv_kernel_init(), dtype=self.dtype, name=name)
        channels = x.shape[-1]
        if self.kind == "standard":
            return conv(self.features, self.kernel, self.strides, 1, "conv")(x)
        if self.kind == "depthwise":
            return conv(channels * self.multiplier, self.kernel, self.strides, channels,
                        "depthwise")(x)
        if self.kind == "pointwise":
            return conv(self.features, 1, self.strides, 1, "pointwise")(x)
        if self.kind == "separable":
            x = conv(channels, self.kernel, self.strides, channels, "depthwise")(x)
            return conv(self.features, 1, 1, 1, "pointwise")(x)
        raise ValueError(f"unknown conv kind {self.kind!r}; choose one of {CONV_KINDS}")


class PReLU(nn.Module):
    """PReLU with one slope per channel (PyTorch's nn.PReLU(C)), initialised at 0.25."""

    slope_init: float = 0.25

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        alpha = self.param("alpha", nn.initializers.constant(self.slope_init), (x.shape[-1],),
                           jnp.float32)
        return jnp.where(x >= 0, x, alpha.astype(x.dtype) * x)


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018): drops contiguous block_size x block_size regions.

    Seeds are drawn with rate gamma = rate / bs^2 * HW / ((H - bs + 1)(W - bs + 1)) inside the
    region where a whole block fits, grown into blocks by a max-pool, and kept activations are
    rescaled by (all / kept) like dropout. Identity at eval or with rate 0. Needs the "dropout" rng.
    """

    rate: float = 0.1
    block_size: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        _, h, w, _ = x.shape
        bs = min(self.block_size, h, w)
        gamma = self.rate / (bs * bs) * (h * w) / ((h - bs + 1) * (w - bs + 1))
        seed_shape = (x.shape[0], h - bs + 1, w - bs + 1, x.shape[-1])
        seeds = jax.random.bernoulli(self.make_rng("dropout"), gamma, seed_shape)
        lo, hi = bs // 2, (bs - 1) // 2
        seeds = jnp.pad(seeds.astype(jnp.float32), ((0, 0), (lo, hi), (lo, hi), (0, 0)))
        dropped = nn.max_pool(seeds, (bs, bs), padding="SAME")
        keep = 1.0 - dropped
        scale = keep.size / jnp.maximum(jnp.sum(keep), 1.0)
        return (x * keep * scale).astype(x.dtype)
