"""ONNX exports of arcface_torch's backbones convert back to the same embeddings.

torch.onnx.export (the TorchScript exporter, opset 17) of tests/arcface_torch_models.py with and
without constant folding: folded, a BatchNorm after a conv is gone into the conv's weights and a
bias; unfolded, every BatchNormalization node and PyTorch's initialiser names remain. Both read from
the graph's structure.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
import torch

import jfacerec
from arcface_torch_models import get_model, randomize
from jfacerec import interop
from jfacerec.core import workdir as workdir_files
from jfacerec.core.checkpoint import Checkpointer
from jfacerec.data.pipeline import normalize
from jfacerec.inference.recognizer import fingerprint
from jfacerec.interop import arcface_torch, converted
from jfacerec.interop.onnx_export import export_workdir
from jfacerec.interop.onnx_import import read_layers
from jfacerec.interop.torch_pth import read_state_dict
from jfacerec.models.heads import LinearClassifier
from test_convert_torch import (apply_fn, assert_close_rows, assert_nothing_written, faces,
                                torch_embeddings)

# The TorchScript exporter on purpose: it is what released face models were exported with, and it
# folds BatchNorms into convs; torch warns that it is deprecated.
pytestmark = pytest.mark.filterwarnings(
    "ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning",
    "ignore:The feature will be removed:DeprecationWarning")


def export(model, path, *, folding=True):
    torch.onnx.export(model, torch.zeros(1, 3, 112, 112), str(path), opset_version=17,
                      do_constant_folding=folding, dynamo=False, input_names=["data"],
                      output_names=["embedding"])
    return str(path)


def onnx_embeddings(path, name, images):
    """Embeddings [n, 512] of jfacerec's `name` with the weights read from the ONNX file."""
    spec = arcface_torch.layers(name)
    backbone = arcface_torch.to_variables(spec, read_layers(path, spec))
    variables = {"params": {"backbone": backbone["params"]},
                 "batch_stats": {"backbone": backbone["batch_stats"]}}
    return np.asarray(apply_fn(name)(variables, normalize(images)))


def batch_norms(path):
    return sum(node.op_type == "BatchNormalization" for node in onnx.load(path).graph.node)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{(name, folded): path} of iresnet18 and mobilefacenet exported with and without constant
    folding, and {name: torch model}."""
    root = tmp_path_factory.mktemp("onnx")
    models = {name: randomize(get_model(name), seed)
              for seed, name in enumerate(("iresnet18", "mobilefacenet"), start=10)}
    paths = {(name, folded): export(model, root / f"{name}_{folded}.onnx", folding=folded)
             for name, model in models.items() for folded in (True, False)}
    return paths, models


def edited(path, out, edit):
    """The ONNX model at `path` changed by edit(model proto), saved to `out`."""
    model = onnx.load(path)
    edit(model.graph)
    onnx.save(model, str(out))
    return str(out)


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet"])
def test_folded_and_unfolded_exports_embed_as_torch_does(exported, name):
    paths, models = exported
    folded, unfolded = paths[name, True], paths[name, False]
    # Folding removes every BatchNorm that follows a conv; IResNet's pre-conv ones stay.
    convs = sum(layer.kind == "conv" for layer in arcface_torch.layers(name))
    assert batch_norms(unfolded) - batch_norms(folded) == convs
    images = faces()
    ref = torch_embeddings(models[name], images)
    assert_close_rows(onnx_embeddings(folded, name, images), ref)
    assert_close_rows(onnx_embeddings(unfolded, name, images), ref)


def test_the_converted_workdir_holds_the_onnx_models_weights(exported, tmp_path):
    paths, _ = exported
    path = paths["iresnet18", True]
    interop.convert_onnx(path, "iresnet18", str(tmp_path / "w"))
    spec = arcface_torch.layers("iresnet18")
    backbone = arcface_torch.to_variables(spec, read_layers(path, spec))
    head = LinearClassifier(1).init(jax.random.key(0), jnp.zeros((1, 512)))["params"]
    recognizer = jfacerec.load(str(tmp_path / "w"))
    assert (recognizer.num_classes, recognizer.embedding_dim) == (1, 512)
    assert recognizer.fingerprint == fingerprint({"backbone": backbone["params"],
                                                  "classifier": head})


def normalising_input(shift, scale):
    """An edit putting (raw - shift) * scale in front of the graph's input, as mxnet-era
    insightface models have: the graph then reads raw pixels [n, 3, 112, 112] in 0..255."""
    def edit(graph):
        data = graph.input[0].name
        graph.input[0].name = "raw"
        graph.initializer.extend([onnx.numpy_helper.from_array(np.float32(shift), "shift"),
                                  onnx.numpy_helper.from_array(np.float32(scale), "scale")])
        nodes = [onnx.helper.make_node("Sub", ["raw", "shift"], ["centred"]),
                 onnx.helper.make_node("Mul", ["centred", "scale"], [data])]
        for node in reversed(nodes):
            graph.node.insert(0, node)
    return edit


def test_an_in_graph_normalisation_centred_at_127_5_is_folded_into_the_first_conv(
        exported, tmp_path):
    paths, models = exported
    path = edited(paths["iresnet18", True], tmp_path / "raw.onnx",
                  normalising_input(127.5, 1 / 128))  # mxnet's scale, not 1 / 127.5
    images = faces()
    x = (images.transpose(0, 3, 1, 2).astype(np.float32) - 127.5) / 128
    with torch.no_grad():
        ref = models["iresnet18"](torch.from_numpy(x)).numpy()
    assert_close_rows(onnx_embeddings(path, "iresnet18", images), ref)


def test_another_input_normalisation_is_refused(exported, tmp_path):
    paths, _ = exported
    path = edited(paths["iresnet18", True], tmp_path / "shifted.onnx",
                  normalising_input(100.0, 1 / 127.5))
    with pytest.raises(ValueError, match=r"shifted\.onnx: the graph normalises its input"):
        interop.convert_onnx(path, "iresnet18", str(tmp_path / "w"))
    assert_nothing_written(str(tmp_path / "w"))


def channels_last_fc(graph):
    """An edit flattening IResNet's last map as [H, W, C] (as an export of jfacerec's own
    model may), the fc's columns reordered to match: the same function."""
    flatten = next(node for node in graph.node if node.op_type == "Flatten")
    gemm = next(node for node in graph.node if node.op_type == "Gemm")
    graph.node.insert(list(graph.node).index(flatten), onnx.helper.make_node(
        "Transpose", [flatten.input[0]], ["nhwc"], perm=[0, 2, 3, 1]))
    flatten.input[0] = "nhwc"
    weights = next(t for t in graph.initializer if t.name == gemm.input[1])
    w = onnx.numpy_helper.to_array(weights)
    w = w.reshape(-1, 512, 7, 7).transpose(0, 2, 3, 1).reshape(w.shape)
    weights.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(w), weights.name))


