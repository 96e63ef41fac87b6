"""Face models: a backbone, an embedding head and a classifier head, and the `get_model` registry."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jfacerec.models.heads import CosineClassifier, EmbeddingHead, LinearClassifier
from jfacerec.models.layers import NORMS, Norm
from jfacerec.models.resnet import ResNet


class FaceModel(nn.Module):
    """Backbone -> embedding -> classifier head.

    Called on images [batch, height, width, 3] it returns float32 logits [batch, num_classes], or
    the embeddings [batch, embedding_dim] with `return_feats=True`. The head is "linear" (softmax
    training) or "cosine" (scale * cos, the margin losses' class weights as an extra layer); its
    kernel [embedding_dim, num_classes] is `params["classifier"]["kernel"]`.
    """

    backbone: nn.Module
    num_classes: int
    embedding_dim: int = 128
    dropout: float = 0.0
    dtype: Any = jnp.float32
    head: str = "linear"
    head_scale: float = 64.0

    def setup(self):
        self.embed_head = EmbeddingHead(self.embedding_dim, self.dropout, self.dtype)
        if self.head == "linear":
            self.classifier = LinearClassifier(self.num_classes)
        elif self.head == "cosine":
            self.classifier = CosineClassifier(self.num_classes, self.head_scale)
        else:
            raise ValueError(f"unknown head {self.head!r}; choose 'linear' or 'cosine'")

    def embed(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        return self.embed_head(self.backbone(images, train=train), train=train)

    def classify(self, embeddings: jax.Array) -> jax.Array:
        """Embeddings [batch, embedding_dim] -> logits [batch, num_classes]."""
        return self.classifier(embeddings)

    def __call__(self, images: jax.Array, *, train: bool = False,
                 return_feats: bool = False) -> jax.Array:
        embeddings = self.embed(images, train=train)
        if return_feats:
            return embeddings
        return self.classify(embeddings)


def _resnet(stage_sizes, widths, block="basic", stem="small", stem_strides=1):
    def build(*, num_classes: int, embedding_dim: int = 128, norm: str = "group",
              norm_groups: int = 32, width_multiplier: float = 1.0, dropout: float = 0.0,
              dtype: Any = jnp.float32, head: str = "linear",
              head_scale: float = 64.0) -> FaceModel:
        scaled = [max(1, int(round(w * width_multiplier))) for w in widths]
        backbone = ResNet(stage_sizes, scaled, block=block, stem=stem, stem_strides=stem_strides,
                          norm=norm,
                          norm_groups=norm_groups, dtype=dtype)
        return FaceModel(backbone, num_classes, embedding_dim, dropout, dtype, head, head_scale)
    return build


_MODELS: dict[str, Callable[..., FaceModel]] = {
    # The demo backbone: a stride-2 stem and four stages of one basic block, for 32-64 pixel
    # crops on a CPU.
    "resnet_tiny": _resnet((1, 1, 1, 1), (24, 48, 96, 192), stem_strides=2),
    "resnet18": _resnet((2, 2, 2, 2), (64, 128, 256, 512), stem="imagenet"),
    "resnet34": _resnet((3, 4, 6, 3), (64, 128, 256, 512), stem="imagenet"),
    "resnet50": _resnet((3, 4, 6, 3), (64, 128, 256, 512), block="bottleneck", stem="imagenet"),
}


def get_model(name: str, **kwargs) -> FaceModel:
    """The model registered under `name`, built with `kwargs` (num_classes, embedding_dim, norm,
    norm_groups, width_multiplier, dropout, dtype, head, head_scale)."""
    try:
        build = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(_MODELS)}") from None
    return build(**kwargs)


def registered_models() -> list[str]:
    return sorted(_MODELS)


__all__ = ["FaceModel", "NORMS", "Norm", "get_model", "registered_models"]
