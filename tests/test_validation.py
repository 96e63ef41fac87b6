"""Validation during training: figures every `eval.every_steps` steps that change no bit of the
training, the best checkpoint kept and restorable, and resume after SIGKILL still bit-exact."""

import os
import re
import signal
import struct
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

import jfacerec
from conftest import REPO, tiny_config
from jfacerec.core import parallel
from jfacerec.core import workdir as workdir_files
from jfacerec.core.checkpoint import MANIFEST, Checkpointer, select_step
from jfacerec.data.synthetic import render_faces
from jfacerec.evaluation import plots, validation
from jfacerec.inference.restore import restore
from jfacerec.training import abstract_train_state, train

RUN = {"total_steps": 16, "checkpoint_every_steps": 8, "log_every_steps": 4,
       "keep_checkpoints": 1, "eval.every_steps": 4, "eval.sets": "unseen"}
FIGURES = {f"val/unseen/{m}" for m in ("accuracy", "accuracy_std", "auc", "eer",
                                       "tar@far=1e-3")}


def validated(workdir, **overrides):
    """train() of the tiny config with RUN's schedule and its validator: the final state."""
    config = tiny_config(**{**RUN, **overrides})
    return train(config, str(workdir), validation.from_config(config))


def restore_state(workdir, step=None):
    config = workdir_files.read_config(str(workdir))
    _, _, abstract = abstract_train_state(config, 8, parallel.make_mesh(1))
    return jax.device_get(Checkpointer(str(workdir)).restore(abstract, step)[0])


def tensorboard_scalars(folder):
    """{tag: [(step, value)]} of the TensorBoard event files in `folder` (TFRecord framing: a
    length, its CRC, an Event proto, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for name in sorted(os.listdir(folder)):
        data = (folder / name).read_bytes()
        at = 0
        while at < len(data):
            length = struct.unpack("<Q", data[at:at + 8])[0]
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def without_speed(rows):
    return [{k: v for k, v in r.items() if k != "images_per_second"} for r in rows]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """(workdir, final state) of the same run without validation."""
    workdir = tmp_path_factory.mktemp("plain") / "w"
    return workdir, jax.device_get(train(tiny_config(**{**RUN, "eval.every_steps": 0}),
                                         str(workdir)))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """(workdir, final state) of a validated run without interruption."""
    workdir = tmp_path_factory.mktemp("straight") / "w"
    return workdir, jax.device_get(validated(workdir))


def test_validation_changes_no_bit_of_training_and_logs_every_set_figure(straight, plain):
    workdir, state = straight
    chex.assert_trees_all_equal(state, plain[1])  # params, optimizer state, everything
    records = workdir_files.read_metrics(str(workdir))
    val = [r for r in records if "loss" not in r]
    assert [r["step"] for r in val] == [4, 8, 12, 16]
    assert all(set(r) == {"step"} | FIGURES for r in val)
    assert all(0.0 <= r["val/unseen/auc"] <= 1.0 for r in val)
    train_rows = [r for r in records if "loss" in r]
    assert without_speed(train_rows) == without_speed(workdir_files.read_metrics(str(plain[0])))
    scalars = tensorboard_scalars(workdir / "tb")
    # TensorBoard tags hold [-/\w.] only: tensorboardX writes tar@far=1e-3 as tar_far_1e-3.
    assert {re.sub(r"[^-/\w.]", "_", f) for f in FIGURES} <= set(scalars)
    steps, values = zip(*scalars["val/unseen/auc"])
    assert list(steps) == [r["step"] for r in val]
    assert list(values) == pytest.approx([r["val/unseen/auc"] for r in val], rel=1e-6)  # float32
    assert plots.training_curves(str(workdir)) is not None
    assert (workdir / workdir_files.VALIDATION_PLOT).stat().st_size > 5000


def test_the_best_checkpoint_is_kept_beside_the_newest_and_restores(straight):
    workdir, state = straight
    val = [r for r in workdir_files.read_metrics(str(workdir)) if "loss" not in r]
    accuracies = [r["val/unseen/accuracy"] for r in val]
    best_step = val[int(np.argmax(accuracies))]["step"]  # the first of equal bests
    best = Checkpointer(str(workdir), read_only=True).best()
    assert best == {"step": best_step, "metric": "val/unseen/accuracy",
                    "value": max(accuracies)}
    # keep_checkpoints=1: the newest, and the best even when no checkpoint was due at its step.
    assert sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()) == \
        sorted({best_step, 16})
    config = workdir_files.read_config(str(workdir))
    restored = restore(config, str(workdir), 8, checkpoint="best")
    assert restored.step == best_step == select_step(str(workdir), checkpoint="best")
    chex.assert_trees_all_equal(jax.device_get(restored.variables["params"]),
                                restore_state(workdir, best_step).params)
    assert restore(config, str(workdir), 8).step == 16
    # The public loader: the best by name, the newest by default.
    assert jfacerec.load(str(workdir), checkpoint="best").step == best_step
    assert jfacerec.load(str(workdir)).step == 16


def test_eer_as_best_metric_picks_the_lowest(tmp_path):
    validated(tmp_path, **{"eval.best_metric": "unseen/eer"})
    val = [r for r in workdir_files.read_metrics(str(tmp_path)) if "loss" not in r]
    best = Checkpointer(str(tmp_path), read_only=True).best()
    assert best["metric"] == "val/unseen/eer"
    assert best["value"] == min(r["val/unseen/eer"] for r in val)


def test_a_bin_set_gives_the_figures_of_evaluate_bin(straight, tmp_path):
    """The validator of "unseen,faces.bin" on the step-16 weights: the .bin figures equal
    `evaluate --bin`'s (jfacerec.evaluation.bin_sets), the unseen ones those logged in training."""
    from jfacerec.data.bin import encode, read_bin, write_bin
    from jfacerec.evaluation.bin_sets import evaluate_bins

    issame = np.arange(12) % 2 == 0
    people = np.stack([np.arange(12), np.where(issame, np.arange(12), np.arange(12) + 20)], 1)
    faces = render_faces(people.ravel(), np.tile([0, 1], 12), image_size=24)  # resized to 16
    path = str(tmp_path / "faces.bin")
    write_bin(path, [encode(face, "png") for face in faces], issame.tolist())
    workdir, _ = straight
    config = tiny_config(**{**RUN, "eval.sets": f"unseen,{path}", "eval.best_metric": "faces/eer"})
    validate = validation.from_config(config)
    assert (validate.best_key, validate.higher_is_better) == ("val/faces/eer", False)
    restored = restore(config, str(workdir), 8)
    figures = validate(restored.variables, 16)
    expected, _ = evaluate_bins(restored, [read_bin(path)], image_size=16, batch_size=32,
                                folds=5)
    for metric in validation.METRICS:
        assert figures[f"val/faces/{metric}"] == pytest.approx(expected[f"bin/faces/{metric}"],
                                                               abs=1e-6)
    logged = [r for r in workdir_files.read_metrics(str(workdir)) if "loss" not in r][-1]
    assert {k: v for k, v in figures.items() if k.startswith("val/unseen/")} == pytest.approx(
        {k: v for k, v in logged.items() if k != "step"}, abs=1e-6)


