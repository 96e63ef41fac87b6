"""Orbax checkpoints: the train state and the data iterator's position, saved together.

Layout: `WORKDIR/checkpoints/<step>/{state,data,meta}`. `state` is the train-state pytree (no
pickle), `data` the grain iterator state (JSON) and `meta` a small JSON record of the format version
and the shapes of the parameters, checked on restore.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jfacerec.core import workdir as workdir_files

FORMAT_VERSION = 1


def _shapes(tree: Any) -> dict[str, list[int]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): list(leaf.shape) for path, leaf in flat}


class Checkpointer:
    """Saves every `every_steps` (asynchronously) and keeps the newest `keep`."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(workdir_files.path(workdir, workdir_files.CHECKPOINTS))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict | None) -> None:
        """Starts saving `state` (a pytree of arrays) and the iterator state at `step`."""
        meta = {"format_version": FORMAT_VERSION, "step": step,
                "param_shapes": _shapes(state.params)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(meta)))

    def meta(self, step: int | None = None) -> dict:
        """The format version, step and parameter shapes saved with a checkpoint (newest by
        default), without reading the arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return meta["meta"]

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """Restores (state, data_state, step) into the shapes and shardings of `abstract_state`.

        Raises ValueError, naming the checkpoint, when it was written by another format version
        or for parameters of other shapes (another model or config).
        """
        step = self._checked_step(abstract_state.params, step)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out["state"], out["data"], step

    def _checked_step(self, abstract_params: Any, step: int | None) -> int:
        """`step` (the newest by default), once its format version and parameter shapes are
        those of `abstract_params`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        where = os.path.join(self.directory, str(step))
        meta = self.meta(step)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"checkpoint {where} has format version {meta.get('format_version')}, "
                             f"this jfacerec reads version {FORMAT_VERSION}")
        expected = _shapes(abstract_params)
        if meta.get("param_shapes") != expected:
            diff = sorted(k for k in set(expected) | set(meta.get("param_shapes", {}))
                          if expected.get(k) != meta.get("param_shapes", {}).get(k))
            raise ValueError(
                f"checkpoint {where} holds parameters of other shapes than this config's model "
                f"(first differences: {diff[:3]}); use the config it was trained with, or a new "
                f"--workdir")
        return step

    def restore_variables(self, abstract: dict[str, Any],
                          step: int | None = None) -> tuple[dict[str, Any], int]:
        """Restores only `abstract`'s entries of the state ({"params", "batch_stats"}), for
        inference: the optimizer state is neither read nor needed. Returns (variables, step)."""
        step = self._checked_step(abstract["params"], step)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True)))
        return {key: out["state"][key] for key in abstract}, step

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
