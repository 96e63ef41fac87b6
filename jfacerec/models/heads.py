"""Embedding and classification heads that sit on a backbone's feature map."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jfacerec.losses import cosine_logits


POOLS = ("mean", "flatten")
EMBEDDING_NORMS = ("", "batch", "layer")


def embedding_norm(x: jax.Array, kind: str, dtype: Any, *, train: bool) -> jax.Array:
    """The norm after the embedding layer ([batch, D]): BatchNorm1d for "batch", else a LayerNorm
    over D (group and instance norms of a flat vector would normalise single numbers to zero).
    Call inside a compact method; the layer is named "features" as in arcface_torch.
    """
    if kind == "batch":
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                            dtype=dtype, name="features")(x)
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, name="features")(x)


class EmbeddingHead(nn.Module):
    """Pool, dropout, a linear projection to the embedding, then optionally its norm.

    pool "mean": the global average of the feature map. pool "flatten": every position's features
    in one vector (h * w * channels), as arcface_torch's IResNet head does: an aligned face keeps
    its eyes and mouth at fixed positions, which averaging throws away.

    norm "batch" or "layer" normalises the embedding (embedding_norm), as arcface_torch's
    BatchNorm1d "features" does; "": none.

    Input [batch, h, w, channels]; output float32 [batch, embedding_dim].
    """

    embedding_dim: int = 128
    dropout: float = 0.0
    dtype: Any = jnp.float32
    pool: str = "mean"
    norm: str = ""

    @nn.compact
    def __call__(self, feats: jax.Array, *, train: bool) -> jax.Array:
        if self.pool == "mean":
            x = jnp.mean(feats, axis=(1, 2))
        elif self.pool == "flatten":
            x = feats.reshape(feats.shape[0], -1)
        else:
            raise ValueError(f"unknown pool {self.pool!r}; choose one of {POOLS}")
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(self.embedding_dim, dtype=self.dtype, name="proj")(x)
        if self.norm not in EMBEDDING_NORMS:
            raise ValueError(f"unknown embedding norm {self.norm!r}; choose one of "
                             f"{EMBEDDING_NORMS}")
        if self.norm:
            x = embedding_norm(x, self.norm, self.dtype, train=train)
        return x.astype(jnp.float32)


class LinearClassifier(nn.Module):
    """Logits [batch, num_classes] = embedding @ W + b, with W [embedding_dim, columns].

    `columns` (0: num_classes) may exceed num_classes: the padding that splits the classes evenly
    over the mesh (core/parallel.py padded_classes). Padded columns never reach the logits.
    """

    num_classes: int
    columns: int = 0

    @nn.compact
    def __call__(self, embeddings: jax.Array) -> jax.Array:
        width = self.columns or self.num_classes
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (embeddings.shape[-1], width), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (width,), jnp.float32)
        return (embeddings.astype(jnp.float32) @ kernel + bias)[..., :self.num_classes]


class CosineClassifier(nn.Module):
    """Logits = scale * cos(theta): normalised embeddings against normalised class weights.

    The kernel [embedding_dim, columns] holds the class weights that margin losses (ArcFace,
    CosFace, SphereFace) train; at evaluation these logits carry no margin. Logits
    [batch, num_classes]: padded columns (columns > num_classes) never reach them.
    """

    num_classes: int
    scale: float = 64.0
    columns: int = 0

    @nn.compact
    def __call__(self, embeddings: jax.Array) -> jax.Array:
        # Columns of about unit norm: the gradient on a normalised weight scales with 1 / |w|,
        # so arcface_torch's N(0, 0.01) start would multiply the step on 512-d weights by ~20.
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (embeddings.shape[-1], self.columns or self.num_classes),
                            jnp.float32)
        return self.scale * cosine_logits(embeddings, kernel[:, :self.num_classes])
