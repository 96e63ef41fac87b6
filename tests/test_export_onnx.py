"""python -m jfacerec.export onnx: onnxruntime on the exported file gives jfacerec's embeddings."""

import os

import jax
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import load_config, run_module
from jfacerec import load, models
from jfacerec.core import workdir as workdir_files
from jfacerec.core.checkpoint import Checkpointer
from jfacerec.inference.restore import restore
from jfacerec.interop.onnx_export import export_workdir
from jfacerec.losses.objectives import Objective
from jfacerec.training.optimizer import make_optimizer
from jfacerec.training.state import init_state

NUM_CLASSES = 10


def _random_variables(abstract, seed):
    """Values for abstract {"params", "batch_stats"}: kernels He-normal, every vector (norm
    scales and biases, PReLU slopes, running means) its initial value plus noise, running
    variances in [0.5, 2], so that BatchNorm at eval and zero-initialised scales shape the output.
    Drawn in NumPy: no compiled init (minutes for these models on a busy CPU)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if leaf.ndim > 1:
            return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape)
        if name.endswith("['var']"):
            return rng.uniform(0.5, 2.0, leaf.shape)
        start = 1.0 if name.endswith("['scale']") else 0.25 if name.endswith("['alpha']") else 0
        return start + 0.3 * rng.normal(size=leaf.shape)

    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: np.asarray(draw(path, leaf), leaf.dtype), abstract)


def _workdir(path, spec, pool="mean", embedding_norm="", model=""):
    """A workdir of configs/`spec` (its embedding head's `pool` and `embedding_norm`, and `model`
    for its model when given) with random weights and statistics, saved as step 1."""
    config = load_config(spec)
    config.model.update(pool=pool, embedding_norm=embedding_norm)
    if model:
        config.model.name = model
    config.num_devices = 1
    config.eval.flip = False
    model = models.from_config(config, NUM_CLASSES)
    abstract = jax.eval_shape(lambda: init_state(
        model, make_optimizer(config), config.image_size, jax.random.key(0),
        Objective.from_config(config)))
    state = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    state = state.replace(**_random_variables(
        {"params": abstract.params, "batch_stats": abstract.batch_stats}, 0))
    os.makedirs(path)
    workdir_files.write_config(config, str(path))
    checkpointer = Checkpointer(str(path), async_save=False)
    checkpointer.save(1, state, {})
    checkpointer.close()
    return str(path)


# name: (config, the embedding head's pool and embedding_norm). resnet_tiny is the base config's
# model (32 px, GroupNorm; the demo's smoke test) and goes through the command; the two 112-pixel
# BatchNorm face models, and resnet_tiny with the flatten pool (2 x 2 positions) and a BatchNorm on
# its embedding, and resnet_tiny_s2d (its space-to-depth stem) through the library.
MODELS = {"iresnet18": ("zoo.py:iresnet18", "mean", ""),
          "mobilefacenet": ("zoo.py:mobilefacenet", "mean", ""),
          "resnet_tiny": ("demo.py:runlocal", "mean", ""),
          "resnet_tiny_flatten_bn": ("demo.py:runlocal", "flatten", "batch"),
          "resnet_tiny_s2d": ("demo.py:runlocal", "flatten", "", "resnet_tiny_s2d")}


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory):
    """(workdir, onnx path, image size) for each model of MODELS."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    workdir, out = _workdir(tmp / "workdir", *MODELS[name]), str(tmp / "model.onnx")
    if name == "resnet_tiny":
        result = run_module("jfacerec.export", "onnx", "--workdir", workdir, "--out", out)
        assert result.returncode == 0, result.stderr
        assert f"to {out}: input data float32 [batch, 3, 32, 32]" in result.stdout
    else:
        assert export_workdir(workdir, out).step == 1
    return workdir, out, workdir_files.read_config(workdir).image_size


