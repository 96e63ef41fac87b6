"""End-to-end training on tiny synthetic data: the real loop, checkpoints, resume and evaluation."""

import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from conftest import REPO, tiny_config
from jfacerec.core.checkpoint import Checkpointer
from jfacerec.evaluation.evaluator import evaluate
from jfacerec.training import NonFiniteLossError, abstract_train_state, train
from jfacerec.core import parallel


def restore_params(config, workdir, num_classes=8, step=None):
    mesh = parallel.make_mesh(1)
    _, _, abstract = abstract_train_state(config, num_classes, mesh)
    state, _, got = Checkpointer(workdir).restore(abstract, step)
    return state, got


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_training_learns_and_writes_its_outputs(tmp_path):
    config = tiny_config(total_steps=200, checkpoint_every_steps=50, log_every_steps=20)
    state = train(config, str(tmp_path))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(20, 201, 20))
    assert set(rows[0]) == {"step", "loss", "accuracy", "grad_norm", "learning_rate",
                            "images_per_second"}  # the step's `finite` flag is not a metric
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    assert np.mean([r["accuracy"] for r in rows[-3:]]) > 0.5  # chance is 1/8
    assert json.load(open(tmp_path / "config.json"))["model"]["name"] == "resnet_tiny"
    assert any(name.startswith("events") for name in os.listdir(tmp_path / "tb"))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["150", "200"]  # keep_checkpoints=2
    restored, step = restore_params(config, str(tmp_path))
    assert step == 200
    chex.assert_trees_all_equal(jax.device_get(restored.params), jax.device_get(state.params))

    results = evaluate(config, str(tmp_path))
    saved = json.load(open(tmp_path / "eval" / "metrics.json"))
    for key in ("classification/top1", "classification/top5", "verification/auc",
                "verification/eer", "verification/accuracy", "verification/tar@far=1e-2",
                "verification/tar@far=1e-3", "openset/accuracy", "openset/threshold",
                "num_parameters"):
        assert key in saved and saved[key] == pytest.approx(results[key])
    assert results["classification/top1"] > 0.3  # chance is 1/8
    assert results["verification/auc"] > 0.6
    assert results["classification/top5"] >= results["classification/top1"]
    for plot in ("roc.png", "scores.png"):
        assert (tmp_path / "eval" / plot).stat().st_size > 1000
    assert (tmp_path / "training.png").exists()


def test_a_dataset_given_to_train_is_the_one_trained_on(tmp_path):
    """train(dataset=) skips the registry: the same faces give the same weights, and the config's
    own dataset is never built (its root here does not exist)."""
    import dataclasses

    from jfacerec.data import sources

    config = tiny_config(total_steps=10)
    built = train(config, str(tmp_path / "built"))
    # the synthetic identities have no names; these mark the given dataset as the one used
    dataset = sources.get_dataset(config)
    names = tuple(f"person_{i}" for i in range(dataset.num_classes))
    dataset = dataclasses.replace(dataset, names=names)
    config.dataset.update(name="folder", root=str(tmp_path / "no_such_folder"))
    given = train(config, str(tmp_path / "given"), dataset=dataset)
    chex.assert_trees_all_equal(jax.device_get(given.params), jax.device_get(built.params))
    assert not (tmp_path / "built" / "identities.json").exists()
    assert json.load(open(tmp_path / "given" / "identities.json")) == list(names)


def test_continuing_a_finished_run_is_a_no_op_and_more_steps_extend_it(tmp_path):
    config = tiny_config(total_steps=10)
    first = train(config, str(tmp_path))
    again = train(config, str(tmp_path))
    chex.assert_trees_all_equal(jax.device_get(first.params), jax.device_get(again.params))
    train(tiny_config(total_steps=15), str(tmp_path))
    assert [r["step"] for r in read_metrics(tmp_path)] == [5, 10, 15]


def run_cli(workdir, *overrides):
    args = [sys.executable, "-m", "jfacerec.train", "--config",
            os.path.join(REPO, "configs", "demo.py:runlocal"), "--workdir", str(workdir),
            "--config.image_size=16", "--config.num_devices=1", "--config.batch_size=16",
            "--config.dataset.num_identities=8", "--config.dataset.train_images=12",
            *overrides]
    return args


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_eight_devices_match_one_device(tmp_path, norm):
    """With BatchNorm this also shows its statistics span the global batch, not each shard."""
    assert len(jax.devices()) == 8
    one = train(tiny_config(total_steps=8, num_devices=1, **{"model.norm": norm}),
                str(tmp_path / "one"))
    eight = train(tiny_config(total_steps=8, num_devices=8, **{"model.norm": norm}),
                  str(tmp_path / "eight"))
    chex.assert_trees_all_close(jax.device_get(one.params), jax.device_get(eight.params),
                                atol=2e-5, rtol=2e-4)
    chex.assert_trees_all_close(jax.device_get(one.batch_stats),
                                jax.device_get(eight.batch_stats), atol=2e-5, rtol=2e-4)
    assert len(eight.params["classifier"]["kernel"].sharding.device_set) == 8


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config(total_steps=60, checkpoint_every_steps=2, log_every_steps=20)
    config.optimizer.learning_rate = 1e30
    config.optimizer.warmup_steps = 1000  # step 1 is taken at learning rate 0, then it explodes
    with pytest.raises(NonFiniteLossError, match="last good checkpoint is step") as error:
        train(config, str(tmp_path))
    state, step = restore_params(config, str(tmp_path))
    assert f"The last good checkpoint is step {step} in" in str(error.value)
    chex.assert_tree_all_finite(state)


def test_nan_loss_exits_non_zero_from_the_command_line(tmp_path):
    result = subprocess.run(
        run_cli(tmp_path, "--config.optimizer.learning_rate=1e30", "--config.total_steps=40"),
        cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert " became " in result.stderr and "learning_rate" in result.stderr


def test_mismatched_config_is_refused_on_resume(tmp_path):
    train(tiny_config(total_steps=5), str(tmp_path))
    with pytest.raises(ValueError, match="other shapes"):
        train(tiny_config(total_steps=10, **{"model.embedding_dim": 64}), str(tmp_path))


def test_evaluating_a_folder_without_checkpoints_names_it_and_creates_nothing(tmp_path):
    missing = tmp_path / "not_a_workdir"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        evaluate(tiny_config(), str(missing))
    assert not missing.exists()
