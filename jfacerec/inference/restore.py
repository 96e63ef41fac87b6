"""Restoring a trained model and running it over a source: embeddings and logits in batches."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jfacerec import models
from jfacerec.core import parallel
from jfacerec.core.checkpoint import Checkpointer, select_step
from jfacerec.data import pipeline
from jfacerec.data.records import Source
from jfacerec.losses import l2_normalize
from jfacerec.models import FaceModel, xla_cpu


@dataclasses.dataclass
class Restored:
    model: FaceModel
    variables: dict[str, Any]  # {"params": ..., "batch_stats": ...}
    step: int
    mesh: jax.sharding.Mesh


def abstract_variables(model: FaceModel, image_size: int,
                       mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """{"params", "batch_stats"} as shapes with their shardings: nothing computed."""
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, image_size, image_size, 3), jnp.float32)))
    shapes = {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                             sharding=parallel.state_sharding(path, s, mesh)),
        shapes)


def restore(config: ml_collections.ConfigDict, workdir: str, num_classes: int | None = None, *,
            step: int | None = None, checkpoint: str = "latest") -> Restored:
    """The model of `config` with the weights of a checkpoint in `workdir`: `step`; with
    `checkpoint="best"` the best validated step (see `core.checkpoint.select_step`); or else the
    newest intact one (a damaged checkpoint is skipped with a warning; see core/checkpoint.py).
    Its parameters and BatchNorm statistics only, not the optimizer state. The head keeps the
    saved width (padded or not, whatever mesh padded it) and gives `num_classes` logits: by
    default the checkpoint's own class count (a converted model's head need not fit the dataset
    of the config it is evaluated with); `restored.model.num_classes` says which."""
    step = select_step(workdir, step=step, checkpoint=checkpoint)
    mesh = parallel.mesh_from_config(config)  # a model-split head restores split
    checkpointer = Checkpointer(workdir, read_only=True)
    saved_classes, columns = checkpointer.head(step)
    parallel.check_class_split(columns, mesh)
    model = models.from_config(config, num_classes or saved_classes, columns)
    abstract = abstract_variables(model, config.image_size, mesh)
    variables, step = checkpointer.restore_variables(abstract, step)
    return Restored(model, variables, step, mesh)


def make_embed_fn(model: FaceModel, *, flip: bool) -> Callable:
    """(variables, images [b, h, w, 3]) -> unit-norm float32 [b, d].

    With `flip`, the embedding is normalise(embed(x) + embed(flip_lr(x))), as in arcface_torch.
    """

    @functools.partial(jax.jit, compiler_options=xla_cpu.compiler_options())
    def embed(variables, images):
        e = model.apply(variables, images, return_feats=True)
        if flip:
            e = e + model.apply(variables, images[:, :, ::-1], return_feats=True)
        return l2_normalize(e)

    return embed


def make_logits_fn(model: FaceModel, *, flip: bool) -> Callable:
    """(variables, images) -> float32 logits [b, num_classes].

    With `flip`, the classifier scores the mean of the embeddings of x and flip_lr(x).
    """

    @functools.partial(jax.jit, compiler_options=xla_cpu.compiler_options())
    def logits(variables, images):
        e = model.apply(variables, images, return_feats=True)
        if flip:
            e = (e + model.apply(variables, images[:, :, ::-1], return_feats=True)) / 2.0
        return model.apply(variables, e, method=FaceModel.classify)

    return logits


def run_over(fn: Callable, variables: Any, source: Source, *, batch_size: int, image_size: int,
             mesh: jax.sharding.Mesh, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Applies `fn(variables, images)` to every record of `source`, in order.

    Batches are padded to `batch_size` (one compilation) and split over the mesh's devices.
    Returns (outputs [n, ...], labels int32 [n]).
    """
    n_dev = mesh.devices.size
    batch_size = -(-batch_size // n_dev) * n_dev
    sharding = parallel.data_sharding(mesh)
    outputs, labels = [], []
    with tqdm(total=len(source), desc=desc, unit="img", leave=False) as bar:
        for batch in pipeline.eval_batches(source, batch_size=batch_size, image_size=image_size):
            n = len(batch["label"])
            images = np.pad(batch["image"], ((0, batch_size - n), (0, 0), (0, 0), (0, 0)))
            out = fn(variables, jax.device_put(jnp.asarray(images), sharding))
            outputs.append(np.asarray(out)[:n])
            labels.append(batch["label"])
            bar.update(n)
    return np.concatenate(outputs), np.concatenate(labels)
