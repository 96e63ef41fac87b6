"""A converted backbone written as a jfacerec workdir, which `jfacerec.load`, the evaluate and
gallery commands, and training's `config.init_from` open like one trained here.

The workdir holds config.json (the model, 512-d embeddings of 112x112 faces normalised to
(x - 127.5) / 127.5, which the input pipeline's `normalize` already computes), identities.json,
and checkpoint step 0 of a train state whose params and batch_stats are the converted backbone's
and a linear classifier of `num_classes` classes initialised from the config's seed (arcface_torch
releases no classifier; it only serves `classify`, which then means nothing). Everything is
written in a hidden folder beside the workdir, then renamed to it: a failed conversion leaves
nothing.
"""

from __future__ import annotations

import contextlib
import secrets
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jfacerec import models
from jfacerec.core import config_base, storage
from jfacerec.core import workdir as workdir_files
from jfacerec.core.checkpoint import Checkpointer
from jfacerec.interop.arcface_torch import shortened
from jfacerec.models.heads import LinearClassifier
from jfacerec.training.state import TrainState

IMAGE_SIZE = 112  # arcface_torch's aligned crops; IResNet's fc fixes it (a 7x7 map)


def converted_config(model: str, embedding_dim: int) -> ml_collections.ConfigDict:
    """The base config with the converted backbone: `model` with BatchNorm, no dropout, float32,
    112x112 images, a softmax loss (so a linear classifier head)."""
    config = config_base.base_config()
    config.model.update(name=model, embedding_dim=embedding_dim, norm="batch", dropout=0.0,
                        dropblock=0.0, width_multiplier=1.0)
    config.image_size = IMAGE_SIZE
    config.dtype = "float32"
    config.loss.name = "softmax"
    return config


def _flat(tree: Any) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_shapes(backbone: dict[str, Any], expected: dict[str, Any], model: str,
                 source: str) -> None:
    """Raises ValueError naming `source` and listing every variable of the converted backbone
    ({"params", "batch_stats"}) missing from, unexpected in, or of another shape than `expected`
    (the model's)."""
    got, want = _flat(backbone), _flat(expected)
    problems = [f"{k} {got[k]} (the model's: {want[k]})" for k in want
                if k in got and got[k] != want[k]]
    problems += [f"{k} missing" for k in want if k not in got]
    problems += [f"{k} unexpected" for k in got if k not in want]
    if problems:
        raise ValueError(f"{source}: its weights do not fit jfacerec's {model} "
                         f"({len(problems)} differences: {shortened(problems, 5)}); pass the "
                         f"--model the file was trained as")


def _backbone_of(variables: dict[str, Any]) -> dict[str, Any]:
    return {kind: variables[kind]["backbone"] if kind in variables else {}
            for kind in ("params", "batch_stats")}


def complete_variables(backbone: dict[str, Any], model: str, num_classes: int, seed: int,
                       source: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """(config, {"params", "batch_stats"} of the whole FaceModel): `backbone`'s variables,
    checked against the model's shapes, and a classifier initialised from `seed`."""
    try:
        dim = int(backbone["params"]["features"]["scale"].shape[0])
    except KeyError:
        raise ValueError(f"{source}: no embedding layer (`features`) among its weights") from None
    config = converted_config(model, dim)
    config.seed = seed
    face_model = models.from_config(config, num_classes)
    shapes = jax.eval_shape(lambda: face_model.init(
        jax.random.key(0), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)))
    check_shapes(backbone, _backbone_of(shapes), model, source)
    if not all(np.isfinite(x).all() for x in jax.tree.leaves(backbone)):
        raise ValueError(f"{source}: its weights hold NaN or inf; the file is damaged")
    head = LinearClassifier(num_classes).init(jax.random.key(seed),
                                              jnp.zeros((1, dim), jnp.float32))["params"]
    params = {"backbone": backbone["params"], "classifier": head}
    variables = {"params": jax.tree.map(jnp.asarray, params),
                 "batch_stats": jax.tree.map(jnp.asarray, {"backbone": backbone["batch_stats"]})}
    return config, variables


def _check_target(workdir: str) -> None:
    if storage.exists(workdir) and (not storage.isdir(workdir) or storage.listdir(workdir)):
        raise ValueError(f"{workdir} exists and is not empty: convert into a new --workdir (the "
                         f"conversion never writes over a workdir)")


def write_workdir(workdir: str, config: ml_collections.ConfigDict, variables: dict[str, Any],
                  num_classes: int) -> None:
    """Writes config.json, identities.json (the classes named "0", "1", ...) and checkpoint 0
    holding `variables`, into a hidden folder beside `workdir`, renamed to `workdir` once
    complete (on an object store: copied there, then deleted). Refuses (ValueError) a `workdir`
    that exists and is not empty."""
    _check_target(workdir)
    workdir = storage.absolute(workdir)
    parent, name = storage.dirname(workdir), workdir.rsplit("/", 1)[-1]
    storage.makedirs(parent)
    staging = storage.join(parent, f".{name}.converting-{secrets.token_hex(4)}")
    storage.makedirs(staging)
    try:
        state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           batch_stats=variables["batch_stats"], opt_state={}, centers={},
                           center_opt_state={})
        checkpointer = Checkpointer(staging, keep=1, async_save=False)
        try:
            checkpointer.save(0, state, {})
        finally:
            checkpointer.close()
        workdir_files.write_config(config, staging)
        workdir_files.write_identities(tuple(str(i) for i in range(num_classes)), staging)
        _check_target(workdir)
        storage.rename(staging, workdir)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            storage.rmtree(staging)
        raise
