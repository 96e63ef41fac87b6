"""The training loop: config -> model, optimizer, sharded jitted step, checkpoints and logs.

`train(config, workdir, validate)` reads top to bottom like big_vision's train.py: workdir and
logging; mesh; input pipeline; model and optimizer; shardings and the jitted step; resume (or a
fine-tune's start); the loop, validating every `config.eval.every_steps` steps when a `validate`
callback is given (the evaluation layer builds it: jfacerec.evaluation.validation).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jfacerec.core import atomic, lock, parallel, storage
from jfacerec.core import workdir as workdir_files
from jfacerec.core.checkpoint import Checkpointer
from jfacerec.data import pipeline, sources
from jfacerec.data.records import FaceDataset
from jfacerec.models import xla_cpu
from jfacerec.training import init_from
from jfacerec.training.state import (EmaTrainState, TrainState, abstract_train_state,
                                     state_from_config)
from jfacerec.training.step import make_train_step


def _say(message: str) -> None:
    """A line for the person at the terminal (process 0 only), clear of the progress bar."""
    if jax.process_index() == 0:
        tqdm.write(message)


class NonFiniteLossError(RuntimeError):
    """The loss, the gradients or the train state became NaN or infinite; the run stopped before
    saving anything from that point."""


class Validator(Protocol):
    """Validation during training: `validator(variables, step)` -> {"val/<set>/<metric>": value}.

    It must leave the variables ({"params", "batch_stats"}) unchanged and draw nothing from the
    training's random streams or data. `best_key` is the figure that picks the best checkpoint,
    `higher_is_better` its direction.
    """

    best_key: str
    higher_is_better: bool

    def __call__(self, variables: dict[str, Any], step: int) -> dict[str, float]: ...


class _Best:
    """The best validation figure so far and whether a new one beats it."""

    def __init__(self, validator: Validator, saved: dict | None):
        self.key, self.higher = validator.best_key, validator.higher_is_better
        self.value = saved["value"] if saved is not None and saved["metric"] == self.key else None

    def improved_by(self, figures: dict[str, float]) -> bool:
        new = figures.get(self.key)
        if new is None:
            raise ValueError(f"eval.best_metric {self.key!r} is not among the validation figures "
                             f"{sorted(figures)}; set --config.eval.best_metric=SET/METRIC")
        if not np.isfinite(new):
            return False
        if self.value is None or (new > self.value if self.higher else new < self.value):
            self.value = new
            return True
        return False


class _Logger:
    """metrics.jsonl and TensorBoard, written by process 0 only."""

    def __init__(self, workdir: str, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.workdir = workdir
        self.writer = None
        if not self.enabled:
            return
        # Lines written after the checkpoint we resume from describe steps that will be redone.
        workdir_files.keep_metrics(workdir, resume_step)
        self.writer = workdir_files.tensorboard_writer(workdir)

    def write(self, record: dict[str, float], prefix: str = "train/") -> None:
        """One line of metrics.jsonl; TensorBoard's tags are `prefix` + key."""
        if not self.enabled:
            return
        workdir_files.append_metrics(record, self.workdir)
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(f"{prefix}{key}", value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _check_finite(metrics: list[dict], first_step: int, checkpointer: Checkpointer) -> None:
    """Raises NonFiniteLossError at the first of these steps (the first is `first_step` + 1)
    whose `finite` flag is down, naming the newest checkpoint that is intact (every checkpoint
    this loop saves is finite), or saying that there is none."""
    for offset, m in enumerate(metrics):
        if not m["finite"]:
            checkpointer.wait()
            good = checkpointer.newest_verified_step()
            if not np.isfinite(m["loss"]):
                what = f"the loss became {m['loss']}"
            elif not np.isfinite(m["grad_norm"]):
                what = f"the gradient norm became {m['grad_norm']} (loss {m['loss']:.4g})"
            else:
                what = (f"the train state (parameters or optimizer state) became NaN or infinite "
                        f"(loss {m['loss']:.4g})")
            last = (f"The last good checkpoint is step {good} in {checkpointer.directory}."
                    if good is not None else
                    f"No good checkpoint was saved in {checkpointer.directory}.")
            raise NonFiniteLossError(
                f"{what} at step {first_step + offset + 1}; stopped without saving from that "
                f"point. {last} Lower optimizer.learning_rate, set optimizer.grad_clip_norm, or "
                f"check the data.")


def _record(metrics: list[dict], step: int, batch_size: int, elapsed: float) -> dict[str, float]:
    """The metrics.jsonl record of the steps since the last one: means, the last learning rate
    and the throughput (the `finite` flags were checked, and are not recorded)."""
    record = {"step": step, **{k: float(np.mean([m[k] for m in metrics]))
                               for k in metrics[0] if k != "finite"}}
    record["learning_rate"] = float(metrics[-1]["learning_rate"])
    record["images_per_second"] = len(metrics) * batch_size / elapsed
    return record


def evaluated_variables(state: TrainState) -> dict[str, Any]:
    """{"params", "batch_stats"} that validation measures: the moving average of the parameters
    when the state keeps one (the weights evaluation and jfacerec.load restore), else the
    parameters. The BatchNorm statistics are the training's own (they are not averaged)."""
    params = state.ema_params if isinstance(state, EmaTrainState) else state.params
    return {"params": params, "batch_stats": state.batch_stats}


def train(config: ml_collections.ConfigDict, workdir: str,
          validate: Validator | None = None, *,
          dataset: FaceDataset | None = None) -> TrainState:
    """Trains (or resumes) the model of `config`, writing everything under `workdir`.

    A new run starts from `config.init_from`'s weights when it names a workdir; a resumed one
    from its own checkpoint. With `validate` and `config.eval.every_steps`, the model is
    validated every that many steps (and at the last): its figures go to metrics.jsonl and
    TensorBoard, and the best step by `validate.best_key` is checkpointed and kept.

    `dataset` (default: `sources.get_dataset(config)`) is the config's dataset when the caller
    already holds it, decoded once for several trainings (benchmarks/time_to_accuracy.py).

    Process 0 holds the workdir's lock throughout: a second trainer there raises
    WorkdirLockedError at once. A refused run (a config that does not fit the checkpoint, no
    intact checkpoint) raises before anything in the workdir is written.
    """
    if jax.process_index() == 0:
        # A missing bucket, no credentials, a read-only or rename-less file system: one line now.
        atomic.check_writable(workdir)
    storage.makedirs(workdir)
    held = lock.exclusive(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with held:
        return _train(config, workdir, validate if config.eval.every_steps else None,
                      sources.get_dataset(config) if dataset is None else dataset)


def _train(config: ml_collections.ConfigDict, workdir: str, validate: Validator | None,
           dataset: FaceDataset) -> TrainState:
    # -- Device mesh ------------------------------------------------------------------------------
    mesh = parallel.mesh_from_config(config)
    n_dev = mesh.devices.size
    if config.batch_size % n_dev:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the {n_dev} devices")
    batch_sharding = parallel.data_sharding(mesh)

    # -- Input pipeline ---------------------------------------------------------------------------
    train_ds = pipeline.train_dataset(
        dataset.train, batch_size=config.batch_size, image_size=config.image_size,
        seed=config.seed, augment=pipeline.Augment(**config.input.augment),
        num_workers=config.input.num_workers, num_threads=config.input.num_threads,
        worker_threads=config.input.worker_threads,
        process_index=jax.process_index(), process_count=jax.process_count(),
        sampler=config.input.sampler, pk_images=config.input.pk_images)
    data_iter = iter(train_ds)
    _say(f"training data: {dataset.train!r}")

    # -- Model, optimizer, shardings and the jitted step ------------------------------------------
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints,
                                num_classes=dataset.num_classes)
    # A resumed head keeps the width it was saved with (padded on another mesh, maybe).
    saved_columns = checkpointer.head()[1] if checkpointer.latest_step() is not None else 0
    model, tx, abstract = abstract_train_state(config, dataset.num_classes, mesh,
                                               class_columns=saved_columns)
    state_sharding = jax.tree.map(lambda s: s.sharding, abstract)
    train_step = jax.jit(make_train_step(model, tx, config, mesh),
                         in_shardings=(state_sharding, batch_sharding),
                         out_shardings=(state_sharding, parallel.replicated(mesh)),
                         donate_argnums=0, compiler_options=xla_cpu.compiler_options())

    # -- Resume or initialise, then write the workdir's files -------------------------------------
    if checkpointer.latest_step() is not None:
        # Refuses (raises) a checkpoint that does not fit the config before anything is written.
        state, data_state, start = checkpointer.restore(abstract)
        data_iter.set_state(data_state)
        for moved in checkpointer.set_aside_after(start):
            _say(f"moved the damaged checkpoint after step {start} aside to {moved}")
        _say(f"resumed from step {start} in {checkpointer.directory}")
    else:
        init = jax.jit(lambda rng: state_from_config(model, tx, config, rng),
                       out_shardings=state_sharding)
        state, start = init(jax.random.key(config.seed)), 0
        if config.init_from:
            state, said = init_from.load_into(state, config.init_from, mesh)
            _say(said)
    if jax.process_index() == 0:
        workdir_files.write_config(config, workdir)
        if dataset.names is not None:
            workdir_files.write_identities(dataset.names, workdir)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    _say(f"{config.model.name}: {num_params:,} parameters, {dataset.num_classes} classes, "
         f"loss {config.loss.name}, {n_dev} device(s), {jax.process_count()} process(es)")

    # -- The loop ---------------------------------------------------------------------------------
    logger = _Logger(workdir, start)
    saved_best = checkpointer.best()
    # A best step after the one resumed from was set aside as damaged: its figure is void.
    best = None if validate is None else _Best(
        validate, saved_best if saved_best is not None and saved_best["step"] <= start else None)
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
                record = _record(fetched, done, config.batch_size,
                                 time.perf_counter() - interval_start)
                logger.write(record)
                last_record = record
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}",
                                img_s=f"{record['images_per_second']:.0f}")
                pending, interval_start, interval_first = [], time.perf_counter(), done
            new_best = None
            if validate is not None and (done % config.eval.every_steps == 0 or last):
                _check_finite(jax.device_get(pending), interval_first, checkpointer)
                began = time.perf_counter()
                figures = validate(evaluated_variables(state), done)
                logger.write({"step": done, **figures}, prefix="")
                if best.improved_by(figures):
                    new_best = {"metric": best.key, "value": best.value}
                interval_start += time.perf_counter() - began  # not in images/s
            if done % config.checkpoint_every_steps == 0 or last or new_best is not None:
                # Every step since the last log; the steps before were checked when logged.
                _check_finite(jax.device_get(pending), interval_first, checkpointer)
                checkpointer.save(done, state, data_iter.get_state(), best=new_best)
            bar.update(1)
    finally:
        bar.close()
        checkpointer.close()
        logger.close()
        if hasattr(data_iter, "close"):
            data_iter.close()
    if last_record:
        _say(f"step {last_record['step']}: loss {last_record['loss']:.4f}, batch accuracy "
             f"{last_record['accuracy']:.3f}, {last_record['images_per_second']:.0f} images/s; "
             f"checkpoints in {checkpointer.directory}")
    return state
