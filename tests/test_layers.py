"""layers.conv_general_dilated and layers.Norm against the JAX / flax operations they replace,
and the backbones' variable trees against a stored fixture."""

import json
import pathlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfacerec.models import get_model
from jfacerec.models.layers import Norm, conv2d, conv_general_dilated

# (input [b, h, w, c], kernel [kh, kw, c / groups, out], strides, padding, groups): the cases
# computed tap by tap (grouped, depthwise with a multiplier, a 3x3 kernel on a 2x2 map,
# MobileFaceNet's GDC), one handed to XLA unchanged, and strided standard convs.
CASES = {
    "depthwise_same": ((2, 9, 9, 6), (3, 3, 1, 6), (1, 1), "SAME", 6),
    "depthwise_stride2": ((2, 9, 8, 6), (3, 3, 1, 6), (2, 2), ((1, 1), (1, 1)), 6),
    "depthwise_multiplier2": ((2, 7, 7, 4), (3, 3, 1, 8), (1, 1), "SAME", 4),
    "grouped": ((2, 8, 8, 8), (3, 3, 2, 12), (1, 1), "SAME", 4),
    "grouped_in_equals_out": ((2, 8, 8, 8), (3, 3, 2, 8), (1, 1), "SAME", 4),
    "grouped_3_per_group_stride2": ((2, 9, 9, 9), (3, 3, 3, 9), (2, 2), "SAME", 3),
    "gdc_7x7_valid": ((3, 7, 7, 5), (7, 7, 1, 5), (1, 1), "VALID", 5),
    "tiny_map_3x3": ((4, 2, 2, 6), (3, 3, 6, 10), (1, 1), "SAME", 1),
    "tiny_map_stride2": ((4, 3, 3, 6), (3, 3, 6, 7), (2, 2), "SAME", 1),
    "dense_to_xla": ((2, 8, 8, 3), (3, 3, 3, 5), (1, 1), "SAME", 1),
    # Standard strided convs: XLA's forward, the gradients by the strides' phases.
    "strided_3x3_same": ((2, 10, 10, 3), (3, 3, 3, 5), (2, 2), "SAME", 1),
    "strided_3x3_odd_map": ((2, 11, 9, 3), (3, 3, 3, 4), (2, 2), ((1, 1), (1, 1)), 1),
    "strided_1x1": ((2, 10, 10, 4), (1, 1, 4, 6), (2, 2), "VALID", 1),
    "strided_5x5_stride3_uneven_pads": ((2, 13, 12, 3), (5, 5, 3, 4), (3, 3), ((2, 1), (0, 2)), 1),
    "strided_2x2_stride2": ((2, 8, 8, 3), (2, 2, 3, 4), (2, 2), "VALID", 1),
    "strided_rows_only": ((2, 9, 9, 3), (3, 3, 3, 4), (2, 1), "SAME", 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_conv_equals_lax_conv_and_its_gradients(case):
    x_shape, w_shape, strides, padding, groups = CASES[case]
    x = jax.random.normal(jax.random.key(0), x_shape)
    w = jax.random.normal(jax.random.key(1), w_shape)
    dims = ("NHWC", "HWIO", "NHWC")

    def ours(x, w):
        return conv_general_dilated(x, w, strides, padding, dimension_numbers=dims,
                                    feature_group_count=groups)

    def reference(x, w):
        return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dims,
                                            feature_group_count=groups,
                                            precision=jax.lax.Precision.HIGHEST)

    y, y_ref = jax.jit(ours)(x, w), jax.jit(reference)(x, w)
    chex.assert_equal_shape([y, y_ref])
    chex.assert_type(y, jnp.float32)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    cotangent = jax.random.normal(jax.random.key(2), y.shape)
    grads = jax.jit(jax.grad(lambda x, w: jnp.sum(ours(x, w) * cotangent), (0, 1)))(x, w)
    grads_ref = jax.jit(jax.grad(lambda x, w: jnp.sum(reference(x, w) * cotangent), (0, 1)))(x, w)
    chex.assert_trees_all_close(grads, grads_ref, rtol=1e-4, atol=1e-3)


def test_conv2d_keeps_nn_convs_variables_and_dtype():
    x = jnp.ones((2, 6, 6, 4), jnp.bfloat16)
    ours = conv2d(8, (3, 3), feature_group_count=4, dtype=jnp.bfloat16)
    plain = nn.Conv(8, (3, 3), feature_group_count=4, dtype=jnp.bfloat16)
    v_ours, v_plain = ours.init(jax.random.key(0), x), plain.init(jax.random.key(0), x)
    chex.assert_trees_all_equal_shapes_and_dtypes(v_ours, v_plain)
    y = ours.apply(v_ours, x)
    chex.assert_type(y, jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(y, np.float32),
                               np.asarray(plain.apply(v_ours, x), np.float32), rtol=2e-2,
                               atol=2e-2)


def test_strided_conv_gradients_keep_bfloat16_and_skip_the_dilated_conv():
    """The strided path's gradients come back in the inputs' dtype, close to float32's, and the
    input gradient is computed without XLA's conv over the stride-dilated output gradient."""
    x = jax.random.normal(jax.random.key(0), (2, 10, 10, 4))
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 6))
    dims = ("NHWC", "HWIO", "NHWC")

    def loss(x, w):
        y = conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=dims)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    grads_bf16 = jax.jit(jax.grad(loss, (0, 1)))(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    grads = jax.jit(jax.grad(loss, (0, 1)))(x, w)
    chex.assert_trees_all_equal_dtypes(grads_bf16, (x.astype(jnp.bfloat16),
                                                    w.astype(jnp.bfloat16)))
    for ours, ref in zip(grads_bf16, grads):
        np.testing.assert_allclose(np.asarray(ours, np.float32), ref, rtol=0.05,
                                   atol=0.05 * float(jnp.max(jnp.abs(ref))))
    hlo = jax.jit(jax.grad(loss)).lower(x, w).as_text()
    assert "lhs_dilate = [2, 2]" not in hlo, "input gradient used a dilated conv"
    reference = jax.jit(jax.grad(lambda x, w: jnp.sum(jax.lax.conv_general_dilated(
        x, w, (2, 2), "SAME", dimension_numbers=dims) ** 2))).lower(x, w).as_text()
    assert "lhs_dilate = [2, 2]" in reference


@pytest.mark.parametrize("kind,reference", [
    ("batch", lambda: nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)),
    ("group", lambda: nn.GroupNorm(num_groups=4, epsilon=1e-5)),
    ("instance", lambda: nn.GroupNorm(num_groups=8, epsilon=1e-5)),
    ("layer", lambda: nn.GroupNorm(num_groups=1, epsilon=1e-5)),
])
def test_norm_equals_flax_outputs_gradients_and_statistics(kind, reference):
    # Non-zero mean and a spread of scales, so that the statistics matter.
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (4, 5, 5, 8))
    ours, ref = Norm(kind, groups=4, momentum=0.9), reference()
    v_ref = ref.init(jax.random.key(1), x)
    # Non-trivial scale and bias, the same in both, under the submodule name ours uses.
    params = {"scale": 1.0 + jax.random.normal(jax.random.key(2), (8,)) * 0.3,
              "bias": jax.random.normal(jax.random.key(3), (8,))}
    v_ref = {**v_ref, "params": params}
    sub = "BatchNorm_0" if kind == "batch" else "GroupNorm_0"
    v_ours = {k: {sub: v} for k, v in v_ref.items()}
    chex.assert_trees_all_equal_shapes_and_dtypes(
        v_ours, ours.init(jax.random.key(1), x, train=True))
    cotangent = jax.random.normal(jax.random.key(4), x.shape)

    def loss(apply, variables, x):
        def f(params, x):
            y, updates = apply({**variables, "params": params}, x)
            return jnp.sum(y * cotangent), updates
        return jax.grad(f, (0, 1), has_aux=True)(variables["params"], x)

    def apply_ours(v, x):
        return ours.apply(v, x, train=True, mutable=["batch_stats"])

    def apply_ref(v, x):
        return ref.apply(v, x, mutable=["batch_stats"])

    y, stats = apply_ours(v_ours, x)
    y_ref, stats_ref = apply_ref(v_ref, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    (dparams, dx), _ = jax.jit(lambda v, x: loss(apply_ours, v, x))(v_ours, x)
    (dparams_ref, dx_ref), _ = jax.jit(lambda v, x: loss(apply_ref, v, x))(v_ref, x)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
    chex.assert_trees_all_close(dparams[sub], dparams_ref, rtol=1e-4, atol=1e-4)
    if kind == "batch":
        chex.assert_trees_all_close(stats["batch_stats"][sub], stats_ref["batch_stats"],
                                    rtol=1e-5, atol=1e-6)
        # At eval the running statistics are used: the output no longer depends on the batch.
        v_eval = {**v_ours, **stats}
        one = ours.apply(v_eval, x[:1], train=False)
        np.testing.assert_allclose(one, ours.apply(v_eval, x, train=False)[:1], rtol=1e-6)


# The variable trees' paths and shapes, and one forward checksum, as they were when layers.py was
# split into layers, norms and xla_cpu: flax names variables after module classes and attributes,
# so a renamed or moved module would break every saved checkpoint. Regenerate (JAX_PLATFORMS=cpu
# python tests/test_layers.py, as the tests run on CPU) only for a change meant to alter them.
FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "param_trees.json"
# name -> (get_model name, its options, image size).
TREE_MODELS = {
    "resnet_tiny_batch": ("resnet_tiny", dict(norm="batch", width_multiplier=0.25), 32),
    "resnet_tiny_group": ("resnet_tiny", dict(norm="group", width_multiplier=0.25), 32),
    "mobilefacenet": ("mobilefacenet", dict(width_multiplier=1 / 16), 112),
    "iresnet18": ("iresnet18", dict(width_multiplier=1 / 16), 112),
}
CHECKSUM_MODEL = "resnet_tiny_group"


def _model_and_images(name: str) -> tuple[nn.Module, np.ndarray]:
    """TREE_MODELS[name] built, and a fixed image batch [2, size, size, 3] for it."""
    model_name, options, size = TREE_MODELS[name]
    model = get_model(model_name, num_classes=10, embedding_dim=16, **options)
    images = np.random.default_rng(0).standard_normal((2, size, size, 3)).astype(np.float32)
    return model, images


def _variable_tree(name: str) -> dict[str, list[int]]:
    """Every variable's path (jax keystr) -> its shape, for the model initialised with key 0."""
    model, images = _model_and_images(name)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    return {jax.tree_util.keystr(path): list(leaf.shape) for path, leaf in leaves}


def _embedding_checksum(name: str) -> float:
    """Sum (in float64) of the embeddings [2, 16] of the fixed images, at eval."""
    model, images = _model_and_images(name)
    variables = model.init(jax.random.key(0), images)
    embeddings = model.apply(variables, images, return_feats=True)
    return float(np.sum(np.asarray(embeddings, np.float64)))


def _fixture() -> dict:
    return {"trees": {name: _variable_tree(name) for name in TREE_MODELS},
            "checksum": {CHECKSUM_MODEL: _embedding_checksum(CHECKSUM_MODEL)}}


@pytest.mark.parametrize("name", sorted(TREE_MODELS))
def test_variable_trees_equal_the_fixture(name):
    assert _variable_tree(name) == json.loads(FIXTURE.read_text())["trees"][name]


def test_forward_checksum_equals_the_fixture():
    expected = json.loads(FIXTURE.read_text())["checksum"][CHECKSUM_MODEL]
    np.testing.assert_allclose(_embedding_checksum(CHECKSUM_MODEL), expected, rtol=1e-5)


if __name__ == "__main__":
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(_fixture(), indent=1, sort_keys=True) + "\n")
