import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfacerec.models import NORMS, get_model, registered_models
from jfacerec.models.resnet import space_to_depth


def init(model, size=16):
    return model.init(jax.random.key(0), jnp.zeros((2, size, size, 3)))


@pytest.mark.parametrize("norm", NORMS)
def test_shapes_for_every_norm(norm):
    model = get_model("resnet_tiny", num_classes=7, embedding_dim=12, norm=norm,
                      width_multiplier=0.25)
    variables = init(model)
    x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
    logits = model.apply(variables, x)
    feats = model.apply(variables, x, return_feats=True)
    chex.assert_shape(logits, (3, 7))
    chex.assert_shape(feats, (3, 12))
    chex.assert_type([logits, feats], jnp.float32)
    chex.assert_tree_all_finite((logits, feats))
    assert ("batch_stats" in variables) == (norm == "batch")


def test_batchnorm_updates_statistics_in_training_and_uses_them_at_eval():
    model = get_model("resnet_tiny", num_classes=4, norm="batch", width_multiplier=0.25)
    variables = init(model)
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                           updates["batch_stats"])
    assert all(jax.tree.leaves(changed))
    # At eval an example's output does not depend on the rest of the batch.
    alone = model.apply(variables, x[:1])
    together = model.apply(variables, x)[:1]
    np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-5)
    # In training it does (batch statistics).
    train_alone = model.apply(variables, x[:2], train=True, mutable=["batch_stats"])[0][:1]
    train_together = model.apply(variables, x, train=True, mutable=["batch_stats"])[0][:1]
    assert not np.allclose(train_alone, train_together, atol=1e-4)


def test_dropout_is_random_in_training_and_off_at_eval():
    model = get_model("resnet_tiny", num_classes=4, width_multiplier=0.25, dropout=0.5)
    variables = init(model)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(0)})
    b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_imagenet_style_resnets_run_at_tiny_width(name):
    model = get_model(name, num_classes=3, width_multiplier=1 / 16, embedding_dim=8)
    variables = init(model, 32)
    chex.assert_shape(model.apply(variables, jnp.zeros((1, 32, 32, 3))), (1, 3))


def test_resnet18_parameter_count_matches_torchvision_trunk():
    """torchvision's resnet18 has 11,689,512 parameters; without its 1000-way fc (513,000) the
    trunk has 11,176,512. Ours adds the 512 -> 128 embedding (65,664) and a 10-way classifier."""
    model = get_model("resnet18", num_classes=10, norm="batch")
    params = jax.eval_shape(lambda: init(model, 64))["params"]
    n = sum(np.prod(p.shape) for p in jax.tree.leaves(params))
    assert n == 11_176_512 + 512 * 128 + 128 + 128 * 10 + 10


def test_space_to_depth_folds_each_block_of_pixels_into_channels_in_onnx_order():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    y = space_to_depth(x, 2)
    chex.assert_shape(y, (2, 2, 3, 12))
    for i, j, dy, dx, k in [(0, 0, 0, 0, 0), (1, 2, 1, 0, 2), (0, 1, 1, 1, 1), (1, 0, 0, 1, 0)]:
        np.testing.assert_array_equal(y[:, i, j, (dy * 2 + dx) * 3 + k], x[:, 2 * i + dy, 2 * j + dx, k])
    with pytest.raises(ValueError, match="multiple of 2"):
        space_to_depth(jnp.zeros((1, 5, 6, 3)), 2)