def command(workdir):
    settings = {"image_size": 16, "num_devices": 1, "batch_size": 16,
                "optimizer.warmup_steps": 5, "dataset.num_identities": 8,
                "dataset.train_images": 12, "dataset.test_images": 4,
                "dataset.num_unseen_identities": 12, "dataset.unseen_images": 4,
                "eval.batch_size": 32, "eval.num_pairs": 60, "eval.folds": 5, **RUN}
    return [sys.executable, "-m", "jfacerec.train", "--config",
            os.path.join(REPO, "configs", "demo.py:runlocal"), "--workdir", str(workdir),
            *(f"--config.{key}={value}" for key, value in settings.items())]


def test_sigkill_then_resume_with_validation_gives_identical_bits(straight, tmp_path):
    """Killed once step 8 is recorded (the newest step then; the best may be step 4 or 8)."""
    workdir = tmp_path / "w"
    proc = subprocess.Popen(command(workdir), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    recorded = workdir / "checkpoints" / "8" / MANIFEST
    deadline = time.time() + 300
    while proc.poll() is None and not recorded.exists() and time.time() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it was killed"
    validated(workdir)
    straight_dir, state = straight
    chex.assert_trees_all_equal(restore_state(workdir, 16), restore_state(straight_dir, 16))
    assert without_speed(workdir_files.read_metrics(str(workdir))) == without_speed(
        workdir_files.read_metrics(str(straight_dir)))
    assert Checkpointer(str(workdir), read_only=True).best() == Checkpointer(
        str(straight_dir), read_only=True).best()


@pytest.mark.parametrize("overrides, error, match", [
    ({"eval.sets": ""}, ValueError, "eval.sets is empty"),
    ({"eval.sets": "unseen,faces.txt"}, ValueError, "neither 'unseen', 'pairs' nor a .bin"),
    ({"eval.sets": "pairs"}, ValueError, "dataset.pairs is empty; give --config.dataset.pairs"),
    ({"eval.sets": "missing/lfw.bin"}, FileNotFoundError, "missing/lfw.bin: no such"),
    ({"eval.best_metric": "lfw/accuracy"}, ValueError, "SET among \\['unseen'\\]"),
    ({"eval.best_metric": "unseen/top1"}, ValueError, "METRIC among"),
    ({"eval.every_steps": -1}, ValueError, "eval.every_steps is -1"),
])
def test_bad_validation_settings_are_refused_before_training(overrides, error, match):
    with pytest.raises(error, match=match):
        validation.from_config(tiny_config(**{**RUN, **overrides}))


def test_no_validation_without_every_steps_and_no_best_without_validation(plain):
    assert validation.from_config(tiny_config(**{**RUN, "eval.every_steps": 0})) is None
    with pytest.raises(FileNotFoundError, match="no best checkpoint in .*eval.every_steps"):
        select_step(str(plain[0]), checkpoint="best")
    with pytest.raises(ValueError, match="choose 'latest' or 'best'"):
        select_step(str(plain[0]), checkpoint="newest")
