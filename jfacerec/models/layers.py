"""The backbones' building blocks: convolutions (`conv2d`, `Conv` and its kinds' counters),
PReLU and DropBlock.

`Norm` and `NORMS` live in norms.py, `conv_general_dilated` (the XLA:CPU speed path) in
xla_cpu.py; they are re-exported here for the modules that import them from layers.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# _divisor_at_most: benchmarks/torch_peers.py sizes its GroupNorms with layers._divisor_at_most.
from jfacerec.models.norms import NORMS, Norm, _divisor_at_most  # noqa: F401
from jfacerec.models.xla_cpu import conv_general_dilated

__all__ = ["CONV_KINDS", "Conv", "DropBlock", "NORMS", "Norm", "PReLU", "conv2d",
           "conv_general_dilated", "conv_kernel_init", "conv_multiplies", "conv_parameters",
           "rematerialised"]


def conv_kernel_init() -> Any:
    """He-normal (fan-out) initialisation, as torchvision and arcface_torch use for convs."""
    return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv2d(features: int, kernel_size: Sequence[int], strides: Sequence[int] = (1, 1),
           **kwargs: Any) -> nn.Conv:
    """The backbones' nn.Conv: their initialiser, computing through `conv_general_dilated`.

    Variables and names are nn.Conv's (so checkpoints carry over); kwargs go to nn.Conv.
    """
    # Read from this module's namespace at each call, so that swapping layers.conv_general_dilated
    # (benchmarks/train_step.py times lax's convs that way) reaches every backbone.
    return nn.Conv(features, kernel_size, strides, kernel_init=conv_kernel_init(),
                   conv_general_dilated=conv_general_dilated, **kwargs)


def rematerialised(block: type[nn.Module], remat: bool) -> type[nn.Module]:
    """`block`, or with `remat` the same block under `nn.remat`: its activations are recomputed
    in the backward pass instead of kept from the forward one (less memory for one more forward
    of the block), with the same outputs, gradients and parameter names.

    Call the result as `block(x, train)`: `train` is positional because it must be static
    (argument 2, after the module and `x`). Name each block explicitly: nn.remat's class is named
    `Checkpoint<block>`, which would change automatic names (`<block>_0`) and so the checkpoints.
    """
    return nn.remat(block, static_argnums=(2,)) if remat else block


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
        conv = lambda f, k, s, groups, name: conv2d(  # noqa: E731
            f, (k, k), (s, s), padding=self.padding, feature_group_count=groups,
            use_bias=self.use_bias, dtype=self.dtype, name=name)
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
