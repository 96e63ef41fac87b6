"""Embedding and classification heads that sit on a backbone's feature map."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class EmbeddingHead(nn.Module):
    """Global average pool, dropout, then a linear projection to the embedding.

    Input [batch, h, w, channels]; output float32 [batch, embedding_dim].
    """

    embedding_dim: int = 128
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats: jax.Array, *, train: bool) -> jax.Array:
        x = jnp.mean(feats, axis=(1, 2))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(self.embedding_dim, dtype=self.dtype, name="proj")(x)
        return x.astype(jnp.float32)


class LinearClassifier(nn.Module):
    """Logits = embedding @ W + b, with W [embedding_dim, num_classes]."""

    num_classes: int

    @nn.compact
    def __call__(self, embeddings: jax.Array) -> jax.Array:
        return nn.Dense(self.num_classes, name="dense")(embeddings)
