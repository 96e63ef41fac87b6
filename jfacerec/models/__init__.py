"""Face models: a backbone, an embedding head and a classifier head, and the `get_model` registry."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jfacerec.losses.objectives import Objective
from jfacerec.models.convnext import ConvNeXt
from jfacerec.models.heads import CosineClassifier, EmbeddingHead, LinearClassifier
from jfacerec.models.iresnet import IResNet
from jfacerec.models.layers import NORMS, Norm
from jfacerec.models.mobilenet import MobileFaceNet, MobileNetV2
from jfacerec.models.resnet import ResNet


class FaceModel(nn.Module):
    """Backbone -> embedding -> classifier head.

    A backbone returns either a feature map [batch, h, w, c], which the embedding head pools and
    projects, or the embedding [batch, embedding_dim] itself (the face backbones with their own
    fully connected or GDC head).

    Called on images [batch, height, width, 3] it returns float32 logits [batch, num_classes], or
    the embeddings [batch, embedding_dim] with `return_feats=True`. The head is "linear" (softmax
    training) or "cosine" (scale * cos, the margin losses' class weights as an extra layer); its
    kernel [embedding_dim, class_columns] is `params["classifier"]["kernel"]`; `class_columns`
    (0: num_classes) pads the classes to split evenly over the mesh, and the padding never
    reaches the logits.
    """

    backbone: nn.Module
    num_classes: int
    embedding_dim: int = 128
    dropout: float = 0.0
    dtype: Any = jnp.float32
    head: str = "linear"
    head_scale: float = 64.0
    class_columns: int = 0
    pool: str = "mean"  # the embedding head's, on a feature map (heads.EmbeddingHead)
    embedding_norm: str = ""  # the embedding head's norm (heads.EmbeddingHead)

    def setup(self):
        self.embed_head = EmbeddingHead(self.embedding_dim, self.dropout, self.dtype, self.pool,
                                        self.embedding_norm)
        if self.head == "linear":
            self.classifier = LinearClassifier(self.num_classes, self.class_columns)
        elif self.head == "cosine":
            self.classifier = CosineClassifier(self.num_classes, self.head_scale,
                                               self.class_columns)
        else:
            raise ValueError(f"unknown head {self.head!r}; choose 'linear' or 'cosine'")

    def embed(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        feats = self.backbone(images, train=train)
        if feats.ndim == 2:
            return feats.astype(jnp.float32)
        return self.embed_head(feats, train=train)

    def classify(self, embeddings: jax.Array) -> jax.Array:
        """Embeddings [batch, embedding_dim] -> logits [batch, num_classes]."""
        return self.classifier(embeddings)

    def __call__(self, images: jax.Array, *, train: bool = False,
                 return_feats: bool = False) -> jax.Array:
        embeddings = self.embed(images, train=train)
        if return_feats:
            return embeddings
        return self.classify(embeddings)


def scaled_widths(widths: Sequence[int], multiplier: float) -> list[int]:
    """Each stage's channels times `multiplier` (model.width_multiplier), at least 1."""
    return [max(1, int(round(w * multiplier))) for w in widths]


def _builder(make_backbone, default_norm: str):
    """A registry entry: keyword options -> FaceModel around make_backbone(options)."""

    def build(*, num_classes: int, embedding_dim: int = 128, norm: str | None = None,
              norm_groups: int = 32, width_multiplier: float = 1.0, dropout: float = 0.0,
              dropblock: float = 0.0, dtype: Any = jnp.float32, head: str = "linear",
              head_scale: float = 64.0, class_columns: int = 0, remat: bool = False,
              pool: str = "mean", embedding_norm: str = "") -> FaceModel:
        options = dict(norm=norm or default_norm, norm_groups=norm_groups,
                       width_multiplier=width_multiplier, dropout=dropout, dropblock=dropblock,
                       dtype=dtype, embedding_dim=embedding_dim, remat=remat)
        # Backbones with their own embedding layer take the dropout; others leave it to the head.
        backbone, own_head = make_backbone(**options)
        return FaceModel(backbone, num_classes, embedding_dim, 0.0 if own_head else dropout,
                         dtype, head, head_scale, class_columns, pool, embedding_norm)

    return build


def _resnet(stage_sizes, widths, block="basic", stem="small", stem_strides=1):
    def make(*, width_multiplier, embedding_dim, dropout, dropblock, **kw):
        del embedding_dim, dropout
        return ResNet(stage_sizes, scaled_widths(widths, width_multiplier), block=block, stem=stem,
                      stem_strides=stem_strides, dropblock=dropblock, **kw), False
    return _builder(make, "group")


def _iresnet(stage_sizes):
    def make(*, width_multiplier, **kw):
        widths = scaled_widths((64, 128, 256, 512), width_multiplier)
        return IResNet(stage_sizes, widths, **kw), True
    return _builder(make, "batch")


def _mobilefacenet(**kw):
    return MobileFaceNet(**kw), True


def _mobilenetv2(*, embedding_dim, dropout, **kw):
    del embedding_dim, dropout
    return MobileNetV2(**kw), False


def _convnext(depths, dims):
    def make(*, width_multiplier, embedding_dim, dropout, **kw):
        del embedding_dim, dropout
        return ConvNeXt(depths, scaled_widths(dims, width_multiplier), **kw), False
    return _builder(make, "layer")


_MODELS: dict[str, Callable[..., FaceModel]] = {
    # The demo backbone: a stride-2 stem and four stages of one basic block, for 32-64 pixel
    # crops on a CPU.
    "resnet_tiny": _resnet((1, 1, 1, 1), (24, 48, 96, 192), stem_strides=2),
    # resnet_tiny on faces of twice the side at nearly the same cost (a space-to-depth stem)
    "resnet_tiny_s2d": _resnet((1, 1, 1, 1), (24, 48, 96, 192), stem="space_to_depth",
                               stem_strides=2),
    "resnet18": _resnet((2, 2, 2, 2), (64, 128, 256, 512), stem="imagenet"),
    "resnet34": _resnet((3, 4, 6, 3), (64, 128, 256, 512), stem="imagenet"),
    "resnet50": _resnet((3, 4, 6, 3), (64, 128, 256, 512), block="bottleneck", stem="imagenet"),
    "iresnet18": _iresnet((2, 2, 2, 2)),
    "iresnet34": _iresnet((3, 4, 6, 3)),
    "iresnet50": _iresnet((3, 4, 14, 3)),
    "iresnet100": _iresnet((3, 13, 30, 3)),
    "mobilefacenet": _builder(_mobilefacenet, "batch"),
    "mobilenetv2": _builder(_mobilenetv2, "batch"),
    "convnext_tiny": _convnext((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_nano": _convnext((2, 2, 8, 2), (80, 160, 320, 640)),
}


def get_model(name: str, **kwargs) -> FaceModel:
    """The model registered under `name`, built with `kwargs` (num_classes, embedding_dim, norm,
    norm_groups, width_multiplier, dropout, dropblock, dtype, head, head_scale, class_columns,
    remat: the backbone's blocks rematerialised, see layers.rematerialised; pool and
    embedding_norm: how the embedding head pools a feature map and normalises the embedding, see
    heads.EmbeddingHead)."""
    try:
        build = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(_MODELS)}") from None
    return build(**kwargs)


def registered_models() -> list[str]:
    return sorted(_MODELS)


def from_config(config: ml_collections.ConfigDict, num_classes: int,
                class_columns: int = 0) -> FaceModel:
    """The model a training config names, with `num_classes` classes and the head its loss needs
    (`class_columns` wide, 0: num_classes; see core/parallel.py padded_classes)."""
    m = config.model
    head, head_scale = Objective.from_config(config).head
    return get_model(m.name, num_classes=num_classes, embedding_dim=m.embedding_dim, norm=m.norm,
                     norm_groups=m.norm_groups, width_multiplier=m.width_multiplier,
                     dropout=m.dropout, dropblock=m.dropblock,
                     dtype=jnp.dtype(config.dtype), head=head,
                     head_scale=head_scale, class_columns=class_columns, remat=m.remat,
                     pool=m.pool, embedding_norm=m.embedding_norm)


__all__ = ["FaceModel", "NORMS", "Norm", "from_config", "get_model", "registered_models",
           "scaled_widths"]
