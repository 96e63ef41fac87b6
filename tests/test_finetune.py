"""Fine-tuning: `init_from` starts a run from another workdir's weights (the head kept when the
classes match), `optimizer.backbone_multiplier` scales or freezes the backbone, and a fine-tune
resumes from its own checkpoints; a workdir converted from arcface_torch's .pth is a source like
one trained here."""

import re
import shutil

import chex
import jax
import numpy as np
import pytest
import torch

from arcface_torch_models import get_model, randomize
from conftest import tiny_config
from jfacerec import interop
from jfacerec.core import workdir as workdir_files
from jfacerec.data.synthetic import render_faces
from jfacerec.inference.restore import make_embed_fn, restore
from jfacerec.training import train
from jfacerec.training.init_from import parse_source
from jfacerec.training.optimizer import scale_backbone

BACKBONE = ("backbone", "embed_head")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A workdir trained 10 steps on 8 identities: (workdir, its variables on the host)."""
    workdir = str(tmp_path_factory.mktemp("source") / "w")
    train(tiny_config(total_steps=10), workdir)
    restored = restore(workdir_files.read_config(workdir), workdir, 8)
    return workdir, jax.device_get(restored.variables)


def fine_tune(source_workdir, workdir, **overrides):
    """The fine-tune's final state on the host."""
    config = tiny_config(**{"init_from": source_workdir, **overrides})
    return jax.device_get(train(config, str(workdir)))


def test_step_zero_has_the_source_weights_and_embeddings(source, tmp_path):
    workdir, variables = source
    state = fine_tune(workdir, tmp_path / "ft", total_steps=0)
    chex.assert_trees_all_equal(state.params, variables["params"])  # the head too: 8 classes
    faces = render_faces(np.arange(4), np.zeros(4, int), image_size=16).astype(np.float32)
    faces = faces / 127.5 - 1.0
    model = restore(workdir_files.read_config(workdir), workdir, 8).model
    embed = make_embed_fn(model, flip=True)
    np.testing.assert_array_equal(
        np.asarray(embed({"params": state.params, "batch_stats": state.batch_stats}, faces)),
        np.asarray(embed(variables, faces)))


def test_a_fine_tune_with_a_moving_average_starts_it_at_the_source_and_trains(source, tmp_path):
    """The average starts as copies of the source's weights (the step donates the state, and
    XLA refuses one buffer donated twice), then trails the trained parameters."""
    workdir, variables = source
    start = fine_tune(workdir, tmp_path / "ft0", total_steps=0, **{"ema.decay": 0.9})
    chex.assert_trees_all_equal(start.ema_params, variables["params"])
    state = fine_tune(workdir, tmp_path / "ft", total_steps=10, **{"ema.decay": 0.9})
    assert int(state.step) == 10
    kernel = lambda params: np.asarray(params["embed_head"]["proj"]["kernel"])  # noqa: E731
    source_kernel = kernel(variables["params"])
    assert not np.allclose(kernel(state.ema_params), source_kernel)
    assert not np.allclose(kernel(state.ema_params), kernel(state.params))

def test_other_classes_get_a_new_head_and_keep_the_backbone(source, tmp_path):
    workdir, variables = source
    state = fine_tune(workdir, tmp_path / "ft", total_steps=0, **{"dataset.num_identities": 6})
    fresh = jax.device_get(train(tiny_config(total_steps=0, **{"dataset.num_identities": 6}),
                                 str(tmp_path / "fresh")))
    for name in BACKBONE:
        chex.assert_trees_all_equal(state.params[name], variables["params"][name])
    chex.assert_shape(state.params["classifier"]["kernel"], (128, 6))
    chex.assert_trees_all_equal(state.params["classifier"], fresh.params["classifier"])


FROZEN = {"total_steps": 10, "checkpoint_every_steps": 5, "optimizer.backbone_multiplier": 0.0}


@pytest.fixture(scope="module")
def frozen(source, tmp_path_factory):
    """A 10-step fine-tune of `source` with the backbone frozen: (workdir, final state)."""
    workdir = tmp_path_factory.mktemp("frozen") / "w"
    return workdir, fine_tune(source[0], workdir, **FROZEN)


def test_multiplier_zero_freezes_the_backbone_and_trains_the_head(source, frozen):
    _, variables = source
    _, state = frozen
    for name in BACKBONE:
        chex.assert_trees_all_equal(state.params[name], variables["params"][name])
    assert not np.array_equal(state.params["classifier"]["kernel"],
                              variables["params"]["classifier"]["kernel"])