def test_space_to_depth_stem_sees_twice_the_side_through_the_same_trunk():
    """resnet_tiny_s2d at 2s px has resnet_tiny's parameters at s px but for the stem, whose
    kernel reads the 2x2 blocks' 12 channels. With that kernel set to a quarter of resnet_tiny's
    for each block position, it is resnet_tiny on the 2x2-averaged face: the same trunk, fed
    from every pixel of the larger face."""
    a = get_model("resnet_tiny", num_classes=5, norm="batch", pool="flatten", width_multiplier=0.25)
    b = get_model("resnet_tiny_s2d", num_classes=5, norm="batch", pool="flatten",
                  width_multiplier=0.25)
    va, vb = init(a, 16), init(b, 32)
    chex.assert_shape(vb["params"]["backbone"]["stem"]["kernel"], (3, 3, 12, 6))
    trunk = lambda v: {k: p for k, p in v["params"]["backbone"].items() if k != "stem"}  # noqa: E731
    chex.assert_trees_all_equal_shapes(trunk(va), trunk(vb))
    kernel = va["params"]["backbone"]["stem"]["kernel"]
    stem = {"kernel": jnp.concatenate([kernel / 4] * 4, axis=2)}
    vs = {**va, "params": {**va["params"],
                           "backbone": {**va["params"]["backbone"], "stem": stem}}}
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    pooled = x.reshape(2, 16, 2, 16, 2, 3).mean((2, 4))
    np.testing.assert_allclose(b.apply(vs, x, return_feats=True),
                               a.apply(va, pooled, return_feats=True), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 2"):
        b.apply(vb, jnp.zeros((1, 31, 31, 3)))


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="registered"):
        get_model("nope", num_classes=2)
    with pytest.raises(ValueError, match="unknown norm"):
        init(get_model("resnet_tiny", num_classes=2, norm="weird", width_multiplier=0.25))
    assert "resnet_tiny" in registered_models()


def test_flatten_pool_keeps_where_features_are_and_mean_pool_does_not():
    """pool="flatten" projects every position's features (kernel [h * w * c, dim]); swapping two
    positions of the feature map moves its embedding, and leaves the mean pool's unchanged."""
    from jfacerec.models.heads import EmbeddingHead

    feats = jax.random.normal(jax.random.key(1), (2, 3, 3, 4))
    swapped = feats.at[:, 0, 0].set(feats[:, 2, 2]).at[:, 2, 2].set(feats[:, 0, 0])
    for pool, moves in (("flatten", True), ("mean", False)):
        head = EmbeddingHead(5, pool=pool)
        variables = head.init(jax.random.key(0), feats, train=False)
        chex.assert_shape(variables["params"]["proj"]["kernel"],
                          (3 * 3 * 4 if pool == "flatten" else 4, 5))
        a = head.apply(variables, feats, train=False)
        b = head.apply(variables, swapped, train=False)
        chex.assert_shape(a, (2, 5))
        assert np.allclose(a, b, atol=1e-6) != moves, pool
    model = get_model("resnet_tiny", num_classes=3, width_multiplier=0.25, pool="flatten")
    variables = init(model, 32)
    # 32 px: stride-2 stem then three strided stages -> 2 x 2 positions of 48 channels
    chex.assert_shape(variables["params"]["embed_head"]["proj"]["kernel"], (2 * 2 * 48, 128))
    chex.assert_shape(model.apply(variables, jnp.zeros((1, 32, 32, 3))), (1, 3))
    with pytest.raises(ValueError, match="unknown pool"):
        init(get_model("resnet_tiny", num_classes=2, width_multiplier=0.25, pool="max"))


@pytest.mark.parametrize("kind", ["batch", "layer"])
def test_embedding_norm_standardises_the_embedding(kind):
    """embedding_norm "batch" gives each dimension zero mean and unit variance over the training
    batch (and keeps running statistics); "layer" each embedding over its dimensions."""
    model = get_model("resnet_tiny", num_classes=3, width_multiplier=0.25, norm="batch",
                      embedding_dim=16, embedding_norm=kind)
    variables = init(model, 32)
    chex.assert_shape(variables["params"]["embed_head"]["features"]["scale"], (16,))
    images = jax.random.normal(jax.random.key(3), (8, 32, 32, 3))
    emb, updates = model.apply(variables, images, train=True, return_feats=True,
                               mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    chex.assert_shape(emb, (8, 16))
    axis = 0 if kind == "batch" else 1
    np.testing.assert_allclose(emb.mean(axis), 0.0, atol=1e-4)
    np.testing.assert_allclose(emb.std(axis), 1.0, atol=1e-2)
    assert ("features" in updates["batch_stats"].get("embed_head", {})) == (kind == "batch")
    with pytest.raises(ValueError, match="unknown embedding norm"):
        init(get_model("resnet_tiny", num_classes=2, width_multiplier=0.25, embedding_norm="l2"))
