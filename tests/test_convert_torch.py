"""arcface_torch's .pth state dicts become workdirs that embed as arcface_torch does.

The torch models are tests/arcface_torch_models.py (arcface_torch's architecture and keys) with
random weights and BatchNorm statistics. Numbers are compared on iresnet18 and mobilefacenet at
112x112; iresnet34/50/100 share iresnet18's mapping code with other block counts, and their
full state dicts are checked against the models' every variable and shape.
"""

import functools
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest
import torch

import jfacerec
from arcface_torch_models import get_model, randomize
from conftest import run_module
from jfacerec import interop, models
from jfacerec.core import safe_pickle
from jfacerec.core import workdir as workdir_files
from jfacerec.data.pipeline import normalize
from jfacerec.data.synthetic import render_faces
from jfacerec.interop import arcface_torch, converted
from jfacerec.interop.torch_pth import read_state_dict


def faces(n=2):
    """uint8 [n, 112, 112, 3]: synthetic faces of n people."""
    return render_faces(np.arange(n), np.zeros(n, np.int64), image_size=112, seed=3)


def torch_embeddings(model, images, *, flip=False):
    """The torch model's embeddings [n, 512] of uint8 images [n, 112, 112, 3], normalised as
    arcface_torch does ((x - 127.5) / 127.5); with `flip`, its evaluation embedding
    normalise(f(x) + f(flip(x)))."""
    x = torch.from_numpy(normalize(images).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        e = model(x).numpy()
        if not flip:
            return e
        e = e + model(torch.flip(x, dims=[3])).numpy()
    return e / np.linalg.norm(e, axis=1, keepdims=True)


@functools.cache
def apply_fn(name):
    """One jitted forward pass per backbone for every test (a 112-pixel compile takes seconds)."""
    model = models.from_config(converted.converted_config(name, 512), 1)
    return jax.jit(lambda variables, x: model.apply(variables, x, return_feats=True))


def assert_close_rows(ours, ref, tolerance=1e-4):
    """Each row of `ours` within `tolerance` of the norm of that row of `ref`."""
    assert ours.shape == ref.shape
    error = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
    np.testing.assert_array_less(error, tolerance)


def assert_nothing_written(workdir):
    assert not os.path.exists(workdir)
    assert not [n for n in os.listdir(os.path.dirname(workdir)) if ".converting-" in n]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{name: (torch model, .pth path)} for iresnet18 and mobilefacenet, random weights."""
    root = tmp_path_factory.mktemp("pth")
    out = {}
    for seed, name in enumerate(("iresnet18", "mobilefacenet")):
        model = randomize(get_model(name), seed)
        torch.save(model.state_dict(), root / f"{name}.pth")
        out[name] = (model, str(root / f"{name}.pth"))
    return out


def test_the_command_converts_iresnet18_to_a_workdir_that_embeds_as_torch_does(saved, tmp_path):
    model, path = saved["iresnet18"]
    workdir = tmp_path / "r18"
    result = run_module("jfacerec.convert", "torch", path, "--model", "iresnet18",
                        "--workdir", str(workdir), "--num_classes", "3")
    assert result.returncode == 0, result.stderr
    assert "converted" in result.stdout
    config = workdir_files.read_config(str(workdir))
    assert (config.model.name, config.model.embedding_dim, config.image_size) == (
        "iresnet18", 512, 112)
    assert workdir_files.read_identities(str(workdir)) == ["0", "1", "2"]
    images = faces()
    recognizer = jfacerec.load(str(workdir), batch_size=len(images))
    assert (recognizer.num_classes, recognizer.embedding_dim) == (3, 512)
    assert_close_rows(recognizer.embed(images), torch_embeddings(model, images, flip=True))


def test_a_converted_mobilefacenet_embeds_as_torch_does(saved):
    model, path = saved["mobilefacenet"]
    weights = arcface_torch.split_state_dict(read_state_dict(path), "mobilefacenet", path)
    backbone = arcface_torch.to_variables(arcface_torch.layers("mobilefacenet"), weights)
    _, variables = converted.complete_variables(backbone, "mobilefacenet", 1, 0, path)
    images = faces()
    ours = np.asarray(apply_fn("mobilefacenet")(variables, normalize(images)))
    assert_close_rows(ours, torch_embeddings(model, images))


def test_a_float16_state_dict_becomes_its_float32_values(saved, tmp_path):
    model, _ = saved["mobilefacenet"]
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save(half, tmp_path / "half.pth")
    read = read_state_dict(str(tmp_path / "half.pth"))
    assert read["conv_sep.layers.0.weight"].dtype == np.float16
    for key, value in half.items():
        np.testing.assert_array_equal(read[key], value.numpy())
    weights = arcface_torch.split_state_dict(read, "mobilefacenet", "half.pth")
    backbone = arcface_torch.to_variables(arcface_torch.layers("mobilefacenet"), weights)
    gdc = backbone["params"]["gdc"]["kernel"]
    assert gdc.dtype == np.float32
    np.testing.assert_array_equal(
        gdc, half["features.layers.0.layers.0.weight"].float().numpy().transpose(2, 3, 1, 0))


@pytest.mark.parametrize("name", ["iresnet34", "iresnet50", "iresnet100"])
def test_deeper_iresnets_convert_every_key_and_embed_as_torch_does(name):
    model = randomize(get_model(name), 5)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    weights = arcface_torch.split_state_dict(state, name, f"{name}.pth")
    backbone = arcface_torch.to_variables(arcface_torch.layers(name), weights)
    config, variables = converted.complete_variables(backbone, name, 1, 0, f"{name}.pth")
    assert config.model.name == name
    used = sum(v.size for v in state.values() if v.dtype != np.int64)
    assert sum(np.size(x) for x in jax.tree.leaves(variables)) == used + 512 + 1  # + the head
    np.testing.assert_array_equal(variables["params"]["backbone"]["layer4_2"]["prelu"]["alpha"],
                                  state["layer4.2.prelu.weight"])
    image = faces(1)  # one face: the depth, not the batch, is what differs from iresnet18
    ours = np.asarray(apply_fn(name)(variables, normalize(image)))
    assert_close_rows(ours, torch_embeddings(model, image))


def test_strided_and_offset_tensors_read_as_their_values(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"t": base.t(), "slice": base[1:3, 2:5], "row": base[2], "int": torch.tensor(7)}
    torch.save(tensors, tmp_path / "views.pth")
    read = read_state_dict(str(tmp_path / "views.pth"))
    for key, value in tensors.items():
        np.testing.assert_array_equal(read[key], value.numpy())


def test_a_big_endian_file_reads_as_its_values(tmp_path):
    torch.save({"w": torch.arange(5, dtype=torch.float32) / 3}, tmp_path / "little.pth")
    with zipfile.ZipFile(tmp_path / "little.pth") as src, \
            zipfile.ZipFile(tmp_path / "big.pth", "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("byteorder"):
                data = b"big"
            elif "/data/" in name:
                data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
            dst.writestr(name, data)
    np.testing.assert_array_equal(read_state_dict(str(tmp_path / "big.pth"))["w"],
                                  np.arange(5, dtype=np.float32) / 3)


class WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pth_whose_pickle_runs_code_is_refused_and_nothing_runs(tmp_path):
    target = tmp_path / "pwned"
    with zipfile.ZipFile(tmp_path / "evil.pth", "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"conv1.weight": WritesAFile(str(target))}))
        z.writestr("evil/version", "3\n")
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"evil\.pth: .*open"):
        interop.convert_torch(str(tmp_path / "evil.pth"), "iresnet18", str(tmp_path / "w"))
    assert not target.exists()
    assert_nothing_written(str(tmp_path / "w"))


def test_a_whole_pickled_model_is_refused_with_the_state_dict_hint(tmp_path):
    torch.save(get_model("iresnet18"), tmp_path / "model.pth")
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"model\.pth: .*state_dict\(\)"):
        interop.convert_torch(str(tmp_path / "model.pth"), "iresnet18", str(tmp_path / "w"))
    assert_nothing_written(str(tmp_path / "w"))


def test_a_truncated_pth_is_an_error_line_and_writes_nothing(saved, tmp_path):
    _, path = saved["iresnet18"]
    with open(path, "rb") as f:
        data = f.read()
    (tmp_path / "short.pth").write_bytes(data[:len(data) // 2])
    result = run_module("jfacerec.convert", "torch", str(tmp_path / "short.pth"), "--model",
                        "iresnet18", "--workdir", str(tmp_path / "w"))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "short.pth" in result.stderr
    assert "truncated" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert_nothing_written(str(tmp_path / "w"))


def test_missing_and_unexpected_tensors_are_all_named(saved, tmp_path):
    model, _ = saved["iresnet18"]
    state = model.state_dict()
    del state["layer2.1.conv2.weight"], state["fc.bias"]
    state["head.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "edited.pth")
    with pytest.raises(ValueError) as error:
        interop.convert_torch(str(tmp_path / "edited.pth"), "iresnet18", str(tmp_path / "w"))
    message = str(error.value)
    assert "edited.pth" in message and "2 missing keys" in message
    assert "layer2.1.conv2.weight" in message and "fc.bias" in message
    assert "1 unexpected keys (head.weight)" in message
    assert_nothing_written(str(tmp_path / "w"))


def test_a_tensor_of_another_shape_is_named(saved, tmp_path):
    model, _ = saved["iresnet18"]
    state = model.state_dict()
    state["layer3.0.conv1.weight"] = torch.zeros(256, 128, 1, 1)
    torch.save(state, tmp_path / "reshaped.pth")
    with pytest.raises(ValueError, match=r"reshaped\.pth: .*layer3_0.*conv1.*\(1, 1, 128, 256\)"):
        interop.convert_torch(str(tmp_path / "reshaped.pth"), "iresnet18", str(tmp_path / "w"))
    assert_nothing_written(str(tmp_path / "w"))


def test_another_architectures_pth_is_refused(saved, tmp_path):
    _, path = saved["mobilefacenet"]
    with pytest.raises(ValueError, match=r"mobilefacenet\.pth: not arcface_torch's iresnet18"):
        interop.convert_torch(path, "iresnet18", str(tmp_path / "w"))
    assert_nothing_written(str(tmp_path / "w"))


def test_a_non_empty_workdir_is_refused_and_kept(saved, tmp_path):
    _, path = saved["iresnet18"]
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        interop.convert_torch(path, "iresnet18", str(tmp_path / "w"))
    assert os.listdir(tmp_path / "w") == ["notes.txt"]


def test_evaluate_measures_a_converted_model_whose_head_is_not_the_datasets(saved, tmp_path):
    from jfacerec.evaluation.evaluator import evaluate

    _, path = saved["iresnet18"]
    workdir = str(tmp_path / "r18")
    interop.convert_torch(path, "iresnet18", workdir)  # a 1-class head; the dataset below has 3
    config = workdir_files.read_config(workdir)
    config.dataset.update(num_identities=3, train_images=1, test_images=1,
                          num_unseen_identities=4, unseen_images=2)
    config.eval.update(num_pairs=12, folds=2, batch_size=8)
    results = evaluate(config, workdir)
    assert "classification/top1" not in results
    assert 0.0 <= results["verification/auc"] <= 1.0 and results["step"] == 0
