"""The optimizers: SGD with momentum or AdamW, warmup + cosine schedule, decoupled weight decay."""

from __future__ import annotations

import jax
import ml_collections
import optax

from jfacerec.losses.objectives import Objective


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to 0 at `total_steps` (or constant)."""
    o = config.optimizer
    warmup = min(o.warmup_steps, config.total_steps)
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, warmup,
                                                  max(config.total_steps, warmup + 1))
    if o.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, o.learning_rate, warmup),
             optax.constant_schedule(o.learning_rate)], [warmup])
    raise ValueError(f"unknown schedule {o.schedule!r}; choose 'cosine' or 'constant'")


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD with momentum or AdamW, decoupled weight decay on kernels only, optional clipping."""
    o = config.optimizer
    schedule = learning_rate_schedule(config)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    if o.name == "sgd":
        tx = optax.chain(optax.add_decayed_weights(o.weight_decay, decay_mask),
                         optax.sgd(schedule, momentum=o.momentum, nesterov=o.nesterov))
    elif o.name == "adamw":
        tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask)
    else:
        raise ValueError(f"unknown optimizer {o.name!r}; choose 'sgd' or 'adamw'")
    if o.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
    return tx


def center_optimizer(objective: Objective) -> optax.GradientTransformation:
    return optax.sgd(objective.center_learning_rate)
