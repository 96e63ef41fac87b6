"""Orbax checkpoints: the train state and the data iterator's position, saved together, with a
manifest of checksums so that a damaged checkpoint is found before it is used.

Layout: `WORKDIR/checkpoints/<step>/{state,data,meta,sha256.json}`. `state` is the train-state
pytree (no pickle), `data` the grain iterator state (JSON), `meta` a small JSON record of the
format version and the shapes of the parameters, checked on restore, and `sha256.json` the size
and sha256 of every other file of the step.

Integrity. Orbax saves asynchronously and renames a step's directory into place once every file is
written. When a save has finished (at the next save, `wait` or `close`), process 0 records the
step's manifest, atomically; only then are the steps beyond the newest `keep` deleted, so rotation
never removes the last intact checkpoint for one still being written. Restoring checks the step's
files against its manifest first. A step whose files went missing, changed size or changed
content, or that orbax cannot read, is damaged: it is skipped with a DamagedCheckpointWarning for
the newest intact step, and when none is intact a one-line DamagedCheckpointError names what is
damaged. A step without a manifest (written by jfacerec 0.1, or finished by a run killed before
recording it) is tried unverified: orbax failing to read it, or NaN in its arrays, is damage too.

The best step. Validation during training names a step the best so far (`save(..., best=...)`);
once that step is recorded intact, `checkpoints/best.json` says which it is, by which metric and
value (written atomically), and rotation keeps it beside the newest `keep`. `select_step` turns
`checkpoint="best"` into its step number for restoring.

The moving average. A state with an exponential moving average of its parameters (a field
`ema_params`, see training/state.py EmaTrainState) is saved whole, and its meta says so
(`"params_key": "ema_params"`; absent: "params"). `restore_variables` gives the average as the
"params" of inference and fine-tunes; `restore` refuses a state with an average into one without,
and the reverse, saying which config key differs.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jfacerec.core import parallel, storage
from jfacerec.core import workdir as workdir_files
from jfacerec.core.atomic import atomic_open

FORMAT_VERSION = 1
MANIFEST = "sha256.json"
BEST = "best.json"  # in checkpoints/: {"step", "metric", "value"} of the best validated step
EMA_PARAMS = "ema_params"  # the state's moving average of its parameters, in those that have one
_SET_ASIDE = ".damaged"  # suffix of the directories of damaged steps moved out of orbax's sight

T = TypeVar("T")


class DamagedCheckpointError(ValueError):
    """A checkpoint's files are not those that were saved, or cannot be read (a ValueError: the
    commands report it as `error: ...`). `what` says what is damaged, in a few words."""

    def __init__(self, message: str, what: str):
        super().__init__(message)
        self.what = what


class DamagedCheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped for an older one."""


def all_finite(tree: Any) -> jax.Array:
    """bool scalar: no floating-point leaf of `tree` holds NaN or inf (integer leaves are skipped).

    One reduction per leaf, which XLA fuses under jit: cheap next to a train step.
    """
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.True_


_all_finite = jax.jit(all_finite)


def _shapes(tree: Any) -> dict[str, list[int]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): list(leaf.shape) for path, leaf in flat}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with storage.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(step_dir: str) -> list[str]:
    """Every file under `step_dir` but the manifest, relative to it, sorted."""
    return [f for f in storage.files_under(step_dir) if f != MANIFEST]


def write_manifest(step_dir: str) -> None:
    """Records {file: {bytes, sha256}} of a finished step in `step_dir`/sha256.json, atomically:
    a step has the whole manifest or none."""
    files = {}
    for name in _files(step_dir):
        path = storage.join(step_dir, name)
        files[name] = {"bytes": storage.getsize(path), "sha256": _sha256(path)}
    with atomic_open(storage.join(step_dir, MANIFEST)) as f:
        json.dump({"files": files}, f, indent=1, sort_keys=True)


