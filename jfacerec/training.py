"""The training loop: config -> model, optimizer, sharded jitted step, checkpoints and logs.

`train(config, workdir)` reads top to bottom like big_vision's train.py: workdir and logging;
mesh; input pipeline; model and optimizer; shardings and the jitted step; resume; the loop.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from jfacerec import losses, parallel, sharded_softmax
from jfacerec.checkpoint import Checkpointer
from jfacerec.data import pipeline, sources
from jfacerec.models import FaceModel, get_model
from jfacerec.objectives import Objective


def _say(message: str) -> None:
    """A line for the person at the terminal (process 0 only), clear of the progress bar."""
    if jax.process_index() == 0:
        tqdm.write(message)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped before saving anything from that point."""


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training: a pure pytree of arrays."""

    step: jax.Array  # int32 scalar, steps taken
    params: Any
    batch_stats: Any  # BatchNorm running statistics; an empty dict for other norms
    opt_state: Any
    centers: Any  # center-loss class centres [num_classes, dim]; {} when unused
    center_opt_state: Any  # their optimizer's state when they are trained as parameters


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> FaceModel:
    m = config.model
    head, head_scale = Objective.from_config(config).head
    return get_model(m.name, num_classes=num_classes, embedding_dim=m.embedding_dim, norm=m.norm,
                     norm_groups=m.norm_groups, width_multiplier=m.width_multiplier,
                     dropout=m.dropout, dropblock=m.get("dropblock", 0.0),
                     dtype=jnp.dtype(config.dtype), head=head,
                     head_scale=head_scale)


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


def uses_sharded_head(config: ml_collections.ConfigDict) -> bool:
    """Whether the class weights are split over the mesh's `model` axis or sampled (PartialFC)."""
    return (config.get("mesh", {}).get("model", 1) > 1
            or config.loss.get("sample_rate", 1.0) < 1.0)


def make_train_step(model: FaceModel, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict,
                    mesh: jax.sharding.Mesh | None = None) -> Callable:
    """(state, batch) -> (state, metrics): one optimizer step on a global batch.

    batch: `image` float32 [batch, size, size, 3], `label` int32 [batch]. `mesh` (by default the
    config's) carries the class weights' `model` split when `uses_sharded_head(config)`.
    """
    objective = Objective.from_config(config)
    train_centers = objective.uses_centers and objective.center_update == "param"
    center_tx = center_optimizer(objective)
    schedule = learning_rate_schedule(config)
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
            params["classifier"].get("bias"), config.loss.get("sample_rate", 1.0),
            jax.random.fold_in(rng, sampler_tag))

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
                class_weights=params["classifier"]["kernel"], sharded_head=head,
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
            "learning_rate": schedule(state.step),
        }
        if len(parts) > 1:
            metrics.update({f"loss_{name}": value for name, value in parts.items()})
        new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                               opt_state=opt_state, centers=centers,
                               center_opt_state=center_opt_state)
        return new_state, metrics

    return step


def abstract_train_state(config: ml_collections.ConfigDict, num_classes: int,
                         mesh: jax.sharding.Mesh):
    """(model, optimizer, abstract state with shardings): shapes only, nothing computed."""
    parallel.check_class_split(num_classes, mesh)
    model = build_model(config, num_classes)
    tx = make_optimizer(config)
    objective = Objective.from_config(config)
    shapes = jax.eval_shape(lambda: init_state(model, tx, config.image_size,
                                               jax.random.key(config.seed), objective))
    abstract = jax.tree_util.tree_map_with_path(
        lambda path, s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=_sharding(path, s, mesh)),
        shapes)
    return model, tx, abstract


_CLASS_WEIGHTS = ("['classifier']['kernel']", "['classifier']['bias']")


