"""The train state: everything that changes during training, its initial value and its shape.

A run with a moving average of the parameters (`config.ema.decay` > 0) has an `EmaTrainState`,
a TrainState with one more field: a new field in TrainState itself, even an empty one, would
change the checkpoints of every run, and older ones would no longer restore.
"""

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
from jfacerec.training.optimizer import accumulate_steps, center_optimizer, make_optimizer


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


@flax.struct.dataclass
class EmaTrainState(TrainState):
    """A TrainState with the exponential moving average of its parameters (see
    optimizer.ema_decay): a tree of `params`' structure, the weights that are validated,
    evaluated and loaded."""

    ema_params: Any


def init_state(model: FaceModel, tx: optax.GradientTransformation, image_size: int,
               rng: jax.Array, objective: Objective, *, ema: bool = False,
               accumulate_steps: int = 1) -> TrainState:
    """The state at step 0; an EmaTrainState whose average starts at the parameters when `ema`.
    `accumulate_steps` is the config's (the centre optimizer accumulates like `tx`)."""
    variables = model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32))
    params = variables["params"]
    centers = (jnp.zeros((model.num_classes, model.embedding_dim), jnp.float32)
               if objective.uses_centers else {})
    fields = dict(step=jnp.zeros((), jnp.int32), params=params,
                  batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                  centers=centers,
                  center_opt_state=center_optimizer(objective, accumulate_steps).init(centers))
    return EmaTrainState(**fields, ema_params=params) if ema else TrainState(**fields)


def state_from_config(model: FaceModel, tx: optax.GradientTransformation,
                      config: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
    """`init_state` with the config's image size, objective, moving average and accumulation."""
    return init_state(model, tx, config.image_size, rng, Objective.from_config(config),
                      ema=config.ema.decay > 0, accumulate_steps=accumulate_steps(config))


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
    shapes = jax.eval_shape(lambda: state_from_config(model, tx, config,
                                                      jax.random.key(config.seed)))
    abstract = jax.tree_util.tree_map_with_path(
        lambda path, s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                           sharding=parallel.state_sharding(path, s, mesh)),
        shapes)
    return model, tx, abstract
