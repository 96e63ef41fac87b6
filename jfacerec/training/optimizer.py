"""The optimizers: SGD with momentum or AdamW, warmup + cosine schedule, decoupled weight decay,
and the backbone's learning rate as a multiple of the head's (a fine-tune)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
    if o.backbone_multiplier != 1.0:
        # Only then: the chain's state gains an entry, which checkpoints of other runs lack.
        tx = optax.chain(tx, scale_backbone(o.backbone_multiplier))
    return tx


HEAD = "classifier"  # the params subtree of the class weights; every other one is the backbone's


def scale_backbone(multiplier: float) -> optax.GradientTransformation:
    """Multiplies the updates of every parameter outside `params["classifier"]` by `multiplier`:
    the backbone's learning rate (and its weight decay, applied through the update) times
    `multiplier`. 0 freezes the backbone: its updates are exact zeros, its parameters unchanged."""
    if multiplier < 0:
        raise ValueError(f"optimizer.backbone_multiplier is {multiplier}: use 0 (frozen) or more")

    def update(updates, state, params=None):
        del params
        scaled = {name: tree if name == HEAD else
                  jax.tree.map(lambda u: u * jnp.asarray(multiplier, u.dtype), tree)
                  for name, tree in updates.items()}
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def center_optimizer(objective: Objective) -> optax.GradientTransformation:
    return optax.sgd(objective.center_learning_rate)
