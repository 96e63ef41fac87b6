"""The (data, model) mesh: a class-split softmax equal to the unsharded losses, PartialFC, the
train state's shardings and memory per device, and results that do not depend on the device count.
"""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from jfacerec import losses
from jfacerec.core import parallel
from jfacerec.losses import sharded_softmax
from jfacerec.core.checkpoint import Checkpointer
from jfacerec.inference.restore import restore
from jfacerec.training import abstract_train_state, train

MESHES = [(8, 1), (4, 2), (2, 4)]  # (data, model)
# Float32 sums in another order: the loss to ~1e-6 relative, the gradients to ~1e-5.
LOSS_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def mesh_of(shape):
    data, model = shape
    return parallel.make_mesh(data * model, model=model)


def problem(batch=16, dim=8, classes=24, seed=0):
    """Embeddings [batch, dim], kernel [dim, classes], bias [classes], labels [batch]."""
    k = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(k[0], (batch, dim)), jax.random.normal(k[1], (dim, classes)),
            0.1 * jax.random.normal(k[2], (classes,)),
            jax.random.randint(k[3], (batch,), 0, classes))


def unsharded(name, options, smoothing):
    """The reference loss of (embeddings, kernel, bias, labels) from jfacerec.losses."""
    if name == "softmax":
        return lambda x, w, b, y: losses.softmax_cross_entropy(x @ w + b, y,
                                                               label_smoothing=smoothing)
    fn = losses.get_loss(name)
    return lambda x, w, b, y: fn(x, w, y, label_smoothing=smoothing, **options)


def sharded(mesh, name, options, smoothing, sample_rate=1.0, seed=0, num_classes=0):
    margin = None if name == "softmax" else sharded_softmax.margin_fn(name, options)

    def loss(x, w, b, y):
        head = sharded_softmax.ShardedHead(mesh, "linear" if name == "softmax" else "cosine",
                                           1.0, w, b, sample_rate, jax.random.key(seed),
                                           num_classes)
        return sharded_softmax.cross_entropy(head, x, y, margin=margin, label_smoothing=smoothing)

    return loss


CASES = [
    ("softmax", {}, 0.1),
    ("arcface", dict(scale=32.0, margin=0.5), 0.0),
    ("arcface", dict(scale=32.0, margin=0.5), 0.1),
    ("cosface", dict(scale=32.0, margin=0.35), 0.1),
    ("sphereface", dict(margin=4, anneal_lambda=5.0), 0.0),
    ("combined", dict(scale=32.0, m1=1.0, m2=0.3, m3=0.2), 0.0),
]


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sharded_softmax_equals_the_unsharded_losses_and_gradients(shape):
    mesh = mesh_of(shape)
    x, w, b, y = problem()
    x = jax.device_put(x, parallel.data_sharding(mesh))
    w = jax.device_put(w, parallel.class_sharding(mesh, 2))
    for name, options, smoothing in CASES:
        grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))  # noqa: E731
        want, want_grads = grad(unsharded(name, options, smoothing))(x, w, b, y)
        got, got_grads = grad(sharded(mesh, name, options, smoothing))(x, w, b, y)
        chex.assert_trees_all_close(got, want, **LOSS_TOL, custom_message=name)
        if name != "softmax":  # the cosine head has no bias
            got_grads, want_grads = got_grads[:2], want_grads[:2]
        chex.assert_trees_all_close(got_grads, want_grads, **GRAD_TOL, custom_message=name)


ALL_MESHES = MESHES + [(1, 8)]
# One loss per class count keeps the compiles few: the linear head with its bias, the cosine one.
PADDED_CASES = {1001: ("softmax", {}, 0.1), 93: ("arcface", dict(scale=32.0, margin=0.5), 0.1)}


def padded(w, b, columns):
    """The head padded with random columns [dim, columns] and bias [columns]: whatever the
    padding holds, it must not matter."""
    extra = columns - w.shape[1]
    k = jax.random.split(jax.random.key(7), 2)
    return (jnp.concatenate([w, jax.random.normal(k[0], (w.shape[0], extra))], axis=1),
            jnp.concatenate([b, jax.random.normal(k[1], (extra,))]))