def find_damage(step_dir: str) -> str | None:
    """What differs between a step's files and its manifest, in a few words naming the file; None
    when nothing does, or when the step has no manifest (see `has_manifest`)."""
    manifest = storage.join(step_dir, MANIFEST)
    if not storage.isfile(manifest):
        return None
    try:
        recorded = json.loads(storage.read_text(manifest))["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    for name, saved in sorted(recorded.items()):
        path = storage.join(step_dir, name)
        if not storage.isfile(path):
            return f"{name} is missing"
        size = storage.getsize(path)
        if size != saved["bytes"]:
            return f"{name} has {size} bytes, {saved['bytes']} were saved"
        if _sha256(path) != saved["sha256"]:
            return f"{name} changed after it was saved (sha256 differs)"
    return None


def has_manifest(step_dir: str) -> bool:
    return storage.isfile(storage.join(step_dir, MANIFEST))


def _one_line(e: BaseException) -> str:
    """An exception as `Type: first line of its message` (orbax and TensorStore write pages)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


class Checkpointer:
    """Saves train states asynchronously, records each finished one in its manifest and keeps the
    newest `keep` and the best validated one; restores a given step, or the newest intact one."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False, num_classes: int | None = None):
        if keep < 1:
            raise ValueError(f"keep_checkpoints is {keep}: keep at least 1 checkpoint")
        self.directory = storage.absolute(
            workdir_files.path(workdir, workdir_files.CHECKPOINTS))
        self.keep = keep
        self.num_classes = num_classes  # saved in each checkpoint's meta: its head may be padded
        # No max_to_keep: orbax would rotate before a new step is recorded; `_rotate` does it after.
        # Readers (read_only) never create the checkpoints folder in what may not be a workdir.
        options = ocp.CheckpointManagerOptions(
            create=not read_only, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))
        self._unrecorded: list[int] = []  # steps saved by this object, without a manifest yet
        self._best_pending: dict[int, dict] = {}  # their best records, written once recorded
        best = None if read_only else self.best()
        self._best_step = None if best is None else best["step"]  # never rotated out

    def step_dir(self, step: int) -> str:
        return storage.join(self.directory, str(step))

    def latest_step(self) -> int | None:
        """The newest step on disk, intact or not."""
        return self.manager.latest_step()

    def best(self) -> dict | None:
        """{"step", "metric", "value"} of the best validated step, or None when validation named
        none or that step is no longer on disk (moved aside after damage)."""
        path = storage.join(self.directory, BEST)
        if not storage.isfile(path):
            return None
        try:
            best = json.loads(storage.read_text(path))
            step = int(best["step"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e}); delete it, and "
                             f"the newest checkpoint will be taken for the best") from e
        return best if step in self.manager.all_steps() else None

    def save(self, step: int, state: Any, data_state: dict | None, *,
             best: dict | None = None) -> None:
        """Starts saving `state` (a pytree of finite arrays) and the iterator state at `step`,
        once the previous save is finished, recorded and rotated. `best` ({"metric", "value"})
        names this step the best so far: recorded in best.json once the step is intact."""
        self._finish_saves()
        meta = {"format_version": FORMAT_VERSION, "step": step,
                "param_shapes": _shapes(state.params)}
        if self.num_classes is not None:
            meta["num_classes"] = self.num_classes
        if hasattr(state, EMA_PARAMS):
            meta["params_key"] = EMA_PARAMS
        if self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state or {}),
                meta=ocp.args.JsonSave(meta))):
            self._unrecorded.append(step)
            if best is not None:
                self._best_pending[step] = {"step": step, **best}

    def _finish_saves(self) -> None:
        """Waits for the started saves, records their manifests (process 0), then rotates.
        A save that failed is no longer among orbax's steps, and is not recorded."""
        self.manager.wait_until_finished()
        finished = [s for s in self._unrecorded if s in self.manager.all_steps()]
        pending, self._unrecorded, self._best_pending = self._best_pending, [], {}
        if not finished:
            return
        for step in finished:
            if jax.process_index() == 0:
                write_manifest(self.step_dir(step))
            if step in pending:
                # After the manifest: best.json never names a step that is not intact.
                if jax.process_index() == 0:
                    with atomic_open(storage.join(self.directory, BEST)) as f:
                        json.dump(pending[step], f, indent=1, sort_keys=True)
                self._best_step = step
        self._rotate()

    def _rotate(self) -> None:
        """Deletes the steps older than the newest `keep` (the newest was just recorded intact),
        except the best one. Every process calls it on the same steps; orbax deletes on
        process 0."""
        steps = sorted(self.manager.all_steps())
        for step in steps[:max(len(steps) - self.keep, 0)]:
            if step != self._best_step:
                self.manager.delete(step)

    def newest_verified_step(self) -> int | None:
        """The newest step whose files match its manifest: one saved intact by this jfacerec,
        hence finite (the loop saves no other state). None when there is none."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            where = self.step_dir(step)
            if has_manifest(where) and find_damage(where) is None:
                return step
        return None

    def meta(self, step: int | None = None) -> dict:
        """The format version, step and parameter shapes saved with a checkpoint (the newest
        intact by default), without reading the arrays."""
        return self._newest_intact(lambda s: self._read(
            s, None, lambda _: dict(meta=ocp.args.JsonRestore())), step)[0]["meta"]

    def params_key(self, step: int | None = None) -> str:
        """The state's entry holding the parameters to use at `step` (the newest intact by
        default): "ema_params" when the run kept a moving average of them, else "params"."""
        return _params_key(self.meta(step))

    def head(self, step: int | None = None) -> tuple[int, int]:
        """(classes, columns) of the classifier saved at `step` (the newest intact by default):
        the columns include the padding that split it over a mesh (core/parallel.py
        padded_classes); a checkpoint saved without its class count (older, or converted) has
        no padding."""
        meta = self.meta(step)
        columns = next(shape[-1] for key, shape in meta["param_shapes"].items()
                       if key.startswith("['classifier']") and key.endswith("['kernel']"))
        return meta.get("num_classes", columns), columns

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """Restores (state, data_state, step) into the shapes and shardings of `abstract_state`,
        from `step` or else the newest intact checkpoint (warning about each damaged one skipped).

        Raises ValueError, naming the checkpoint, when it was written by another format version
        or for parameters of other shapes (another model or config); DamagedCheckpointError when
        `step` is damaged, or no step is intact.
        """
        expected = EMA_PARAMS if hasattr(abstract_state, EMA_PARAMS) else "params"
        out, step = self._newest_intact(lambda s: self._read(
            s, abstract_state.params, lambda _: dict(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
            params_key=expected), step)
        return out["state"], out["data"], step

    def restore_variables(self, abstract: dict[str, Any], step: int | None = None, *,
                          ema: bool = True) -> tuple[dict[str, Any], int]:
        """Restores only `abstract`'s entries of the state ({"params", "batch_stats"}), for
        inference, like `restore`: the optimizer state is neither read nor needed. With `ema`,
        "params" are the moving average of the parameters when the checkpoint has one (see
        `params_key`). Returns (variables, step)."""

        def items(meta: dict) -> dict:
            source = _params_key(meta) if ema else "params"
            renamed = {source if key == "params" else key: tree for key, tree in abstract.items()}
            return dict(state=ocp.args.PyTreeRestore(
                renamed, restore_args=ocp.checkpoint_utils.construct_restore_args(renamed),
                partial_restore=True))

        out, step = self._newest_intact(lambda s: self._read(s, abstract["params"], items), step)
        state = out["state"]
        source = EMA_PARAMS if ema and EMA_PARAMS in state else "params"
        return {key: state[source if key == "params" else key] for key in abstract}, step

    def set_aside_after(self, step: int) -> list[str]:
        """Moves the steps after `step` (the damaged ones a resume skipped) to
        `<step>.damaged[-n]` beside them, out of orbax's sight, so that training can save those
        steps again. Kept, not deleted: a read error may have been passing. Returns their paths."""
        newer = [s for s in sorted(self.manager.all_steps()) if s > step]
        if not newer:
            return []
        moved = [self._unused_name(f"{self.step_dir(s)}{_SET_ASIDE}") for s in newer]
        if jax.process_index() == 0:
            for s, target in zip(newer, moved):
                storage.rename(self.step_dir(s), target)
        parallel.barrier(f"jfacerec-checkpoints-set-aside-after-{step}")
        self.manager.reload()
        if self._best_step in newer:
            self._best_step = None
        return moved

    @staticmethod
    def _unused_name(path: str) -> str:
        n, candidate = 1, path
        while storage.exists(candidate):
            n, candidate = n + 1, f"{path}-{n}"
        return candidate

    def _newest_intact(self, read: Callable[[int], T], step: int | None) -> tuple[T, int]:
        """(read(step), step) for `step`, or else for the newest step that `read` finds intact."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} (its "
                                        f"steps: {sorted(steps)})")
            try:
                return read(step), step
            except DamagedCheckpointError as e:  # asked for by number: no fallback
                raise DamagedCheckpointError(f"{e}; ask for another of the steps {sorted(steps)}, "
                                             f"or for none to get the newest intact", e.what) from e
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        damage = []
        for candidate in steps:
            try:
                return read(candidate), candidate
            except DamagedCheckpointError as e:
                damage.append(f"step {candidate}: {e.what}")
                warnings.warn(f"{e}; skipping it", DamagedCheckpointWarning)
        what = "; ".join(damage)
        raise DamagedCheckpointError(
            f"no intact checkpoint in {self.directory} ({what}): restore the checkpoints from a "
            f"copy, or train again in a new --workdir", what)

    def _read(self, step: int, abstract_params: Any, items: Callable[[dict | None], dict], *,
              params_key: str | None = None) -> dict:
        """orbax's restore of the items `items(meta)` at `step`, after its files are checked
        against the manifest and its meta (read when `abstract_params` is given, else None)
        against `abstract_params` and, when given, `params_key` (see `params_key`).

        DamagedCheckpointError when the files differ from the manifest, or when orbax cannot read
        a step without one or finds NaN in it. Orbax failing on a step whose files are intact is
        no damage: the config does not fit it (ValueError).
        """
        where = self.step_dir(step)
        damage = find_damage(where)
        if damage is not None:
            raise DamagedCheckpointError(f"checkpoint {where} is damaged: {damage}", damage)
        verified = has_manifest(where)
        meta = None
        if abstract_params is not None:
            meta = self._orbax(where, verified, lambda: self.manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())))["meta"]
            _check_meta(where, meta, abstract_params, params_key)
        out = self._orbax(where, verified, lambda: self.manager.restore(
            step, args=ocp.args.Composite(**items(meta))))
        if not verified and "state" in out and not bool(_all_finite(out["state"])):
            raise _unverified_damage(where, "its arrays hold NaN or inf")
        return out

    @staticmethod
    def _orbax(where: str, verified: bool, restore: Callable[[], dict]) -> dict:
        try:
            return restore()
        except Exception as e:  # TensorStore and orbax raise anything from Exception up
            if verified:
                raise ValueError(f"checkpoint {where} is intact but does not restore into this "
                                 f"config's train state ({_one_line(e)}); use the config it was "
                                 f"trained with, or a new --workdir") from e
            raise _unverified_damage(where, f"orbax cannot read it ({_one_line(e)})") from e

    def wait(self) -> None:
        """Blocks until every started save is on disk, recorded and rotated."""
        self._finish_saves()

    def close(self) -> None:
        """Finishes the started saves (raising a failed save's error) and stops orbax's
        threads, even when a save failed."""
        try:
            self._finish_saves()
        finally:
            self.manager.close()