def test_a_channels_last_flatten_before_the_fc_is_read_as_such(exported, tmp_path):
    paths, models = exported
    path = edited(paths["iresnet18", True], tmp_path / "nhwc.onnx", channels_last_fc)
    images = faces()
    assert_close_rows(onnx_embeddings(path, "iresnet18", images),
                      torch_embeddings(models["iresnet18"], images))


def test_another_architectures_onnx_is_refused(exported, tmp_path):
    paths, _ = exported
    with pytest.raises(ValueError, match=r"mobilefacenet_True\.onnx: .*another architecture"):
        interop.convert_onnx(paths["mobilefacenet", True], "iresnet18", str(tmp_path / "w"))
    assert_nothing_written(str(tmp_path / "w"))


def test_a_truncated_onnx_file_is_refused(exported, tmp_path):
    paths, _ = exported
    with open(paths["mobilefacenet", True], "rb") as f:
        data = f.read()
    (tmp_path / "short.onnx").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"short\.onnx: not a readable ONNX model"):
        interop.convert_onnx(str(tmp_path / "short.onnx"), "mobilefacenet", str(tmp_path / "w"))
    assert_nothing_written(str(tmp_path / "w"))


def read_back(workdir, like):
    """The variables of `workdir`'s checkpoint on the host, read as the tree `like` (no model is
    traced: the shapes are `like`'s)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            like)
    variables, step = Checkpointer(workdir, read_only=True).restore_variables(abstract)
    assert step == 0
    return jax.device_get(variables)


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet"])
def test_jfacerecs_own_export_converts_back_to_the_same_weights(exported, name, tmp_path):
    """The same config and exactly the same variables, hence the same embeddings: every
    BatchNorm is exported as a node and read back as itself, so nothing is recomputed."""
    _, models = exported
    pth, source, out, back = (str(tmp_path / f) for f in ("source.pth", "source", "export.onnx",
                                                             "back"))
    torch.save(models[name].state_dict(), pth)
    # convert_torch's steps, keeping the variables it writes to compare with
    weights = arcface_torch.split_state_dict(read_state_dict(pth), name, pth)
    config, variables = converted.complete_variables(
        arcface_torch.to_variables(arcface_torch.layers(name), weights), name, 1, 0, pth)
    converted.write_workdir(source, config, variables, 1)
    export_workdir(source, out)
    interop.convert_onnx(out, name, back)
    assert workdir_files.read_config(back).to_dict() == config.to_dict()
    variables = jax.device_get(variables)
    chex.assert_trees_all_equal(read_back(back, variables), variables)