@pytest.mark.parametrize("classes", [1001, 93])
@pytest.mark.parametrize("shape", ALL_MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_padded_head_equals_the_unsplit_one_on_every_mesh(shape, classes):
    """1,001 and 93 classes padded to a multiple of 128 (the width every mesh restores): the
    loss and the classes' gradients are the unpadded head's; the padding gets no gradient."""
    mesh = mesh_of(shape)
    columns = parallel.pad_to_multiple(classes)
    x, w, b, y = problem(batch=16, dim=8, classes=classes)
    wp, bp = padded(w, b, columns)
    wp = jax.device_put(wp, parallel.class_sharding(mesh, 2))
    name, options, smoothing = PADDED_CASES[classes]
    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))  # noqa: E731
    want, (wx, ww, wb) = grad(unsharded(name, options, smoothing))(x, w, b, y)
    got, (gx, gw, gb) = grad(sharded(mesh, name, options, smoothing,
                                     num_classes=classes))(x, wp, bp, y)
    chex.assert_trees_all_close(got, want, **LOSS_TOL)
    chex.assert_trees_all_close((gx, gw[:, :classes]), (wx, ww), **GRAD_TOL)
    assert not np.any(np.asarray(gw[:, classes:]))
    if name == "softmax":
        chex.assert_trees_all_close(gb[:classes], wb, **GRAD_TOL)
        assert not np.any(np.asarray(gb[classes:]))


