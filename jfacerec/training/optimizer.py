"""The optimizers: SGD with momentum or AdamW, warmup + cosine schedule, decoupled weight decay,
the backbone's learning rate as a multiple of the head's (a fine-tune), gradient accumulation
over `config.accumulate_steps` batches, and the exponential moving average of the parameters
(`config.ema.decay`).

Steps and updates. A step is one batch of `batch_size`; an update is one change of the parameters,
every `accumulate_steps` steps. `total_steps` and `warmup_steps` count steps, and the schedule is
read at the first step of each update (`learning_rate_schedule`), so that it changes once per
update and warms up and decays over the same batches whatever the accumulation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jfacerec.losses.objectives import Objective


def accumulate_steps(config: ml_collections.ConfigDict) -> int:
    """`config.accumulate_steps`, checked: a whole number of them in `total_steps`."""
    k = config.accumulate_steps
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"accumulate_steps is {k!r}: give a whole number of batches per update, "
                         f"1 or more")
    if config.total_steps % k:
        raise ValueError(f"total_steps {config.total_steps} is not a multiple of accumulate_steps "
                         f"{k}: the last {config.total_steps % k} batches would never reach an "
                         f"update; set --config.total_steps to a multiple of {k}")
    return k


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """update number (from 0) -> learning rate: linear warmup from 0 over `warmup_steps`, then
    cosine decay to 0 at `total_steps` (or constant), both counted in steps (batches) and read at
    each update's first step, `update * accumulate_steps`."""
    k = accumulate_steps(config)
    by_step = _schedule_by_step(config)
    return by_step if k == 1 else lambda update: by_step(update * k)


def _schedule_by_step(config: ml_collections.ConfigDict) -> optax.Schedule:
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
    """SGD with momentum or AdamW, decoupled weight decay on kernels only, optional clipping;
    with `accumulate_steps` K > 1, wrapped in optax.MultiSteps: each update applies the mean of
    K batches' gradients (each the mean over its batch: the gradient of one batch K times
    larger), and the steps between return zero updates."""
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
    return accumulated(tx, accumulate_steps(config))


def accumulated(tx: optax.GradientTransformation, k: int) -> optax.GradientTransformation:
    """`tx` applied to the mean gradient of every `k` calls (optax.MultiSteps); `tx` itself when
    k is 1, so that the optimizer state of runs without accumulation keeps its shape."""
    return tx if k == 1 else optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()


def completes_update(step: jax.Array, k: int) -> jax.Array:
    """bool scalar: the step numbered `step` (from 0) is the last of its update's `k` batches,
    the one at which the parameters change."""
    return (step + 1) % k == 0


def ema_decay(decay: float, update: jax.Array) -> jax.Array:
    """float32 scalar: the moving average's decay at the update numbered `update` (from 0),
    min(decay, (1 + update) / (10 + update)).

    The warm-up (TensorFlow's ExponentialMovingAverage with num_updates) lets the average follow
    the parameters while they move fast: with a plain 0.999 the first thousand updates' average
    would still be mostly the random initialisation. It reaches `decay` after
    (10 decay - 1) / (1 - decay) updates (8,991 for 0.999).
    """
    n = update.astype(jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def ema_update(average: Any, params: Any, decay: jax.Array) -> Any:
    """decay * average + (1 - decay) * params, leaf by leaf (trees of the same structure)."""
    return jax.tree.map(lambda a, p: decay.astype(a.dtype) * a
                        + (1 - decay).astype(p.dtype) * p, average, params)


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


def center_optimizer(objective: Objective, k: int = 1) -> optax.GradientTransformation:
    """SGD of the centre loss's class centres (when trained as parameters), accumulated over
    `k` batches like the parameters' optimizer."""
    return accumulated(optax.sgd(objective.center_learning_rate), k)