def test_the_multiplier_scales_the_backbone_updates_only():
    updates = {"backbone": {"w": np.full(3, 2.0, np.float32)},
               "classifier": {"kernel": np.full(2, 2.0, np.float32)}}
    tx = scale_backbone(0.25)
    scaled, _ = tx.update(updates, tx.init(updates))
    np.testing.assert_array_equal(scaled["backbone"]["w"], np.full(3, 0.5, np.float32))
    np.testing.assert_array_equal(scaled["classifier"]["kernel"], np.full(2, 2.0, np.float32))
    with pytest.raises(ValueError, match="backbone_multiplier is -1"):
        scale_backbone(-1.0)


def test_a_fine_tune_resumes_from_its_own_checkpoint_not_the_source(frozen, tmp_path):
    straight_dir, straight = frozen
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(straight_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "10")  # as if stopped after step 5
    # The source is gone: a resume that read it would fail.
    resumed = fine_tune(str(tmp_path / "gone"), resumed_dir, **FROZEN)
    chex.assert_trees_all_equal(resumed, straight)
    assert [r["step"] for r in workdir_files.read_metrics(str(resumed_dir))] == [5, 10]


@pytest.mark.parametrize("text, parsed", [
    ("runs/a", ("runs/a", None, "latest")),
    ("runs/a:40", ("runs/a", 40, "latest")),
    ("runs/a:best", ("runs/a", None, "best")),
])
def test_init_from_names_a_workdir_a_step_or_the_best(text, parsed):
    assert parse_source(text) == parsed


def test_a_missing_or_bad_source_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match="give a step number or 'best'"):
        parse_source("runs/a:newest")
    with pytest.raises(FileNotFoundError, match="init_from .*nowhere: no such directory"):
        fine_tune(str(tmp_path / "nowhere"), tmp_path / "ft", total_steps=0)



def test_a_source_with_another_embedding_head_is_refused_naming_it(source, tmp_path):
    """The source has no norm on its embedding; a config with one cannot start from it."""
    with pytest.raises(ValueError, match=f"{source[0]}.* holds parameters of other shapes .*"
                                         + re.escape("['embed_head']['features']")):
        fine_tune(source[0], tmp_path / "ft", **{"model.embedding_norm": "layer"})


CONVERTED_CLASSES = 4


@pytest.fixture(scope="module")
def converted_source(tmp_path_factory):
    """arcface_torch's mobilefacenet (random weights) saved as a .pth and converted with a
    4-class head: (workdir, its variables on the host)."""
    root = tmp_path_factory.mktemp("converted")
    model = randomize(get_model("mobilefacenet"), 5)
    torch.save(model.state_dict(), root / "backbone.pth")
    workdir = str(root / "w")
    interop.convert_torch(str(root / "backbone.pth"), "mobilefacenet", workdir,
                          num_classes=CONVERTED_CLASSES)
    restored = restore(workdir_files.read_config(workdir), workdir, CONVERTED_CLASSES)
    return workdir, jax.device_get(restored.variables)


def fine_tune_converted(source, workdir, **overrides):
    """The final state on the host of a fine-tune of the converted `source` with its own config
    (112-pixel faces): 4 synthetic identities (the head's classes), batch 2, no warmup."""
    config = workdir_files.read_config(source)
    config.update(init_from=source, batch_size=2, num_devices=1, log_every_steps=1,
                  checkpoint_every_steps=10)
    config.optimizer.warmup_steps = 0
    config.dataset.update(num_identities=CONVERTED_CLASSES, train_images=2, test_images=1,
                          num_unseen_identities=2, unseen_images=1)
    for key, value in overrides.items():
        group, leaf = key.split(".") if "." in key else (None, key)
        (config[group] if group else config)[leaf] = value
    return jax.device_get(train(config, str(workdir)))


def test_a_fine_tune_of_a_converted_model_starts_from_its_embeddings(converted_source, tmp_path):
    """Every variable (the head too: 4 classes there and here) exactly the converted one's, and
    the fine-tune's config is the source's: the step-0 embeddings are the source's (which
    test_convert_torch.py checks against arcface_torch's to 1e-4)."""
    workdir, variables = converted_source
    state = fine_tune_converted(workdir, tmp_path / "ft", total_steps=0)
    chex.assert_trees_all_equal({"params": state.params, "batch_stats": state.batch_stats},
                                variables)


@pytest.mark.slow  # a training step of a 112-pixel model: compiling it takes CPU-seconds
def test_a_fine_tune_of_a_converted_model_trains_it_all(converted_source, tmp_path):
    workdir, variables = converted_source
    state = fine_tune_converted(workdir, tmp_path / "ft", total_steps=1)
    [record] = workdir_files.read_metrics(str(tmp_path / "ft"))
    assert np.isfinite(record["loss"]) and record["loss"] > 0
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), state.params,
                           variables["params"])
    assert all(jax.tree.leaves(changed))  # backbone_multiplier 1: every parameter moved
