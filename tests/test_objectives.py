"""Training objectives end to end: every loss config takes real steps; samplers feed them."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, load_config
from jfacerec.core import config_base, parallel
from jfacerec.data.pipeline import train_dataset
from jfacerec.data.records import SyntheticSource
from jfacerec.losses.objectives import Objective
from jfacerec.training import abstract_train_state, init_state, make_train_step


def tiny(objective):
    c = load_config(f"demo_losses.py:{objective},runlocal")
    c.image_size = 16
    c.batch_size = 24
    c.model.width_multiplier = 0.25
    return c


def take_steps(config, n=3):
    mesh = parallel.make_mesh(1)
    model, tx, _ = abstract_train_state(config, 6, mesh)
    state = init_state(model, tx, config.image_size, jax.random.key(0), Objective.from_config(config))
    step = jax.jit(make_train_step(model, tx, config))
    source = SyntheticSource(np.arange(6), 6, image_size=16)
    it = iter(train_dataset(source, batch_size=config.batch_size, image_size=16, seed=0,
                            sampler=config.input.sampler, pk_images=config.input.pk_images))
    history = []
    for _ in range(n):
        batch = next(it)
        state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
        history.append(jax.device_get(metrics))
    return model, state, history


OBJECTIVES = sorted(config_base.load_module(f"{REPO}/configs/demo_losses.py").OBJECTIVES)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_trains(objective):
    config = tiny(objective)
    model, state, history = take_steps(config)
    for m in history:
        assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
    head, _ = Objective.from_config(config).head
    kernel = state.params["classifier"]["kernel"]
    chex.assert_shape(kernel, (model.embedding_dim, 6))
    assert ("bias" in state.params["classifier"]) == (head == "linear")
    if "+" in config.loss.name:
        assert {k for k in history[0] if k.startswith("loss_")} == {
            f"loss_{name.split('*')[-1].strip()}" for name in config.loss.name.split("+")}


def test_margin_head_gives_scaled_cosine_logits_at_eval():
    config = tiny("arcface")
    model, state, _ = take_steps(config, 1)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    emb = model.apply(variables, x, return_feats=True)
    w = state.params["classifier"]["kernel"]
    cos = (emb / jnp.linalg.norm(emb, axis=1, keepdims=True)) @ (w / jnp.linalg.norm(w, axis=0))
    np.testing.assert_allclose(model.apply(variables, x), config.loss.arcface.scale * cos,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("update", ["rule", "param"])
def test_center_loss_moves_the_centres(update):
    config = tiny("center")
    config.loss.center.method = update
    _, state, history = take_steps(config, 3)
    chex.assert_shape(state.centers, (6, 128))
    assert float(jnp.abs(state.centers).sum()) > 0  # moved from zero towards the features
    assert history[-1]["loss_center"] > 0


def test_sphereface_lambda_decays_to_its_floor():
    objective = Objective.from_config(tiny("sphereface"))
    lam = [float(objective.sphereface_lambda(jnp.float32(s))) for s in (0, 10, 100, 10_000)]
    assert lam[0] == pytest.approx(1000.0)
    assert lam[1] == pytest.approx(1000.0 / (1 + 0.12 * 10), rel=1e-5)
    assert lam[0] > lam[1] > lam[2] > lam[3] == pytest.approx(5.0)


def test_pk_batches_hold_p_identities_of_k_images():
    source = SyntheticSource(np.arange(10), 5, image_size=16)
    it = iter(train_dataset(source, batch_size=12, image_size=16, seed=0, sampler="pk",
                            pk_images=3))
    for _ in range(3):
        labels = next(it)["label"]
        assert len(set(labels)) == 4
        np.testing.assert_array_equal(np.unique(labels, return_counts=True)[1], [3] * 4)
    with pytest.raises(ValueError, match="divisible by pk_images"):
        train_dataset(source, batch_size=10, image_size=16, seed=0, sampler="pk", pk_images=3)


def test_triplet_batches_are_anchor_positive_negative_thirds():
    source = SyntheticSource(np.arange(10), 5, image_size=16)
    it = iter(train_dataset(source, batch_size=12, image_size=16, seed=0, sampler="triplets"))
    batch = next(it)
    a, p, n = np.split(batch["label"], 3)
    np.testing.assert_array_equal(a, p)
    assert (a != n).all()
    ia, ip, _ = np.split(batch["image"], 3)
    assert not any(np.array_equal(x, y) for x, y in zip(ia, ip))  # two different pictures


def test_pk_sampler_resumes_from_its_state():
    source = SyntheticSource(np.arange(10), 5, image_size=16)
    ds = train_dataset(source, batch_size=12, image_size=16, seed=0, sampler="pk", pk_images=3)
    it = iter(ds)
    next(it)
    state = it.get_state()
    want = [next(it) for _ in range(2)]
    again = iter(ds)
    again.set_state(state)
    chex.assert_trees_all_equal([next(again) for _ in range(2)], want)


def test_triplet_sampler_needs_a_triplet_term():
    config = tiny("softmax")
    config.input.sampler = "triplets"
    with pytest.raises(ValueError, match="triplet"):
        Objective.from_config(config)


@pytest.mark.parametrize("name", ["arcface", "cosface", "sphereface", "combined", "center",
                                  "triplet", "joint"])
def test_demo_losses_takes_each_objective_at_full_and_runlocal_size(name):
    full = load_config(f"demo_losses.py:{name}")
    small = load_config(f"demo_losses.py:{name},runlocal")
    assert full.loss.name == small.loss.name != "softmax"
    assert small.total_steps < full.total_steps
    Objective.from_config(full)