def _onnx_embed(path, images):
    """uint8 RGB [n, h, w, 3] -> the file's output float32 [n, dim], normalised as documented."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    data = ((images.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)
    return session.run(None, {"data": data})[0]


def test_onnxruntime_gives_the_models_embedding_at_eval_without_flip(exported):
    workdir, path, size = exported
    restored = restore(workdir_files.read_config(workdir), workdir, NUM_CLASSES)
    images = np.random.default_rng(0).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    # One batch of 8 (one compilation): at eval each row depends on its image only.
    want = np.asarray(jax.jit(lambda v, x: restored.model.apply(v, x, return_feats=True))(
        restored.variables, (images.astype(np.float32) - 127.5) / 127.5))
    assert np.abs(np.linalg.norm(want, axis=1) - 1).max() > 0.1  # raw, not unit norm
    unit = lambda e: e / np.linalg.norm(e, axis=1, keepdims=True)  # noqa: E731
    for n in (1, 7):
        got = _onnx_embed(path, images[:n])
        assert got.shape == (n, restored.model.embedding_dim) and got.dtype == np.float32
        np.testing.assert_allclose(got, want[:n], atol=1e-4 * max(1.0, np.abs(want).max()))
        np.testing.assert_allclose(unit(got), unit(want[:n]), atol=1e-4)


def test_normalised_onnx_output_is_jfacerec_load_embed_with_flip_off(tmp_path_factory):
    """The documented use: uint8 RGB faces, (x - 127.5) / 127.5, NCHW, then L2 normalisation,
    against jfacerec.load(W).embed on the base config's model."""
    tmp = tmp_path_factory.mktemp("load")
    workdir, out = _workdir(tmp / "workdir", "demo.py:runlocal"), str(tmp / "model.onnx")
    export_workdir(workdir, out)
    recognizer = load(workdir, batch_size=8)
    assert not recognizer.flip
    images = np.random.default_rng(1).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    for n in (1, 7):
        got = _onnx_embed(out, images[:n])
        got = got / np.linalg.norm(got, axis=1, keepdims=True)
        np.testing.assert_allclose(got, recognizer.embed(images[:n]), atol=1e-4)


def test_the_file_passes_the_checker_with_input_data_and_a_dynamic_batch(exported):
    workdir, path, size = exported
    onnx.checker.check_model(path, full_check=True)
    graph = onnx.load(path).graph
    (data,), (embedding,) = graph.input, graph.output
    dims = data.type.tensor_type.shape.dim
    assert data.name == "data" and data.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims[0].dim_param and not dims[0].HasField("dim_value")
    assert [d.dim_value for d in dims[1:]] == [3, size, size]
    out_dims = embedding.type.tensor_type.shape.dim
    assert out_dims[0].dim_param == dims[0].dim_param
    assert out_dims[1].dim_value == workdir_files.read_config(workdir).model.embedding_dim
    # insightface's ArcFaceONNX normalises the input itself unless the graph starts with Sub and
    # Mul nodes (mxnet models): it must not here.
    assert not any(n.name.startswith(("Sub", "Mul", "_minus", "_mul")) for n in graph.node[:8])


def _assert_one_line_error(result, *words):
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0]


def test_a_workdir_without_checkpoints_is_one_line_and_writes_nothing(tmp_path):
    workdir, out = tmp_path / "workdir", tmp_path / "model.onnx"
    os.makedirs(workdir)
    workdir_files.write_config(load_config("demo.py"), str(workdir))
    result = run_module("jfacerec.export", "onnx", "--workdir", str(workdir), "--out", str(out))
    _assert_one_line_error(result, "no checkpoint", str(workdir))
    assert sorted(os.listdir(tmp_path)) == ["workdir"]
    assert sorted(os.listdir(workdir)) == ["config.json"]


def test_an_out_that_cannot_be_a_file_is_one_line_and_writes_nothing(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_module("jfacerec.export", "onnx", "--workdir", str(tmp_path / "none"),
                        "--out", str(blocker / "model.onnx"))
    _assert_one_line_error(result, str(blocker), "not a folder")
    with pytest.raises(ValueError, match="is a folder"):
        export_workdir(str(tmp_path / "none"), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_a_failed_export_keeps_the_previous_file_whole(exported, tmp_path):
    workdir, path, _ = exported
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous")
    with pytest.raises(FileNotFoundError, match="no checkpoint step 99"):
        export_workdir(workdir, str(out), step=99)
    assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["model.onnx"]
