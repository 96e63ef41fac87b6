"""A fine-tune's start: the weights of another workdir put into a freshly initialised train state.

`config.init_from` names the source: "WORKDIR" (its newest intact checkpoint), "WORKDIR:STEP" or
"WORKDIR:best" (the best validated step). The source must have this config's model (same
architecture and embedding size); its classes may differ. The backbone, the embedding head and the
BatchNorm statistics are copied; the class weights (`params["classifier"]`) too when the class
counts are equal, else the new head keeps its initialisation. The optimizer state stays the
initial one (zeros, whatever the weights). A source that kept a moving average of its parameters
gives that average (the weights it was evaluated with); a run that keeps one starts its average
at the weights it starts from.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from jfacerec.core import parallel, storage
from jfacerec.core.checkpoint import Checkpointer, select_step
from jfacerec.training.optimizer import HEAD
from jfacerec.training.state import EmaTrainState, TrainState


def parse_source(init_from: str) -> tuple[str, int | None, str]:
    """"WORKDIR[:STEP|:best]" -> (workdir, step or None, "latest" or "best")."""
    workdir, colon, which = init_from.rpartition(":")
    if not colon or os.sep in which:
        return init_from, None, "latest"
    if which == "best":
        return workdir, None, "best"
    if which.isdigit():
        return workdir, int(which), "latest"
    raise ValueError(f"init_from={init_from!r}: after the ':' give a step number or 'best' "
                     f"(WORKDIR, WORKDIR:STEP or WORKDIR:best)")


def source_classes(workdir: str, step: int | None) -> int:
    """The class count of the source checkpoint, read from its meta (no arrays)."""
    shapes = Checkpointer(workdir, read_only=True).meta(step)["param_shapes"]
    kernel = shapes.get(f"['{HEAD}']['kernel']")
    if kernel is None:
        raise ValueError(f"init_from {workdir}: its checkpoint has no {HEAD} kernel; is it a "
                         f"jfacerec workdir?")
    return kernel[-1]


def load_into(state: TrainState, init_from: str, mesh: jax.sharding.Mesh) -> tuple[TrainState, str]:
    """`state` (freshly initialised, with its shardings) with the source's weights; returns it and
    a line saying what was copied.

    FileNotFoundError when the source has no checkpoint; ValueError, naming the source, when its
    model differs from this config's (other parameter shapes).
    """
    workdir, step, which = parse_source(init_from)
    if not storage.isdir(workdir):
        raise FileNotFoundError(f"init_from {workdir}: no such directory; give a trained "
                                f"workdir (WORKDIR, WORKDIR:STEP or WORKDIR:best)")
    step = select_step(workdir, step=step, checkpoint=which)
    classes = source_classes(workdir, step)
    same_head = classes == state.params[HEAD]["kernel"].shape[-1]
    replicated = parallel.replicated(mesh)

    def source_shape(path, leaf):
        shape = leaf.shape
        if jax.tree_util.keystr(path).startswith(f"['params']['{HEAD}']"):
            shape = shape[:-1] + (classes,)
        return jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=replicated)

    abstract = jax.tree_util.tree_map_with_path(
        source_shape, {"params": state.params, "batch_stats": state.batch_stats})
    source, got = Checkpointer(workdir, read_only=True).restore_variables(abstract, step)

    def placed(new: Any, old: Any) -> Any:
        return jax.tree.map(lambda n, o: jax.device_put(n, o.sharding), new, old)

    params = {name: placed(tree, state.params[name])
              if name != HEAD or same_head else state.params[name]
              for name, tree in source["params"].items()}
    state = state.replace(params=params, batch_stats=placed(source["batch_stats"],
                                                            state.batch_stats))
    if isinstance(state, EmaTrainState):
        # Copies, not the same arrays: the train step donates the state, and one buffer
        # donated twice (params and their average) is refused by XLA.
        state = state.replace(ema_params=jax.tree.map(jnp.copy, params))
    head = "and the head" if same_head else f"(a new head: {classes} classes there)"
    return state, f"initialised from step {got} of {workdir}: the backbone {head}"