def _sharding(path: tuple, leaf: jax.ShapeDtypeStruct,
              mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """The classifier's kernel and bias, and their optimizer moments, split by class over `model`
    (no device holds every class); everything else replicated (the backbone is data parallel)."""
    if leaf.ndim and jax.tree_util.keystr(path).endswith(_CLASS_WEIGHTS):
        return parallel.class_sharding(mesh, leaf.ndim)
    return parallel.replicated(mesh)


class _Logger:
    """metrics.jsonl and TensorBoard, written by process 0 only."""

    def __init__(self, workdir: str, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.writer = None
        if not self.enabled:
            return
        if os.path.exists(self.path):
            # Lines written after the checkpoint we resume from describe steps that will be redone.
            with open(self.path) as f:
                kept = [l for l in f if l.strip() and json.loads(l)["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        from tensorboardX import SummaryWriter  # deferred: only process 0 writes events
        self.writer = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(f"train/{key}", value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _check_finite(metrics: list[dict], first_step: int, checkpointer: Checkpointer) -> None:
    for offset, m in enumerate(metrics):
        if not np.isfinite(m["loss"]):
            checkpointer.wait()
            last = checkpointer.latest_step()
            raise NonFiniteLossError(
                f"the loss became {m['loss']} at step {first_step + offset + 1}; stopped without "
                f"saving from that point. The last good checkpoint is step {last} in "
                f"{checkpointer.directory}. Lower optimizer.learning_rate, set "
                f"optimizer.grad_clip_norm, or check the data.")


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


IDENTITIES_FILE = "identities.json"


def write_identities(names: tuple[str, ...] | None, workdir: str) -> None:
    """The training identities' names (class i is names[i]), for predictions by name."""
    if names is not None and jax.process_index() == 0:
        with open(os.path.join(workdir, IDENTITIES_FILE), "w") as f:
            json.dump(list(names), f)


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (or resumes) the model of `config`, writing everything under `workdir`."""
    # -- Workdir and logging ----------------------------------------------------------------------
    os.makedirs(workdir, exist_ok=True)
    write_config(config, workdir)

    # -- Device mesh ------------------------------------------------------------------------------
    mesh = parallel.mesh_from_config(config)
    n_dev = mesh.devices.size
    if config.batch_size % n_dev:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the {n_dev} devices")
    batch_sharding = parallel.data_sharding(mesh)

    # -- Input pipeline ---------------------------------------------------------------------------
    dataset = sources.get_dataset(config)
    train_ds = pipeline.train_dataset(
        dataset.train, batch_size=config.batch_size, image_size=config.image_size,
        seed=config.seed, augment=pipeline.Augment(**config.input.augment),
        num_workers=config.input.num_workers, num_threads=config.input.num_threads,
        worker_threads=config.input.get("worker_threads", 0),
        process_index=jax.process_index(), process_count=jax.process_count(),
        sampler=config.input.get("sampler", "random"), pk_images=config.input.get("pk_images", 4))
    data_iter = iter(train_ds)
    _say(f"training data: {dataset.train!r}")
    write_identities(dataset.names, workdir)

    # -- Model, optimizer, shardings and the jitted step ------------------------------------------
    model, tx, abstract = abstract_train_state(config, dataset.num_classes, mesh)
    state_sharding = jax.tree.map(lambda s: s.sharding, abstract)
    train_step = jax.jit(make_train_step(model, tx, config, mesh),
                         in_shardings=(state_sharding, batch_sharding),
                         out_shardings=(state_sharding, parallel.replicated(mesh)),
                         donate_argnums=0, compiler_options=parallel.compiler_options())

    # -- Resume or initialise ---------------------------------------------------------------------
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
    if checkpointer.latest_step() is not None:
        state, data_state, start = checkpointer.restore(abstract)
        data_iter.set_state(data_state)
        _say(f"resumed from step {start} in {checkpointer.directory}")
    else:
        objective = Objective.from_config(config)
        init = jax.jit(lambda rng: init_state(model, tx, config.image_size, rng, objective),
                       out_shardings=state_sharding)
        state, start = init(jax.random.key(config.seed)), 0
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    _say(f"{config.model.name}: {num_params:,} parameters, {dataset.num_classes} classes, "
         f"loss {config.loss.name}, {n_dev} device(s), {jax.process_count()} process(es)")

    # -- The loop ---------------------------------------------------------------------------------
    logger = _Logger(workdir, start)
    last_record: dict[str, float] = {}
    pending: list[dict] = []  # metrics of steps since the last log, still on device
    interval_start, interval_first = time.perf_counter(), start
    bar = tqdm(total=config.total_steps, initial=start, desc="train", unit="step",
               disable=jax.process_index() != 0, dynamic_ncols=True)
    try:
        for step in range(start, config.total_steps):
            batch = pipeline.to_global(next(data_iter), batch_sharding)
            if step == start and jax.process_count() > 1:
                # Compile before the first collective, then meet: processes that finish compiling
                # far apart would otherwise time out setting up the gloo communicators.
                train_step = train_step.lower(state, batch).compile()
                parallel.barrier(f"jfacerec-train-step-compiled-{start}")
            state, metrics = train_step(state, batch)
            pending.append(metrics)
            done = step + 1
            last = done == config.total_steps
            if done % config.log_every_steps == 0 or last:
                fetched = jax.device_get(pending)
                _check_finite(fetched, interval_first, checkpointer)
                elapsed = time.perf_counter() - interval_start
                record = {"step": done, **{k: float(np.mean([m[k] for m in fetched]))
                                           for k in fetched[0]}}
                record["learning_rate"] = float(fetched[-1]["learning_rate"])
                record["images_per_second"] = len(fetched) * config.batch_size / elapsed
                logger.write(record)
                last_record = record
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}",
                                img_s=f"{record['images_per_second']:.0f}")
                pending, interval_start, interval_first = [], time.perf_counter(), done
            if done % config.checkpoint_every_steps == 0 or last:
                _check_finite(jax.device_get(pending), interval_first, checkpointer)
                checkpointer.save(done, state, data_iter.get_state())
            bar.update(1)
    finally:
        bar.close()
        checkpointer.wait()
        checkpointer.close()
        logger.close()
        if hasattr(data_iter, "close"):
            data_iter.close()
    if last_record:
        _say(f"step {last_record['step']}: loss {last_record['loss']:.4f}, batch accuracy "
             f"{last_record['accuracy']:.3f}, {last_record['images_per_second']:.0f} images/s; "
             f"checkpoints in {checkpointer.directory}")
    return state
