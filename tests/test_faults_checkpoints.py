"""Fault injection: damaged checkpoint files, SIGKILL during saves, a state gone NaN, two trainers
in one workdir, a refused resume.

One tiny run is trained once (by the command, as a person would) and each case damages a copy of
its workdir: steps 32, 36 and 40 are kept, so the fallback from a damaged step 40 is step 36.
"""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

import jfacerec
from conftest import REPO, tiny_config
from jfacerec.core import lock, parallel
from jfacerec.core import workdir as workdir_files
from jfacerec.core.checkpoint import (MANIFEST, Checkpointer, DamagedCheckpointError,
                                      DamagedCheckpointWarning)
from jfacerec.evaluation.evaluator import evaluate
from jfacerec.training import NonFiniteLossError, abstract_train_state, train

RUN = {"total_steps": 40, "checkpoint_every_steps": 4, "log_every_steps": 4,
       "keep_checkpoints": 3}


def command(workdir, **overrides):
    """`python -m jfacerec.train` of the tiny config (tests/conftest.py's) with RUN's schedule."""
    settings = {"image_size": 16, "num_devices": 1, "batch_size": 16,
                "optimizer.warmup_steps": 5, "dataset.num_identities": 8,
                "dataset.train_images": 12, "dataset.test_images": 4,
                "dataset.num_unseen_identities": 12, "dataset.unseen_images": 4,
                **RUN, **overrides}
    return [sys.executable, "-m", "jfacerec.train", "--config",
            os.path.join(REPO, "configs", "demo.py:runlocal"), "--workdir", str(workdir),
            *(f"--config.{key}={value}" for key, value in settings.items())]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir trained by the command without interruption: checkpoints 32, 36 and 40."""
    workdir = tmp_path_factory.mktemp("trained") / "w"
    subprocess.run(command(workdir), check=True, cwd=REPO, capture_output=True)
    assert sorted(os.listdir(workdir / "checkpoints"), key=int) == ["32", "36", "40"]
    return str(workdir)


def copy_of(trained, tmp_path):
    target = str(tmp_path / "w")
    shutil.copytree(trained, target)
    return target


def step_dir(workdir, step):
    return os.path.join(workdir, "checkpoints", str(step))


def restore_state(workdir, step=None):
    """(train state on the host, step) of a checkpoint: `step`, or the newest intact."""
    config = workdir_files.read_config(workdir)
    _, _, abstract = abstract_train_state(config, 8, parallel.make_mesh(1))
    state, _, got = Checkpointer(workdir).restore(abstract, step)
    return jax.device_get(state), got


def files_of(workdir):
    """{path: bytes} of every file in a workdir."""
    found = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, workdir)] = f.read()
    return found


# -- Damaged files ---------------------------------------------------------------------------------

def largest_array_file(step):
    return max(glob.glob(os.path.join(step, "state", "ocdbt.process_0", "d", "*")),
               key=os.path.getsize)


FILES = {  # each kind of file of a checkpoint step: its path in the step's directory
    "array data": lambda step: os.path.relpath(largest_array_file(step), step),
    "state _METADATA": lambda step: os.path.join("state", "_METADATA"),
    "_CHECKPOINT_METADATA": lambda step: "_CHECKPOINT_METADATA",
    "data metadata": lambda step: os.path.join("data", "metadata"),
    "meta metadata": lambda step: os.path.join("meta", "metadata"),
}


def flip(path):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        middle = len(data) // 2
        data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
        f.seek(0)
        f.write(data)


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


DAMAGES = {"flip": flip, "truncate": truncate, "delete": os.remove}


def damage(workdir, step, kind, how):
    """Damages the `kind` file of `step` by `how`; returns its path relative to the step."""
    name = FILES[kind](step_dir(workdir, step))
    DAMAGES[how](os.path.join(step_dir(workdir, step), name))
    return name


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind", FILES)
def test_load_skips_a_damaged_checkpoint_with_a_warning_naming_the_file(trained, tmp_path, kind,
                                                                        how):
    workdir = copy_of(trained, tmp_path)
    name = damage(workdir, 40, kind, how)
    with pytest.warns(DamagedCheckpointWarning, match=f"checkpoints/40 is damaged: {name}"):
        model = jfacerec.load(workdir)
    assert model.step == 36
    with pytest.raises(DamagedCheckpointError, match=f"checkpoints/40 is damaged: {name}"):
        jfacerec.load(workdir, step=40)  # asked for by number: no fallback


@pytest.mark.parametrize("kind, how", [("array data", "flip"), ("state _METADATA", "truncate"),
                                       ("meta metadata", "delete")])
def test_training_resumes_from_the_newest_intact_checkpoint(trained, tmp_path, kind, how):
    workdir = copy_of(trained, tmp_path)
    name = damage(workdir, 40, kind, how)
    with pytest.warns(DamagedCheckpointWarning, match=f"checkpoints/40 is damaged: {name}"):
        train(workdir_files.read_config(workdir), workdir)
    # Steps 37 to 40 again, to the same bits; the damaged step is kept aside, out of the way.
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
        "32", "36", "40", "40.damaged"]
    again, step = restore_state(workdir)
    assert step == 40
    chex.assert_trees_all_equal(again, restore_state(trained, 40)[0])
    assert [r["step"] for r in workdir_files.read_metrics(workdir)] == list(range(4, 41, 4))


def test_evaluate_falls_back_from_a_damaged_checkpoint(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    name = damage(workdir, 40, "array data", "flip")
    with pytest.warns(DamagedCheckpointWarning, match=name):
        results = evaluate(workdir_files.read_config(workdir), workdir)
    assert results["step"] == 36


def test_no_intact_checkpoint_is_one_line_naming_each_damaged_file(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    names = [damage(workdir, step, "array data", "truncate") for step in (32, 36)]
    names.append(damage(workdir, 40, "meta metadata", "delete"))
    before = files_of(workdir)
    for attempt in (lambda: jfacerec.load(workdir),
                    lambda: train(workdir_files.read_config(workdir), workdir)):
        with pytest.warns(DamagedCheckpointWarning):
            with pytest.raises(DamagedCheckpointError, match="no intact checkpoint") as error:
                attempt()
        message = str(error.value)
        assert "\n" not in message and all(name in message for name in names), message
    after = files_of(workdir)
    after.pop(workdir_files.LOCK, None)
    before.pop(workdir_files.LOCK, None)
    assert after == before


def test_a_step_without_manifest_is_tried_and_skipped_when_nan_or_unreadable(trained, tmp_path):
    """Steps saved before manifests existed are read unverified; NaN in them (which jfacerec 0.1
    could save) or an orbax failure to read them is damage."""
    workdir = copy_of(trained, tmp_path)
    state, _ = restore_state(workdir, 40)
    checkpointer = Checkpointer(workdir, keep=10)
    checkpointer.save(44, jax.tree.map(lambda x: x * np.nan if x.dtype.kind == "f" else x, state),
                      None)
    checkpointer.close()
    for step in (36, 40, 44):
        os.remove(os.path.join(step_dir(workdir, step), MANIFEST))
    damage(workdir, 40, "state _METADATA", "truncate")
    with pytest.warns(DamagedCheckpointWarning) as warned:
        assert restore_state(workdir)[1] == 36
    unverified = "(saved without sha256.json, unverified) is damaged"
    assert [str(w.message).split(unverified)[1].split(" (")[0] for w in warned] == [
        ": its arrays hold NaN or inf; skipping it", ": orbax cannot read it"]
    assert "checkpoints/44 " in str(warned[0].message)
    assert "checkpoints/40 " in str(warned[1].message)


# -- A state gone NaN ------------------------------------------------------------------------------

def test_a_non_finite_state_is_never_saved_and_the_error_names_a_finite_checkpoint(tmp_path):
    """At learning rate 1e6 the weights go NaN at step 4 while the loss stays finite for two more
    steps (ReLU turns NaN into 0): checking the loss alone saved step 4 and rotated step 2 out."""
    config = tiny_config(image_size=32, batch_size=32, total_steps=40, checkpoint_every_steps=2,
                         keep_checkpoints=1, **{"optimizer.learning_rate": 1e6,
                                                "optimizer.warmup_steps": 100})
    with pytest.raises(NonFiniteLossError) as error:
        train(config, str(tmp_path))
    message = str(error.value)
    steps = Checkpointer(str(tmp_path)).manager.all_steps()
    assert steps, message
    for step in steps:
        chex.assert_tree_all_finite(restore_state(str(tmp_path), step)[0])
    assert "became" in message and f"The last good checkpoint is step {max(steps)} in" in message


# -- A refused resume ------------------------------------------------------------------------------

def test_a_refused_resume_changes_no_file_of_the_workdir(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    before = files_of(workdir)
    config = workdir_files.read_config(workdir)
    config.model.width_multiplier = 0.5
    with pytest.raises(ValueError, match="other shapes"):
        train(config, workdir)
    after = files_of(workdir)
    after.pop(workdir_files.LOCK, None)
    before.pop(workdir_files.LOCK, None)
    assert after == before  # config.json and identities.json included, byte for byte
    assert jfacerec.load(workdir).step == 40


# -- One trainer per workdir -----------------------------------------------------------------------

def test_a_held_workdir_refuses_a_trainer_and_serves_readers(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    with lock.exclusive(workdir):
        with pytest.raises(lock.WorkdirLockedError, match=f"pid {os.getpid()} on "):
            train(workdir_files.read_config(workdir), workdir)
        assert jfacerec.load(workdir).step == 40  # readers take no lock
    with lock.exclusive(workdir):  # released: taken again
        pass


def test_a_second_trainer_exits_at_once_naming_the_workdir_and_the_first(tmp_path):
    workdir = tmp_path / "w"
    first = subprocess.Popen(command(workdir), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        recorded = workdir / "checkpoints" / "4" / MANIFEST
        deadline = time.time() + 300
        while not recorded.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # mid-run, holding the lock, for as long as we need
        assert recorded.exists(), "the first trainer saved nothing"
        before = files_of(workdir)
        second = subprocess.run(command(workdir), cwd=REPO, capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), second.stderr
        assert str(workdir) in lines[0] and f"pid {first.pid} on " in lines[0], lines[0]
        assert files_of(workdir) == before  # the second wrote nothing
        assert jfacerec.load(str(workdir)).step >= 4  # read while it trains
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


# -- SIGKILL at any moment -------------------------------------------------------------------------

def saving(checkpoints, after):
    """A save has started but is not finished: orbax writes into a temporary directory."""
    return any(".orbax-checkpoint-tmp" in name for name in os.listdir(checkpoints))


def finished_unrecorded(checkpoints, after):
    """A step after `after` is finished (renamed into place) but its manifest is not written."""
    return any(name.isdigit() and int(name) > after
               and not os.path.exists(os.path.join(checkpoints, name, MANIFEST))
               for name in os.listdir(checkpoints))


def recorded(checkpoints, after):
    """A step after `after` is recorded: rotation follows."""
    return any(name.isdigit() and int(name) > after
               and os.path.exists(os.path.join(checkpoints, name, MANIFEST))
               for name in os.listdir(checkpoints))


def test_sigkill_at_any_moment_of_a_save_then_resume_gives_identical_bits(trained, tmp_path):
    workdir = tmp_path / "w"
    checkpoints = workdir / "checkpoints"
    resumed_from = []
    for moment in (saving, finished_unrecorded, recorded):
        after = max((int(n) for n in os.listdir(checkpoints) if n.isdigit()), default=0) \
            if checkpoints.exists() else 0
        resumed_from.append(after)
        proc = subprocess.Popen(command(workdir), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if checkpoints.exists() and moment(str(checkpoints), after):
                break
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, f"{moment.__name__}: the run ended first"
    subprocess.run(command(workdir), check=True, cwd=REPO, capture_output=True)
    assert resumed_from == sorted(resumed_from)
    chex.assert_trees_all_equal(restore_state(str(workdir), 40)[0],
                                restore_state(trained, 40)[0])  # bitwise
    def without_speed(rows):
        return [{k: v for k, v in r.items() if k != "images_per_second"} for r in rows]

    straight = workdir_files.read_metrics(trained)
    assert [r["step"] for r in straight] == list(range(4, 41, 4))
    assert without_speed(workdir_files.read_metrics(str(workdir))) == without_speed(straight)
