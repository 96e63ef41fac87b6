"""ResNet backbones with a selectable normalisation (He et al. 2016, basic and bottleneck blocks)."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jfacerec.models.layers import DropBlock, Norm, conv_kernel_init


class BasicBlock(nn.Module):
    """conv3x3 - norm - relu - conv3x3 - norm, plus a (projected) shortcut, then relu."""

    features: int
    strides: int = 1
    norm: str = "group"
    norm_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        conv = lambda f, k, s, name: nn.Conv(  # noqa: E731
            f, (k, k), (s, s), padding="SAME" if k > 1 else "VALID", use_bias=False,
            kernel_init=conv_kernel_init(), dtype=self.dtype, name=name)
        norm = lambda name, **kw: Norm(self.norm, self.norm_groups, dtype=self.dtype,  # noqa: E731
                                       name=name, **kw)
        y = conv(self.features, 3, self.strides, "conv1")(x)
        y = nn.relu(norm("norm1")(y, train=train))
        y = conv(self.features, 3, 1, "conv2")(y)
        # Zero-initialised last scale: each block starts as the identity (Goyal et al. 2017).
        y = norm("norm2", scale_init=nn.initializers.zeros)(y, train=train)
        if x.shape[-1] != self.features or self.strides != 1:
            x = conv(self.features, 1, self.strides, "proj")(x)
            x = norm("proj_norm")(x, train=train)
        return nn.relu(x + y)


class BottleneckBlock(nn.Module):
    """1x1 reduce - 3x3 - 1x1 expand (x4), each followed by norm, plus a shortcut."""

    features: int
    strides: int = 1
    norm: str = "group"
    norm_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        conv = lambda f, k, s, name: nn.Conv(  # noqa: E731
            f, (k, k), (s, s), padding="SAME" if k > 1 else "VALID", use_bias=False,
            kernel_init=conv_kernel_init(), dtype=self.dtype, name=name)
        norm = lambda name, **kw: Norm(self.norm, self.norm_groups, dtype=self.dtype,  # noqa: E731
                                       name=name, **kw)
        out = self.features * 4
        y = nn.relu(norm("norm1")(conv(self.features, 1, 1, "conv1")(x), train=train))
        y = nn.relu(norm("norm2")(conv(self.features, 3, self.strides, "conv2")(y), train=train))
        y = norm("norm3", scale_init=nn.initializers.zeros)(conv(out, 1, 1, "conv3")(y),
                                                           train=train)
        if x.shape[-1] != out or self.strides != 1:
            x = norm("proj_norm")(conv(out, 1, self.strides, "proj")(x), train=train)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A ResNet trunk: stem, then stages of blocks, the first block of each later stage strided.

    stem "small": one 3x3 conv of stride `stem_strides` (small face crops, CIFAR-style).
    stem "imagenet": 7x7 stride-2 conv and a 3x3 stride-2 max-pool (224x224 inputs).

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

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if len(self.stage_sizes) != len(self.widths):
            raise ValueError("stage_sizes and widths need one entry per stage")
        block_cls = {"basic": BasicBlock, "bottleneck": BottleneckBlock}[self.block]
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = nn.Conv(self.widths[0], (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False,
                        kernel_init=conv_kernel_init(), dtype=self.dtype, name="stem")(x)
            x = nn.relu(Norm(self.norm, self.norm_groups, dtype=self.dtype,
                             name="stem_norm")(x, train=train))
            x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        elif self.stem == "small":
            x = nn.Conv(self.widths[0], (3, 3), (self.stem_strides,) * 2, padding="SAME",
                        use_bias=False,
                        kernel_init=conv_kernel_init(), dtype=self.dtype, name="stem")(x)
            x = nn.relu(Norm(self.norm, self.norm_groups, dtype=self.dtype,
                             name="stem_norm")(x, train=train))
        else:
            raise ValueError(f"unknown stem {self.stem!r}; choose 'small' or 'imagenet'")
        for i, (size, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for j in range(size):
                x = block_cls(width, strides=2 if i > 0 and j == 0 else 1, norm=self.norm,
                              norm_groups=self.norm_groups, dtype=self.dtype,
                              name=f"stage{i + 1}_block{j + 1}")(x, train=train)
            if i >= len(self.stage_sizes) - 2:
                x = DropBlock(self.dropblock, 3)(x, train=train)
        return x
