"""IResNet, the face ResNet of insightface's arcface_torch, in Flax.

A stride-1 3x3 stem for 112x112 crops; pre-activation-style blocks BN - conv3x3 - BN - PReLU -
conv3x3 (stride) - BN plus a (projected) shortcut; four stride-2 stages reach 7x7; then BN,
dropout, flatten, a fully connected layer and a BatchNorm1d give the embedding.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jfacerec.models.heads import embedding_norm
from jfacerec.models.layers import DropBlock, Norm, PReLU, conv2d, rematerialised

_PAD1 = ((1, 1), (1, 1))  # torch padding=1: the same pixels as arcface_torch at stride 2


class IBasicBlock(nn.Module):
    features: int
    strides: int = 1
    norm: str = "batch"
    norm_groups: int = 32
    dropblock: float = 0.0
    block_size: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = lambda name: Norm(self.norm, self.norm_groups, dtype=self.dtype,  # noqa: E731
                                 name=name)
        conv = lambda k, s, pad, name: conv2d(  # noqa: E731
            self.features, (k, k), (s, s), padding=pad, use_bias=False, dtype=self.dtype,
            name=name)
        y = norm("bn1")(x, train=train)
        y = conv(3, 1, _PAD1, "conv1")(y)
        y = PReLU(name="prelu")(norm("bn2")(y, train=train))
        y = conv(3, self.strides, _PAD1, "conv2")(y)
        y = norm("bn3")(y, train=train)
        y = DropBlock(self.dropblock, self.block_size)(y, train=train)
        if x.shape[-1] != self.features or self.strides != 1:
            x = norm("downsample_bn")(conv(1, self.strides, "VALID", "downsample")(x),
                                      train=train)
        return x + y


class IResNet(nn.Module):
    """Images [batch, 112, 112, 3] (any size divisible by 16) -> embeddings [batch, D]."""

    stage_sizes: Sequence[int]
    widths: Sequence[int] = (64, 128, 256, 512)
    embedding_dim: int = 512
    dropout: float = 0.0
    dropblock: float = 0.0
    norm: str = "batch"
    norm_groups: int = 32
    dtype: Any = jnp.float32
    remat: bool = False  # recompute each block's activations in the backward pass

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        block = rematerialised(IBasicBlock, self.remat)
        x = x.astype(self.dtype)
        x = conv2d(self.widths[0], (3, 3), padding=_PAD1, use_bias=False, dtype=self.dtype,
                   name="conv1")(x)
        x = Norm(self.norm, self.norm_groups, dtype=self.dtype, name="bn1")(x, train=train)
        x = PReLU(name="prelu")(x)
        for i, (size, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for j in range(size):
                # DropBlock in the last two stages, as its paper does for ResNets.
                x = block(width, 2 if j == 0 else 1, self.norm, self.norm_groups,
                          self.dropblock if i >= 2 else 0.0, dtype=self.dtype,
                          name=f"layer{i + 1}_{j}")(x, train)
        x = Norm(self.norm, self.norm_groups, dtype=self.dtype, name="bn2")(x, train=train)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(self.embedding_dim, dtype=self.dtype, name="fc")(x)
        return embedding_norm(x, self.norm, self.dtype, train=train).astype(jnp.float32)
