"""Restoring a trained model and running it over a source: embeddings and logits in batches."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
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
    of the config it is evaluated with); `restored.model.num_classes` says which. The weights
    are placed on `parallel.inference_mesh`: the config's mesh in one process, every device of
    every process in several (the backbone replicated, the head split as in training)."""
    step = select_step(workdir, step=step, checkpoint=checkpoint)
    mesh = parallel.inference_mesh(config)  # a model-split head restores split
    checkpointer = Checkpointer(workdir, read_only=True)
    saved_classes, columns = checkpointer.head(step)
    parallel.check_class_split(columns, mesh)
    model = models.from_config(config, num_classes or saved_classes, columns)
    abstract = abstract_variables(model, config.image_size, mesh)
    variables, step = checkpointer.restore_variables(abstract, step)
    return Restored(model, variables, step, mesh)


def make_features_fn(model: FaceModel, *, flip: bool, normalize: bool) -> Callable:
    """(variables, images [b, h, w, 3]) -> float32 [b, d]: embed(x), plus embed(flip_lr(x)) with
    `flip` (as arcface_torch does); with `normalize` scaled to unit norm (the embedding), else
    not (the features: set-based protocols such as IJB weigh faces by their norm)."""

    @functools.partial(jax.jit, compiler_options=xla_cpu.compiler_options())
    def features(variables, images):
        e = model.apply(variables, images, return_feats=True)
        if flip:
            e = e + model.apply(variables, images[:, :, ::-1], return_feats=True)
        return l2_normalize(e) if normalize else e

    return features


def make_embed_fn(model: FaceModel, *, flip: bool) -> Callable:
    """(variables, images [b, h, w, 3]) -> unit-norm float32 [b, d]: `make_features_fn`'s
    normalised features."""
    return make_features_fn(model, flip=flip, normalize=True)


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


def to_host(tree: Any) -> Any:
    """Every array of `tree` whole, as NumPy, on every process: a jax.Array split over the devices
    of several processes is gathered (a collective: every process must call this alike)."""

    def whole(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(whole, tree)


class _Rows:
    """Records `indices` of another source, labels kept."""

    def __init__(self, source: Source, indices: np.ndarray):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.source[int(self.indices[int(index)])]


def run_over(fn: Callable, variables: Any, source: Source, *, batch_size: int, image_size: int,
             mesh: jax.sharding.Mesh, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Applies `fn(variables, images)` to every record of `source`, in order.

    Batches are padded to `batch_size` (one compilation) and split over the mesh's devices. With
    several processes, every process passes the same source: each decodes and feeds only its own
    devices' rows of each batch, and every process gets every output.
    Returns (outputs [n, ...], labels int32 [n]).
    """
    batch_size = -(-batch_size // mesh.size) * mesh.size
    sharding = parallel.data_sharding(mesh)
    own = parallel.process_rows(sharding, batch_size)
    local = own.stop - own.start
    n = len(source)
    starts = range(0, n, batch_size)
    # This process's records of each batch: none in a short last batch that ends before them.
    mine = [np.arange(s + own.start, min(s + own.stop, n)) for s in starts]
    batches = pipeline.eval_batches(_Rows(source, np.concatenate([np.zeros(0, np.int64), *mine])),
                                    batch_size=local, image_size=image_size)
    image_shape = (image_size, image_size, 3)
    outputs, labels = [], []
    with tqdm(total=n, desc=desc, unit="img", leave=False,
              disable=jax.process_index() != 0) as bar:
        for start, rows in zip(starts, mine):
            batch = next(batches) if len(rows) else {
                "image": np.zeros((0, *image_shape), np.float32), "label": np.zeros(0, np.int32)}
            pad = local - len(rows)
            images = jax.make_array_from_process_local_data(
                sharding, np.pad(batch["image"], ((0, pad), (0, 0), (0, 0), (0, 0))),
                (batch_size, *image_shape))
            label = jax.make_array_from_process_local_data(
                sharding, np.pad(batch["label"], (0, pad)), (batch_size,))
            out, label = to_host((fn(variables, images), label))
            count = min(batch_size, n - start)
            outputs.append(out[:count])
            labels.append(label[:count])
            bar.update(count)
    return np.concatenate(outputs), np.concatenate(labels)
