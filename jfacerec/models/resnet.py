"""ResNet backbones with a selectable normalisation (He et al. 2016, basic and bottleneck blocks)."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jfacerec.models.layers import DropBlock, Norm, conv2d, rematerialised


class _Block(nn.Module):
    """Fields and conv / norm factories shared by the residual blocks."""

    features: int
    strides: int = 1
    norm: str = "group"
    norm_groups: int = 32
    dtype: Any = jnp.float32

    def conv(self, features: int, kernel: int, strides: int, name: str) -> nn.Conv:
        return conv2d(features, (kernel, kernel), (strides, strides),
                      padding="SAME" if kernel > 1 else "VALID", use_bias=False,
                      dtype=self.dtype, name=name)

    def make_norm(self, name: str, last: bool = False) -> Norm:
        # A zero-initialised last scale makes each block start as the identity (Goyal et al.
        # 2017).
        return Norm(self.norm, self.norm_groups, dtype=self.dtype, name=name,
                    scale_init=nn.initializers.zeros if last else nn.initializers.ones)

    def shortcut(self, x: jax.Array, out: int, train: bool) -> jax.Array:
        if x.shape[-1] == out and self.strides == 1:
            return x
        return self.make_norm("proj_norm")(self.conv(out, 1, self.strides, "proj")(x),
                                           train=train)


class BasicBlock(_Block):
    """conv3x3 - norm - relu - conv3x3 - norm, plus a (projected) shortcut, then relu."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = self.conv(self.features, 3, self.strides, "conv1")(x)
        y = nn.relu(self.make_norm("norm1")(y, train=train))
        y = self.conv(self.features, 3, 1, "conv2")(y)
        y = self.make_norm("norm2", last=True)(y, train=train)
        return nn.relu(self.shortcut(x, self.features, train) + y)


class BottleneckBlock(_Block):
    """1x1 reduce - 3x3 - 1x1 expand (x4), each followed by norm, plus a shortcut."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = self.features * 4
        y = self.conv(self.features, 1, 1, "conv1")(x)
        y = nn.relu(self.make_norm("norm1")(y, train=train))
        y = self.conv(self.features, 3, self.strides, "conv2")(y)
        y = nn.relu(self.make_norm("norm2")(y, train=train))
        y = self.make_norm("norm3", last=True)(self.conv(out, 1, 1, "conv3")(y), train=train)
        return nn.relu(self.shortcut(x, out, train) + y)


def space_to_depth(x: jax.Array, block: int) -> jax.Array:
    """[batch, h, w, c] -> [batch, h / block, w / block, block * block * c]; channel
    (dy * block + dx) * c + k holds pixel (block * i + dy, block * j + dx) of channel k, ONNX's
    SpaceToDepth order."""
    b, h, w, c = x.shape
    if h % block or w % block:
        raise ValueError(f"space_to_depth needs a side divisible by {block}; got {h}x{w} "
                         f"(set image_size to a multiple of {block})")
    x = x.reshape(b, h // block, block, w // block, block, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // block, w // block, block * block * c)


class ResNet(nn.Module):
    """A ResNet trunk: stem, then stages of blocks, the first block of each later stage strided.

    stem "small": one 3x3 conv of stride `stem_strides` (small face crops, CIFAR-style).
    stem "imagenet": 7x7 stride-2 conv and a 3x3 stride-2 max-pool (224x224 inputs).
    stem "space_to_depth": each 2x2 block of pixels folded into channels (`space_to_depth`), then
    the "small" stem: twice the face's side for the cost of the original size, since every layer
    after the stem sees the same map.

    Input [batch, height, width, 3]; output [batch, height / 2**k, width / 2**k, channels].
    """

    stage_sizes: Sequence[int]
    widths: Sequence[int]
    block: str = "basic"
    stem: str = "small"
    stem_strides: int = 1
    norm: str = "group"
    norm_groups: int = 32
    dropblock: float = 0.0  # DropBlock rate after the last two stages
    dtype: Any = jnp.float32
    remat: bool = False  # recompute each block's activations in the backward pass

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if len(self.stage_sizes) != len(self.widths):
            raise ValueError("stage_sizes and widths need one entry per stage")
        block_cls = rematerialised({"basic": BasicBlock, "bottleneck": BottleneckBlock}[self.block],
                                   self.remat)
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = conv2d(self.widths[0], (7, 7), (2, 2), padding=[(3, 3), (3, 3)],
                       use_bias=False, dtype=self.dtype, name="stem")(x)
            x = nn.relu(Norm(self.norm, self.norm_groups, dtype=self.dtype,
                             name="stem_norm")(x, train=train))
            x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        elif self.stem in ("small", "space_to_depth"):
            if self.stem == "space_to_depth":
                x = space_to_depth(x, 2)
            x = conv2d(self.widths[0], (3, 3), (self.stem_strides,) * 2, padding="SAME",
                       use_bias=False, dtype=self.dtype, name="stem")(x)
            x = nn.relu(Norm(self.norm, self.norm_groups, dtype=self.dtype,
                             name="stem_norm")(x, train=train))
        else:
            raise ValueError(f"unknown stem {self.stem!r}; choose 'small', 'space_to_depth' or "
                             "'imagenet'")
        for i, (size, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for j in range(size):
                x = block_cls(width, strides=2 if i > 0 and j == 0 else 1, norm=self.norm,
                              norm_groups=self.norm_groups, dtype=self.dtype,
                              name=f"stage{i + 1}_block{j + 1}")(x, train)
            if i >= len(self.stage_sizes) - 2:
                x = DropBlock(self.dropblock, 3)(x, train=train)
        return x
