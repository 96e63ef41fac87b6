"""The train step: one optimizer step of the config's objective on a global batch."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jfacerec import losses
from jfacerec.core import parallel
from jfacerec.core.checkpoint import all_finite
from jfacerec.losses import sharded_softmax
from jfacerec.losses.objectives import Objective
from jfacerec.models import FaceModel
from jfacerec.training.optimizer import (accumulate_steps, center_optimizer, completes_update,
                                         ema_decay, ema_update, learning_rate_schedule)
from jfacerec.training.state import EmaTrainState, TrainState


def uses_sharded_head(config: ml_collections.ConfigDict) -> bool:
    """Whether the class weights are split over the mesh's `model` axis or sampled (PartialFC)."""
    return (config.mesh.model > 1
            or config.loss.sample_rate < 1.0)


def make_train_step(model: FaceModel, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict,
                    mesh: jax.sharding.Mesh | None = None) -> Callable:
    """(state, batch) -> (state, metrics): one step on a global batch.

    With `config.accumulate_steps` K > 1 the parameters change at every K-th step, by the mean
    gradient of the K batches (optimizer.make_optimizer); the steps between only accumulate. An
    EmaTrainState's average moves at each change of the parameters (optimizer.ema_decay).

    batch: `image` float32 [batch, size, size, 3], `label` int32 [batch]. `mesh` (by default the
    config's) carries the class weights' `model` split when `uses_sharded_head(config)`.
    metrics: float32 scalars (`grad_norm` is this batch's gradient's; `learning_rate` the one of
    this step's update), and `finite`, a bool scalar: the loss, the gradient norm and every
    array of the new state are finite. Weights gone NaN can still give a finite loss (about the
    log of the class count), so the loop checks `finite`, not the loss, before it saves a state.
    """
    objective = Objective.from_config(config)
    train_centers = objective.uses_centers and objective.center_update == "param"
    k = accumulate_steps(config)
    center_tx = center_optimizer(objective, k)
    schedule = learning_rate_schedule(config)
    decay = config.ema.decay
    base_rng = jax.random.key(config.seed)
    sharded = uses_sharded_head(config)
    if sharded and mesh is None:
        mesh = parallel.mesh_from_config(config)
    head_kind, head_scale = objective.head
    # The sampler's stream is its own, so that PartialFC leaves dropout's draws unchanged.
    sampler_tag = 1

    def sharded_head(params, rng: jax.Array) -> sharded_softmax.ShardedHead:
        return sharded_softmax.ShardedHead(
            mesh, head_kind, head_scale, params["classifier"]["kernel"],
            params["classifier"].get("bias"), config.loss.sample_rate,
            jax.random.fold_in(rng, sampler_tag), model.num_classes)

    def averaged(state: EmaTrainState, params):
        """The moving average after this step: moved towards `params` when they changed."""
        moved = ema_update(state.ema_params, params, ema_decay(decay, state.step // k))
        if k == 1:
            return moved
        changed = completes_update(state.step, k)
        return jax.tree.map(lambda new, old: jnp.where(changed, new, old), moved,
                            state.ema_params)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(base_rng, state.step)
        labels = batch["label"]

        def loss_fn(params, centers):
            variables = {"params": params, "batch_stats": state.batch_stats}
            embeddings, updates = model.apply(variables, batch["image"], train=True,
                                              return_feats=True, mutable=["batch_stats"],
                                              rngs={"dropout": rng})
            # Mixed precision: the backbone may compute in bfloat16, the loss is float32.
            embeddings = embeddings.astype(jnp.float32)
            head = sharded_head(params, rng) if sharded else None
            logits = None if sharded else model.apply({"params": params}, embeddings,
                                                      method=FaceModel.classify)
            total, parts = objective(
                embeddings=embeddings, logits=logits, labels=labels, step=state.step,
                # Without the padded columns (see core/parallel.py padded_classes).
                class_weights=params["classifier"]["kernel"][:, :model.num_classes],
                sharded_head=head,
                centers=centers if train_centers else jax.lax.stop_gradient(centers))
            return total, (logits, embeddings, updates.get("batch_stats", {}), parts)

        (loss, (logits, embeddings, batch_stats, parts)), (grads, center_grads) = \
            jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(state.params, state.centers)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        centers, center_opt_state = state.centers, state.center_opt_state
        if train_centers:
            center_updates, center_opt_state = center_tx.update(center_grads, center_opt_state)
            centers = optax.apply_updates(centers, center_updates)
        elif objective.uses_centers:
            centers = losses.center_update(centers, embeddings, labels, objective.center_alpha)
        metrics = {
            "loss": loss,
            "accuracy": (sharded_softmax.accuracy(sharded_head(state.params, rng), embeddings,
                                                  labels) if sharded
                         else jnp.mean(jnp.argmax(logits, -1) == labels)),
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step // k),
        }
        if len(parts) > 1:
            metrics.update({f"loss_{name}": value for name, value in parts.items()})
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state, centers=centers,
                                  center_opt_state=center_opt_state)
        if decay > 0:
            new_state = new_state.replace(ema_params=averaged(state, params))
        metrics["finite"] = (jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
                             & all_finite(new_state))
        return new_state, metrics

    return step
