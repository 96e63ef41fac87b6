"""The model zoo: layers, normalisations, DropBlock, every backbone's shapes, sizes and a step."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jfacerec.models import NORMS, get_model, registered_models
from jfacerec.models.layers import (CONV_KINDS, Conv, DropBlock, Norm, PReLU, conv_multiplies,
                                    conv_parameters)
from jfacerec.models.summary import totals

BACKBONES = ["resnet18", "resnet34", "resnet50", "iresnet18", "iresnet34", "iresnet50",
             "iresnet100", "mobilefacenet", "mobilenetv2", "convnext_tiny", "convnext_nano"]


def n_params(tree):
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(tree))


# ---- convolutions --------------------------------------------------------------------------------

def test_multiply_counts_of_the_course_example():
    assert conv_multiplies("standard", 8, 8, 3, 256, 5) == 1_228_800
    assert conv_multiplies("separable", 8, 8, 3, 256, 5) == 4_800 + 49_152 == 53_952
    assert conv_multiplies("pointwise", 8, 8, 3, 256, 1) == 49_152
    assert conv_multiplies("depthwise", 8, 8, 3, 3, 5) == 4_800


@pytest.mark.parametrize("kind", CONV_KINDS)
@pytest.mark.parametrize("bias", [False, True])
def test_parameter_formulas_match_the_layers(kind, bias):
    n, m, k, mult = 24, 6, 5, 2
    layer = Conv(kind, n, k, multiplier=mult, use_bias=bias)
    x = jnp.zeros((1, 8, 8, m))
    params = layer.init(jax.random.key(0), x)["params"]
    assert n_params(params) == conv_parameters(kind, m, n, k if kind != "pointwise" else 1,
                                               bias=bias, multiplier=mult)
    out = layer.apply({"params": params}, x)
    chex.assert_shape(out, (1, 8, 8, m * mult if kind == "depthwise" else n))
    if kind == "standard":
        assert n_params(params) == n * m * k * k + (n if bias else 0)
    if kind == "separable":
        assert n_params(params) == m * k * k + n * m + ((m + n) if bias else 0)


def test_depthwise_filters_each_channel_alone():
    layer = Conv("depthwise", 0, 3)
    x = jnp.zeros((1, 6, 6, 4)).at[0, 3, 3, 1].set(1.0)  # an impulse in channel 1 only
    out = layer.apply(layer.init(jax.random.key(0), x), x)
    assert float(jnp.abs(out[..., [0, 2, 3]]).max()) == 0.0
    assert float(jnp.abs(out[..., 1]).max()) > 0.0


# ---- normalisations ------------------------------------------------------------------------------

def norm_out(kind, x, **kw):
    layer = Norm(kind, **kw)
    variables = layer.init(jax.random.key(0), x, train=True)
    out, _ = layer.apply(variables, x, train=True, mutable=["batch_stats"])
    return out


@pytest.fixture
def activations():
    return 2.0 + 3.0 * jax.random.normal(jax.random.key(0), (4, 5, 6, 8))


def test_each_norm_normalises_its_axes(activations):
    x = activations
    checks = {"batch": (0, 1, 2), "layer": (1, 2, 3), "instance": (1, 2)}
    for kind, axes in checks.items():
        out = norm_out(kind, x)
        np.testing.assert_allclose(out.mean(axis=axes), 0.0, atol=1e-4)
        np.testing.assert_allclose(out.var(axis=axes), 1.0, atol=1e-2)
    grouped = norm_out("group", x, groups=2).reshape(4, 5, 6, 2, 4)
    np.testing.assert_allclose(grouped.mean(axis=(1, 2, 4)), 0.0, atol=1e-4)
    np.testing.assert_allclose(grouped.var(axis=(1, 2, 4)), 1.0, atol=1e-2)


def test_instance_is_group_with_one_channel_per_group_and_layer_is_one_group(activations):
    x = activations
    gn = lambda groups, v: nn.GroupNorm(num_groups=groups, epsilon=1e-5).apply(  # noqa: E731
        nn.GroupNorm(num_groups=groups, epsilon=1e-5).init(jax.random.key(0), v), v)
    np.testing.assert_allclose(norm_out("instance", x), gn(8, x), atol=1e-5)
    np.testing.assert_allclose(norm_out("layer", x), gn(1, x), atol=1e-5)


def test_group_norm_groups_and_eps_are_configurable(activations):
    x = activations
    loose = norm_out("group", x, groups=4, eps=10.0)
    tight = norm_out("group", x, groups=4, eps=1e-5)
    assert float(jnp.abs(loose).mean()) < float(jnp.abs(tight).mean())  # a big eps shrinks
    # 3 groups do not divide 8 channels: the largest divisor below (2) is used.
    np.testing.assert_allclose(norm_out("group", x, groups=3), norm_out("group", x, groups=2),
                               atol=1e-6)


def test_prelu_has_one_slope_per_channel_starting_at_a_quarter():
    layer = PReLU()
    x = jnp.array([[-4.0, 2.0, -1.0]])
    params = layer.init(jax.random.key(0), x)
    np.testing.assert_array_equal(params["params"]["alpha"], [0.25] * 3)
    np.testing.assert_allclose(layer.apply(params, x), [[-1.0, 2.0, -0.25]])


# ---- DropBlock -----------------------------------------------------------------------------------

def test_dropblock_drops_square_blocks_rescales_and_is_the_identity_at_eval():
    layer = DropBlock(rate=0.2, block_size=3)
    x = jnp.ones((16, 12, 12, 4))
    np.testing.assert_array_equal(layer.apply({}, x, train=False), x)
    out = layer.apply({}, x, train=True, rngs={"dropout": jax.random.key(0)})
    dropped = np.asarray(out == 0)
    assert 0.1 < dropped.mean() < 0.3  # about the rate
    kept = np.asarray(out)[~dropped]
    np.testing.assert_allclose(kept, kept[0])  # one rescale factor
    np.testing.assert_allclose(out.mean(), 1.0, rtol=1e-5)  # the expectation is kept
    # Dropped pixels come in blocks: most dropped pixels have a dropped neighbour.
    d = dropped[..., 0]
    neighbour = np.zeros_like(d)
    neighbour[:, 1:] |= d[:, :-1]
    neighbour[:, :-1] |= d[:, 1:]
    assert (neighbour[d]).mean() > 0.9


# ---- backbones -----------------------------------------------------------------------------------

def test_every_backbone_is_registered():
    assert set(BACKBONES) | {"resnet_tiny"} <= set(registered_models())


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("norm", NORMS)
def test_forward_shapes_with_every_norm(name, norm):
    model = get_model(name, num_classes=5, embedding_dim=16, norm=norm, width_multiplier=1 / 16)
    x = jnp.zeros((2, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    emb = jax.eval_shape(lambda v: model.apply(v, x, return_feats=True), variables)
    logits = jax.eval_shape(lambda v: model.apply(v, x), variables)
    assert emb.shape == (2, 16) and logits.shape == (2, 5)
    assert emb.dtype == logits.dtype == jnp.float32


@pytest.mark.parametrize("name,millions", [("iresnet18", 24.0), ("iresnet34", 34.1),
                                           ("iresnet50", 43.6), ("iresnet100", 65.2),
                                           ("mobilefacenet", 2.06)])
def test_parameter_counts_match_arcface_torch(name, millions):
    count = totals(get_model(name, num_classes=2, embedding_dim=512), 112)["parameters"]
    assert abs(count / (millions * 1e6) - 1.0) < 0.01, count


def test_mobilefacenet_costs_about_045_gflops():
    flops = totals(get_model("mobilefacenet", num_classes=2, embedding_dim=512), 112)["flops"]
    assert 0.40e9 < flops / 2 < 0.50e9  # multiply-adds, the unit arcface_torch reports


@pytest.mark.parametrize("name", BACKBONES)
def test_one_training_step_of_each_backbone(name):
    model = get_model(name, num_classes=4, embedding_dim=8, width_multiplier=1 / 16,
                      dropout=0.1, dropblock=0.1)
    # 64 pixels keep a 2x2 map in the last stage, so per-example norms have something to normalise.
    x = jax.random.normal(jax.random.key(0), (4, 64, 64, 3))
    y = jnp.array([0, 1, 2, 3])
    variables = model.init(jax.random.key(1), x)
    tx = optax.sgd(0.1)
    opt = tx.init(variables["params"])

    def loss_fn(params):
        logits, updates = model.apply({**variables, "params": params}, x, train=True,
                                      mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    updates, _ = tx.update(grads, opt)
    params = optax.apply_updates(variables["params"], updates)
    assert np.isfinite(float(loss))
    chex.assert_tree_all_finite(grads)
    assert optax.tree.norm(grads) > 0
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), params, variables["params"])
    assert all(jax.tree.leaves(changed["classifier"]))
    # Residual branches start as the identity (zero-initialised last norm scale), so only some
    # backbone weights move in the first step; but some must.
    assert any(jax.tree.leaves(changed["backbone"]))


def test_zoo_configs_build_every_backbone_at_both_sizes():
    from conftest import REPO
    from jfacerec.core import config_base
    from jfacerec.models import from_config

    zoo = config_base.load_module(f"{REPO}/configs/zoo.py")
    for name in zoo.BACKBONES:
        for variant in (name, f"{name},runlocal"):
            c = zoo.get_config(variant)
            model = from_config(c, num_classes=c.dataset.num_identities)
            x = jnp.zeros((1, c.image_size, c.image_size, 3))
            variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
            out = jax.eval_shape(lambda v: model.apply(v, x, return_feats=True), variables)
            assert out.shape == (1, c.model.embedding_dim)
    with pytest.raises(ValueError, match="unknown variant 'vgg' for configs/zoo.py; choose from "
                                         "resnet_tiny, .*, runlocal"):
        zoo.get_config("vgg")


def test_summary_prints_stages_and_totals():
    from jfacerec.models.summary import stage_table

    model = get_model("mobilefacenet", num_classes=2, embedding_dim=8, width_multiplier=0.25)
    table = stage_table(model, 32)
    assert "backbone" in table and "Total" in table
    t = totals(model, 32)
    assert t["parameters"] > 0 and t["flops"] > 0
