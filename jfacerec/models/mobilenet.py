"""Mobile face backbones built from depthwise-separable convolutions.

MobileFaceNet (Chen et al. 2018) as arcface_torch's `mbf`: inverted-residual depthwise blocks and a
global depthwise conv (GDC) head. MobileNetV2 (Sandler et al. 2018) with a width multiplier and an
embedding head.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jfacerec.models.heads import embedding_norm
from jfacerec.models.layers import DropBlock, Norm, PReLU, conv2d, rematerialised


class ConvNorm(nn.Module):
    """conv (optionally grouped) -> norm -> PReLU (or nothing when `act` is None)."""

    features: int
    kernel: int = 1
    strides: int = 1
    groups: int = 1
    act: str | None = "prelu"
    norm: str = "batch"
    norm_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        pad = self.kernel // 2
        x = conv2d(self.features, (self.kernel, self.kernel), (self.strides, self.strides),
                   padding=((pad, pad), (pad, pad)), feature_group_count=self.groups,
                   use_bias=False, dtype=self.dtype)(x)
        x = Norm(self.norm, self.norm_groups, dtype=self.dtype)(x, train=train)
        if self.act == "prelu":
            return PReLU()(x)
        if self.act == "relu6":
            return jnp.clip(x, 0.0, 6.0)
        return x


class DepthWise(nn.Module):
    """1x1 expand to `groups` -> k x k depthwise (stride) -> 1x1 linear projection (+ input)."""

    features: int
    groups: int
    strides: int = 1
    residual: bool = False
    norm: str = "batch"
    norm_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(norm=self.norm, norm_groups=self.norm_groups, dtype=self.dtype)
        y = ConvNorm(self.groups, 1, **kw)(x, train=train)
        y = ConvNorm(self.groups, 3, self.strides, groups=self.groups, **kw)(y, train=train)
        y = ConvNorm(self.features, 1, act=None, **kw)(y, train=train)
        return x + y if self.residual else y


class MobileFaceNet(nn.Module):
    """Images [batch, 112, 112, 3] -> embeddings [batch, D] (arcface_torch `mbf`, scale 2)."""

    blocks: Sequence[int] = (1, 4, 6, 2)
    width_multiplier: float = 1.0
    embedding_dim: int = 512
    dropout: float = 0.0
    dropblock: float = 0.0
    norm: str = "batch"
    norm_groups: int = 32
    dtype: Any = jnp.float32
    remat: bool = False  # recompute each block's activations in the backward pass

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        block = rematerialised(DepthWise, self.remat)
        number = itertools.count()  # the blocks' automatic names, kept under nn.remat
        ch = lambda c: max(1, int(round(c * self.width_multiplier)))  # noqa: E731
        kw = dict(norm=self.norm, norm_groups=self.norm_groups, dtype=self.dtype)
        x = x.astype(self.dtype)
        x = ConvNorm(ch(128), 3, 2, **kw)(x, train=train)
        x = ConvNorm(ch(128), 3, 1, groups=ch(64), **kw)(x, train=train)
        # (output channels, residual blocks, their expansion, the downsampling block's expansion)
        stages = [(ch(128), self.blocks[1], ch(128), ch(128)),
                  (ch(256), self.blocks[2], ch(256), ch(256)),
                  (ch(256), self.blocks[3], ch(256), ch(512))]
        for i, (out, n, groups, down) in enumerate(stages):
            x = block(out, down, strides=2, **kw, name=f"DepthWise_{next(number)}")(x, train)
            for _ in range(n):
                x = block(out, groups, residual=True, **kw,
                          name=f"DepthWise_{next(number)}")(x, train)
            if i >= 1:
                x = DropBlock(self.dropblock, 3)(x, train=train)
        x = ConvNorm(ch(512), 1, **kw)(x, train=train)
        # GDC: a depthwise conv over the whole remaining map (7x7 at 112x112 input).
        h, w = x.shape[1:3]
        x = conv2d(x.shape[-1], (h, w), padding="VALID", feature_group_count=x.shape[-1],
                   use_bias=False, dtype=self.dtype, name="gdc")(x)
        x = Norm(self.norm, self.norm_groups, dtype=self.dtype, name="gdc_norm")(x, train=train)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(self.embedding_dim, use_bias=False, dtype=self.dtype, name="fc")(x)
        return embedding_norm(x, self.norm, self.dtype, train=train).astype(jnp.float32)


def _make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class InvertedResidual(nn.Module):
    features: int
    strides: int
    expand: int
    norm: str = "batch"
    norm_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(norm=self.norm, norm_groups=self.norm_groups, dtype=self.dtype)
        hidden = x.shape[-1] * self.expand
        y = ConvNorm(hidden, 1, act="relu6", **kw)(x, train=train) if self.expand != 1 else x
        y = ConvNorm(hidden, 3, self.strides, groups=hidden, act="relu6", **kw)(y, train=train)
        y = ConvNorm(self.features, 1, act=None, **kw)(y, train=train)
        return x + y if self.strides == 1 and x.shape[-1] == self.features else y


class MobileNetV2(nn.Module):
    """Images [batch, H, W, 3] -> feature map [batch, H/32, W/32, 1280 * width]."""

    width_multiplier: float = 1.0
    dropblock: float = 0.0
    norm: str = "batch"
    norm_groups: int = 32
    dtype: Any = jnp.float32
    remat: bool = False  # recompute each block's activations in the backward pass
    # (expansion t, channels c, repeats n, stride s) of the paper's Table 2.
    settings: Sequence[tuple[int, int, int, int]] = (
        (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
        (6, 160, 3, 2), (6, 320, 1, 1))

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(norm=self.norm, norm_groups=self.norm_groups, dtype=self.dtype)
        block = rematerialised(InvertedResidual, self.remat)
        number = itertools.count()  # the blocks' automatic names, kept under nn.remat
        x = x.astype(self.dtype)
        x = ConvNorm(_make_divisible(32 * self.width_multiplier), 3, 2, act="relu6", **kw)(
            x, train=train)
        for i, (t, c, n, s) in enumerate(self.settings):
            out = _make_divisible(c * self.width_multiplier)
            for j in range(n):
                x = block(out, s if j == 0 else 1, t, **kw,
                          name=f"InvertedResidual_{next(number)}")(x, train)
            if i >= 5:
                x = DropBlock(self.dropblock, 3)(x, train=train)
        last = _make_divisible(1280 * max(1.0, self.width_multiplier))
        return ConvNorm(last, 1, act="relu6", **kw)(x, train=train)