@pytest.mark.parametrize("shape", ALL_MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_partial_fc_on_a_padded_head_is_the_softmax_over_the_sampled_classes(shape):
    """PartialFC (0.3) over 93 classes padded to 128: no padded column is sampled or gets
    gradient, and the loss and gradients are the unsplit loss over the classes it sampled."""
    mesh = mesh_of(shape)
    classes, columns = 93, parallel.pad_to_multiple(93)
    x, w, b, y = problem(batch=8, dim=8, classes=classes)
    wp, bp = padded(w, b, columns)
    options = dict(scale=32.0, margin=0.5)
    got, (gx, gw) = jax.jit(jax.value_and_grad(
        sharded(mesh, "arcface", options, 0.1, sample_rate=0.3, num_classes=classes),
        argnums=(0, 1)))(x, wp, bp, y)
    sampled = np.flatnonzero(np.any(np.asarray(gw) != 0, axis=0))
    assert sampled.max() < classes and set(np.asarray(y).tolist()) <= set(sampled.tolist())
    assert len(sampled) < classes  # negatives were left out
    remap = jnp.asarray(np.searchsorted(sampled, np.asarray(y)), jnp.int32)
    want, (wx, ww) = jax.jit(jax.value_and_grad(
        unsharded("arcface", options, 0.1), argnums=(0, 1)))(x, w[:, sampled], b, remap)
    chex.assert_trees_all_close(got, want, **LOSS_TOL)
    chex.assert_trees_all_close((gx, gw[:, sampled]), (wx, ww), **GRAD_TOL)


def test_padded_classes_pad_only_what_the_mesh_cannot_split():
    assert parallel.padded_classes(93_431, mesh_of((8, 1))) == 93_431
    assert parallel.padded_classes(93_431, mesh_of((1, 8))) == 93_440
    assert parallel.padded_classes(360_232, mesh_of((1, 8))) == 360_232  # 8 divides it
    assert parallel.padded_classes(1001, mesh_of((4, 2))) == 1024
    assert parallel.padded_classes(2_000_000, mesh_of((1, 8))) == 2_000_000


def test_a_head_padded_on_1x8_restores_on_8x1_and_4x2_with_exactly_its_classes(tmp_path):
    """13 identities trained on a 1x8 mesh (head padded to 128 columns): the model restores on
    8x1 and 4x2 with 13 logits, the same ones; the train state restores on 4x2, and training
    resumes on 8x1 with the saved width."""
    config = tiny_config(num_devices=8, total_steps=2, checkpoint_every_steps=2,
                         **{"mesh.model": 8, "dataset.num_identities": 13, "loss.name": "arcface"})
    workdir = str(tmp_path / "w")
    trained = train(config, workdir)
    assert trained.params["classifier"]["kernel"].shape[1] == 128
    assert Checkpointer(workdir, read_only=True).head() == (13, 128)
    assert restore(tiny_config(num_devices=8, **{"mesh.model": 8, "dataset.num_identities": 13,
                                                 "loss.name": "arcface"}),
                   workdir).model.num_classes == 13
    images = jax.random.uniform(jax.random.key(3), (8, 16, 16, 3))
    logits = {}
    for shape in [(1, 8), (8, 1), (4, 2)]:
        other = tiny_config(num_devices=8, **{"mesh.model": shape[1],
                                              "dataset.num_identities": 13, "loss.name": "arcface"})
        restored = restore(other, workdir, 13)
        logits[shape] = np.asarray(restored.model.apply(restored.variables, images))
        assert logits[shape].shape == (8, 13)
    np.testing.assert_allclose(logits[(8, 1)], logits[(1, 8)], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[(4, 2)], logits[(1, 8)], rtol=1e-5, atol=1e-5)
    resumed = tiny_config(num_devices=8, **{"mesh.model": 2, "dataset.num_identities": 13,
                                            "loss.name": "arcface"})
    _, _, abstract = abstract_train_state(resumed, 13, mesh_of((4, 2)),
                                          class_columns=128)
    state, _, step = Checkpointer(workdir, read_only=True).restore(abstract)
    assert step == 2
    np.testing.assert_array_equal(np.asarray(state.params["classifier"]["kernel"]),
                                  np.asarray(trained.params["classifier"]["kernel"]))
    longer = tiny_config(num_devices=8, total_steps=3, checkpoint_every_steps=3,
                         **{"mesh.model": 1, "dataset.num_identities": 13, "loss.name": "arcface"})
    resumed_state = train(longer, workdir)
    assert resumed_state.params["classifier"]["kernel"].shape[1] == 128
    assert Checkpointer(workdir, read_only=True).head() == (13, 128)


def test_sharded_accuracy_is_the_top1_of_the_full_logits():
    mesh = mesh_of((2, 4))
    x, w, b, y = problem(batch=64, classes=8)  # 8 classes: many right, many wrong
    head = sharded_softmax.ShardedHead(mesh, "linear", 1.0, w, b, 1.0, jax.random.key(0))
    got = jax.jit(lambda x, y: sharded_softmax.accuracy(head, x, y))(x, y)
    assert float(got) == pytest.approx(float(jnp.mean(jnp.argmax(x @ w + b, -1) == y)))


def test_partial_fc_keeps_the_positives_and_samples_negatives_from_the_seed():
    mesh = mesh_of((2, 4))
    x, w, b, y = problem(batch=8, classes=256)
    value_and_grad = lambda seed: jax.jit(jax.value_and_grad(  # noqa: E731
        sharded(mesh, "arcface", dict(scale=32.0), 0.0, sample_rate=0.25, seed=seed),
        argnums=1))(x, w, b, y)
    loss, grad = value_and_grad(0)
    again, _ = value_and_grad(0)
    other, other_grad = value_and_grad(1)
    assert float(loss) == float(again)  # deterministic given the key
    touched = np.flatnonzero(np.any(np.asarray(grad) != 0, axis=0))
    # Each of the 4 shards keeps max(ceil(0.25 * 64), batch 8) = 16 of its 64 columns.
    assert len(touched) == 4 * 16
    assert set(np.asarray(y).tolist()) <= set(touched.tolist())
    assert not np.array_equal(touched, np.flatnonzero(np.any(np.asarray(other_grad) != 0, 0)))
    assert float(other) != float(loss)


@pytest.mark.parametrize("shape", [(2, 4), (1, 8)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_many_classes_split_over_model_devices(shape, capsys):
    """100k classes x 64 dims: each device holds [64, 100k / model] and logits [B / data,
    100k / model]; the step's loss and gradient compile and run; memory per device is printed."""
    data, model = shape
    mesh = mesh_of(shape)
    classes, dim, batch = 100_000, 64, 64
    config = tiny_config(num_devices=8, **{"mesh.model": model, "loss.name": "arcface",
                                          "model.embedding_dim": dim})
    _, _, abstract = abstract_train_state(config, classes, mesh)
    kernel = abstract.params["classifier"]["kernel"]
    assert kernel.sharding.shard_shape(kernel.shape) == (dim, classes // model)
    momentum = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(abstract.opt_state)[0]
                if "classifier" in jax.tree_util.keystr(path)]
    assert momentum and all(m.sharding.shard_shape(m.shape) == (dim, classes // model)
                            for m in momentum)

    x, _, _, _ = problem(batch=batch, dim=dim)
    y = jax.random.randint(jax.random.key(1), (batch,), 0, classes)
    w = jax.device_put(jax.random.normal(jax.random.key(2), (dim, classes)),
                       parallel.class_sharding(mesh, 2))
    x = jax.device_put(x, parallel.data_sharding(mesh))
    step = jax.jit(jax.value_and_grad(sharded(mesh, "arcface", dict(scale=32.0), 0.1), (0, 1)))
    compiled = step.lower(x, w, None, y).compile()
    memory = compiled.memory_analysis()
    loss, (_, grad_w) = compiled(x, w, None, y)
    assert np.isfinite(float(loss))
    assert grad_w.sharding.shard_shape(grad_w.shape) == (dim, classes // model)
    full_logits = batch * classes * 4
    shard_logits = (batch // data) * (classes // model) * 4
    # Temporaries hold a few per-device logit blocks, never the global [batch, classes] logits.
    assert memory.temp_size_in_bytes < full_logits / 2
    with capsys.disabled():
        print(f"\n{classes} classes x {dim} on mesh {shape}: kernel shard "
              f"{kernel.sharding.shard_shape(kernel.shape)}, per device arguments "
              f"{memory.argument_size_in_bytes / 2**20:.1f} MiB, temporaries "
              f"{memory.temp_size_in_bytes / 2**20:.1f} MiB, outputs "
              f"{memory.output_size_in_bytes / 2**20:.1f} MiB (logit block "
              f"{shard_logits / 2**20:.1f} MiB; all logits {full_logits / 2**20:.1f} MiB)")


def losses_of(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_model_split_head_trains_like_the_data_parallel_one(tmp_path):
    base = {"num_devices": 8, "total_steps": 4, "log_every_steps": 1, "loss.name": "arcface"}
    one = train(tiny_config(**base), str(tmp_path / "data"))
    split = train(tiny_config(**base, **{"mesh.model": 4}), str(tmp_path / "model"))
    kernel = split.params["classifier"]["kernel"]
    assert kernel.sharding.shard_shape(kernel.shape) == (kernel.shape[0], kernel.shape[1] // 4)
    np.testing.assert_allclose(losses_of(tmp_path / "model"), losses_of(tmp_path / "data"),
                               rtol=1e-5)
    chex.assert_trees_all_close(jax.device_get(split.params), jax.device_get(one.params),
                                atol=2e-5, rtol=2e-4)


def test_partial_fc_training_is_deterministic(tmp_path):
    config = tiny_config(num_devices=8, total_steps=3, log_every_steps=1,
                         **{"mesh.model": 2, "loss.sample_rate": 0.5, "dataset.num_identities": 32,
                            "loss.name": "cosface"})
    first = train(config, str(tmp_path / "a"))
    second = train(config, str(tmp_path / "b"))
    assert np.all(np.isfinite(losses_of(tmp_path / "a")))
    assert losses_of(tmp_path / "a") == losses_of(tmp_path / "b")
    chex.assert_trees_all_equal(jax.device_get(first.params), jax.device_get(second.params))


def test_the_device_count_does_not_change_the_loss_curve(tmp_path):
    """BatchNorm statistics over the global batch, gradients averaged, a global batch size."""
    curves = {}
    for n in (1, 2, 4, 8):
        train(tiny_config(num_devices=n, total_steps=6, log_every_steps=1,
                          **{"model.norm": "batch"}), str(tmp_path / str(n)))
        curves[n] = losses_of(tmp_path / str(n))
    for n in (2, 4, 8):
        np.testing.assert_allclose(curves[n], curves[1], rtol=1e-4, err_msg=f"{n} devices")


def load_config_module(name):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCALE_CONFIGS = ["tpu_v4_32", "tpu_v5e_8", "hw2p2_iresnet50", "hw2p2_mobilefacenet"]


@pytest.mark.parametrize("name", SCALE_CONFIGS)
def test_scale_out_configs_load_and_build_at_runlocal_and_full_size(name):
    """Shapes only (eval_shape): the runlocal model, and the full one's class split on 8 devices."""
    module = load_config_module(name)
    full = module.get_config()
    assert full.image_size == 112 and full.model.embedding_dim == 512
    if name.startswith("tpu"):
        assert full.dtype == "bfloat16" and full.loss.sample_rate == 0.3 and full.mesh.model > 1
    else:
        assert full.dataset.name == "hw2p2" and module.NUM_IDENTITIES == 7000
    small = module.get_config("runlocal")
    model, _, abstract = abstract_train_state(small, small.dataset.num_identities,
                                              parallel.mesh_from_config(small))
    assert model.num_classes == small.dataset.num_identities
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(abstract.params))
    _, _, abstract = abstract_train_state(full, module.NUM_IDENTITIES,
                                          parallel.make_mesh(8, model=full.mesh.model))
    kernel = abstract.params["classifier"]["kernel"]
    assert kernel.sharding.shard_shape(kernel.shape) == (512,
                                                         module.NUM_IDENTITIES // full.mesh.model)