def select_step(workdir: str, *, step: int | None = None, checkpoint: str = "latest") -> int | None:
    """The step to restore from `workdir`: `step` when given; with `checkpoint="best"` the best
    validated step (checkpoints/best.json); else None, the newest intact one.

    FileNotFoundError when "best" is asked of a workdir whose training recorded no best step;
    ValueError for another `checkpoint`, or for both a `step` and "best".
    """
    if checkpoint not in ("latest", "best"):
        raise ValueError(f"checkpoint={checkpoint!r}: choose 'latest' or 'best'")
    if checkpoint == "latest":
        return step
    if step is not None:
        raise ValueError(f"both step={step} and checkpoint='best' were asked for; give one")
    checkpointer = Checkpointer(workdir, read_only=True)
    best = checkpointer.best()
    if best is None:
        raise FileNotFoundError(
            f"no best checkpoint in {checkpointer.directory} (no {BEST}, or its step is gone): "
            f"train with --config.eval.every_steps=N --config.eval.sets=unseen to keep one, or "
            f"load the newest")
    return int(best["step"])


def _unverified_damage(where: str, what: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(
        f"checkpoint {where} (saved without {MANIFEST}, unverified) is damaged: {what}", what)


def _params_key(meta: dict) -> str:
    return meta.get("params_key", "params")


def _check_meta(where: str, meta: dict, abstract_params: Any,
                params_key: str | None = None) -> None:
    """Raises ValueError unless the checkpoint's format version and parameter shapes are those
    of `abstract_params`, and it has a moving average of them when `params_key` is
    "ema_params" (none when "params"; None: either)."""
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {where} has format version {meta.get('format_version')}, "
                         f"this jfacerec reads version {FORMAT_VERSION}")
    if params_key is not None and _params_key(meta) != params_key:
        has = "has a" if _params_key(meta) == EMA_PARAMS else "has no"
        raise ValueError(f"checkpoint {where} {has} moving average of the parameters and this "
                         f"config's ema.decay says the opposite; resume with the ema.decay it "
                         f"was trained with, or train in a new --workdir")
    expected, saved = _shapes(abstract_params), meta.get("param_shapes", {})
    if saved != expected:
        diff = sorted(k for k in set(expected) | set(saved) if expected.get(k) != saved.get(k))
        raise ValueError(
            f"checkpoint {where} holds parameters of other shapes than this config's model "
            f"(first differences: {diff[:3]}); use the config it was trained with, or a new "
            f"--workdir")
