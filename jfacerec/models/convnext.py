"""ConvNeXt (Liu et al. 2022): 7x7 depthwise convs, channel LayerNorm and inverted MLPs."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jfacerec.models.layers import DropBlock, Norm, conv2d, rematerialised


def _norm(kind: str, groups: int, dtype: Any, name: str | None = None):
    """ConvNeXt's "layer" norm is a LayerNorm over channels at each position; other kinds as
    everywhere else. Returns a callable (x, train) -> x."""
    if kind == "layer":
        ln = nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name)
        return lambda x, train: ln(x)
    norm = Norm(kind, groups, eps=1e-6, dtype=dtype, name=name)
    return lambda x, train: norm(x, train=train)


class ConvNeXtBlock(nn.Module):
    dim: int
    norm: str = "layer"
    norm_groups: int = 32
    layer_scale: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = conv2d(self.dim, (7, 7), padding="SAME", feature_group_count=self.dim,
                   dtype=self.dtype, name="dwconv")(x)
        y = _norm(self.norm, self.norm_groups, self.dtype, "norm")(y, train)
        y = nn.Dense(4 * self.dim, dtype=self.dtype, name="pwconv1")(y)
        y = nn.gelu(y)
        y = nn.Dense(self.dim, dtype=self.dtype, name="pwconv2")(y)
        gamma = self.param("gamma", nn.initializers.constant(self.layer_scale), (self.dim,))
        return x + gamma.astype(y.dtype) * y


class ConvNeXt(nn.Module):
    """Images [batch, H, W, 3] -> feature map [batch, H/32, W/32, dims[-1]]."""

    depths: Sequence[int]
    dims: Sequence[int]
    dropblock: float = 0.0
    norm: str = "layer"
    norm_groups: int = 32
    dtype: Any = jnp.float32
    remat: bool = False  # recompute each block's activations in the backward pass

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        block = rematerialised(ConvNeXtBlock, self.remat)
        x = x.astype(self.dtype)
        x = conv2d(self.dims[0], (4, 4), (4, 4), padding="VALID", dtype=self.dtype,
                   name="stem")(x)
        x = _norm(self.norm, self.norm_groups, self.dtype, "stem_norm")(x, train)
        for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
            if i > 0:
                x = _norm(self.norm, self.norm_groups, self.dtype, f"down{i}_norm")(x, train)
                x = conv2d(dim, (2, 2), (2, 2), padding="VALID", dtype=self.dtype,
                           name=f"down{i}")(x)
            for j in range(depth):
                x = block(dim, self.norm, self.norm_groups, dtype=self.dtype,
                          name=f"stage{i + 1}_block{j + 1}")(x, train)
            if i >= 2:
                x = DropBlock(self.dropblock, 3)(x, train=train)
        return x
