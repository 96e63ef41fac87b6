"""The train state: everything that changes during training, its initial value and its shape."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jfacerec import models
from jfacerec.core import parallel
from jfacerec.losses.objectives import Objective
from jfacerec.models import FaceModel
from jfacerec.training.optimizer import center_optimizer, make_optimizer


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training: a pure pytree of arrays."""

    step: jax.Array  # int32 scalar, steps taken
    params: Any
    batch_stats: Any  # BatchNorm running statistics; an empty dict for other norms
    opt_state: Any
    # Center-loss class centres [num_classes, dim], replicated (never split over `model`, so never
    # padded); {} when unused.
    centers: Any
    center_opt_state: Any  # their optimizer's state when they are trained as parameters


def init_state(model: FaceModel, tx: optax.GradientTransformation, image_size: int,
               rng: jax.Array, objective: Objective) -> TrainState:
    variables = model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32))
    params = variables["params"]
    centers = (jnp.zeros((model.num_classes, model.embedding_dim), jnp.float32)
               if objective.uses_centers else {})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      centers=centers,
                      center_opt_state=center_optimizer(objective).init(centers))


def abstract_train_state(config: ml_collections.ConfigDict, num_classes: int,
                         mesh: jax.sharding.Mesh, *, class_columns: int = 0):
    """(model, optimizer, abstract state with shardings): shapes only, nothing computed.

    The head has `class_columns` columns (0: `parallel.padded_classes(num_classes, mesh)`, the
    classes padded to split over `model` when they do not); a checkpoint's own width restores it
    on any mesh that splits it.
    """
    columns = class_columns or parallel.padded_classes(num_classes, mesh)
    parallel.check_class_split(columns, mesh)
    model = models.from_config(config, num_classes, columns)
    tx = make_optimizer(config)
    objective = Objective.from_config(config)
    shapes = jax.eval_shape(lambda: init_state(model, tx, config.image_size,
                                               jax.random.key(config.seed), objective))
    abstract = jax.tree_util.tree_map_with_path(
        lambda path, s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                           sharding=parallel.state_sharding(path, s, mesh)),
        shapes)
    return model, tx, abstract
