"""Verification .bin sets: reading insightface's pickles safely, writing them without pickle, the
arcface_torch 10-fold figure, and `evaluate --bin`."""

import json
import os
import pickle
import pickletools
import struct

import chex
import numpy as np
import pytest
from PIL import Image

from conftest import run_module, tiny_config
from jfacerec.core.safe_pickle import UnsafePickleError
from jfacerec.data import bin as binfile
from jfacerec.data.images import ImageDecodeError
from jfacerec.data.synthetic import render_faces
from jfacerec.evaluation import bin_sets

FACES = render_faces(np.repeat(np.arange(4), 2), np.tile(np.arange(2), 4), image_size=24)
ISSAME = [True, True, False, False]  # images 2i and 2i + 1 form pair i


def png(face):
    return binfile.encode(face, "png")


class WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def dump(tmp_path, value, protocol=4, name="set.bin"):
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        pickle.dump(value, f, protocol=protocol)
    return path


def test_write_then_read_gives_the_images_and_pairs_back(tmp_path):
    path = str(tmp_path / "mine.bin")
    binfile.write_bin(path, [png(f) for f in FACES], ISSAME)
    bin_set = binfile.read_bin(path)
    assert (bin_set.name, len(bin_set)) == ("mine", 4)
    assert bin_set.issame.tolist() == ISSAME
    decoded = bin_set.decoded()
    chex.assert_type(decoded, np.uint8)
    np.testing.assert_array_equal(decoded, FACES)  # PNG: lossless
    chex.assert_shape(bin_set.decoded(16, 2, 5), (3, 16, 16, 3))
    with open(path, "rb") as f:  # insightface's reader
        images, issame = pickle.load(f, encoding="bytes")
    assert images == [png(f) for f in FACES] and issame == ISSAME
    with open(path, "rb") as f:
        opcodes = {op.name for op, _, _ in pickletools.genops(f.read())}
    assert opcodes <= {"PROTO", "EMPTY_LIST", "MARK", "SHORT_BINBYTES", "BINBYTES", "APPENDS",
                       "NEWTRUE", "NEWFALSE", "TUPLE2", "STOP"}  # nothing that calls


def test_a_bad_write_leaves_no_file(tmp_path):
    path = tmp_path / "odd.bin"
    with pytest.raises(ValueError, match="odd.bin: 7 images for 4 pairs"):
        binfile.write_bin(str(path), [png(f) for f in FACES[:7]], ISSAME)
    with pytest.raises(ValueError, match=r"odd.bin, image 3: ndarray"):
        binfile.write_bin(str(path), [png(f) for f in FACES[:3]] + list(FACES[3:]), ISSAME)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("kind", ["bytes", "encoded arrays", "pixel arrays"])
def test_python_pickles_of_every_protocol_are_read(tmp_path, protocol, kind):
    images = {"bytes": [png(f) for f in FACES],
              "encoded arrays": [np.frombuffer(png(f), np.uint8) for f in FACES],
              "pixel arrays": list(FACES)}[kind]
    path = dump(tmp_path, (images, ISSAME), protocol)
    bin_set = binfile.read_bin(path)
    np.testing.assert_array_equal(bin_set.decoded(), FACES)
    assert bin_set.issame.tolist() == ISSAME


def _py2_string(data: bytes) -> bytes:
    """A Python 2 `str` as its pickler writes it (SHORT_BINSTRING / BINSTRING)."""
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<i", len(data)) + data


def test_a_python2_pickle_with_str_images_and_a_numpy_array_is_read(tmp_path):
    """What Python 2 with NumPy 1 wrote at protocol 2: images as `str`, an array by
    numpy.core.multiarray._reconstruct, its raw data a `str`."""
    encoded = [png(f) for f in FACES]
    raw = np.frombuffer(encoded[1], np.uint8)
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
             + _py2_string(b"b") + b"\x87R"
             + b"(K\x01" + b"M" + struct.pack("<H", len(raw)) + b"\x85"
             + b"cnumpy\ndtype\n" + _py2_string(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + _py2_string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
             + b"\x89" + _py2_string(raw.tobytes()) + b"tb")
    data = (b"\x80\x02(]q\x00(" + _py2_string(encoded[0]) + array
            + b"".join(_py2_string(e) for e in encoded[2:]) + b"e]("
            + b"\x88\x88\x89\x89" + b"et.")
    path = tmp_path / "py2.bin"
    path.write_bytes(data)
    bin_set = binfile.read_bin(str(path))
    np.testing.assert_array_equal(bin_set.decoded(), FACES)
    assert bin_set.issame.tolist() == ISSAME


def test_a_payload_is_refused_naming_the_file_and_nothing_runs(tmp_path):
    target = tmp_path / "pwned"
    path = dump(tmp_path, ([png(FACES[0]), WritesAFile(str(target))], [True]), name="evil.bin")
    with pytest.raises(UnsafePickleError, match=r"evil\.bin: refused to load.*open"):
        binfile.read_bin(path)
    assert not target.exists()


def test_an_array_of_another_dtype_is_refused_naming_the_file(tmp_path):
    path = dump(tmp_path, ([np.zeros(3, np.float64)] * 2, [True]), protocol=2, name="f.bin")
    with pytest.raises(UnsafePickleError, match=r"f\.bin: refused to load.*dtype f8"):
        binfile.read_bin(path)


def test_lists_that_do_not_pair_up_name_the_file_and_the_image(tmp_path):
    path = dump(tmp_path, ([png(f) for f in FACES[:7]], ISSAME), name="short.bin")
    with pytest.raises(ValueError, match=r"short\.bin: 7 images for 4 pairs .* from image 7 on"):
        binfile.read_bin(path)
    path = dump(tmp_path, ([png(f) for f in FACES], ISSAME[:3]), name="long.bin")
    with pytest.raises(ValueError, match=r"long\.bin: 8 images for 3 pairs .* from image 6 on"):
        binfile.read_bin(path)


def test_an_undecodable_image_names_the_file_and_its_index(tmp_path):
    images = [png(f) for f in FACES]
    images[5] = b"\xff\xd8 not a jpeg"
    path = dump(tmp_path, (images, ISSAME), name="broken.bin")
    bin_set = binfile.read_bin(path)  # decoded on demand
    with pytest.raises(ImageDecodeError, match=r"broken\.bin, image 5: not a readable image"):
        bin_set.decoded()


def test_a_truncated_file_names_the_file(tmp_path):
    path = tmp_path / "cut.bin"
    binfile.write_bin(str(path), [png(f) for f in FACES], ISSAME)
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(ValueError, match=r"cut\.bin: not a readable pickle"):
        binfile.read_bin(str(path))


def test_the_pack_command_writes_a_bin_of_the_pairs(tmp_path):
    root = tmp_path / "lfw"
    people = {"Ann_A": 2, "Bob_B": 1, "Cid_C": 1}
    for k, (name, count) in enumerate(people.items()):
        os.makedirs(root / name)
        faces = render_faces(np.full(count, k), np.arange(count), image_size=40)
        for i, face in enumerate(faces, start=1):
            Image.fromarray(face).save(root / name / f"{name}_{i:04d}.jpg", quality=98)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1\nAnn_A\t1\t2\nBob_B\t1\tCid_C\t1\n")
    out = tmp_path / "mine.bin"
    result = run_module("jfacerec.data.bin", f"--pairs={pairs}", f"--images={root}",
                        f"--out={out}", "--size=20", "--crop=0.5", "--format=png")
    assert result.returncode == 0, result.stderr
    bin_set = binfile.read_bin(str(out))
    assert bin_set.issame.tolist() == [True, False]
    from jfacerec.data.images import load_face
    expected = [load_face(str(root / n / f"{n}_{i:04d}.jpg"), crop_fraction=0.5, size=20)
                for n, i in (("Ann_A", 1), ("Ann_A", 2), ("Bob_B", 1), ("Cid_C", 1))]
    np.testing.assert_array_equal(bin_set.decoded(), np.stack(expected))
    missing = run_module("jfacerec.data.bin", f"--pairs={tmp_path / 'none.txt'}",
                         f"--images={root}", f"--out={tmp_path / 'x.bin'}")
    assert missing.returncode == 1 and missing.stderr.startswith("error: ")
    assert "none.txt" in missing.stderr and not (tmp_path / "x.bin").exists()


# -- The 10-fold figure, against insightface's verification.py written out in NumPy ---------------

def reference_accuracy(embeddings1, embeddings2, actual_issame, nrof_folds=10):
    """insightface's calculate_roc (pca=0) and calculate_accuracy, with KFold(shuffle=False)'s
    folds as sklearn documents them."""
    thresholds = np.arange(0, 4, 0.01)
    nrof_pairs = min(len(actual_issame), embeddings1.shape[0])
    fold_sizes = np.full(nrof_folds, nrof_pairs // nrof_folds, dtype=int)
    fold_sizes[:nrof_pairs % nrof_folds] += 1
    indices = np.arange(nrof_pairs)
    diff = np.subtract(embeddings1, embeddings2)
    dist = np.sum(np.square(diff), 1)

    def calculate_accuracy(threshold, dist, actual_issame):
        predict_issame = np.less(dist, threshold)
        tp = np.sum(np.logical_and(predict_issame, actual_issame))
        tn = np.sum(np.logical_and(np.logical_not(predict_issame),
                                   np.logical_not(actual_issame)))
        return float(tp + tn) / dist.size

    accuracy, current = [], 0
    for size in fold_sizes:
        test_set = indices[current:current + size]
        train_set = np.setdiff1d(indices, test_set)
        current += size
        acc_train = np.zeros(len(thresholds))
        for threshold_idx, threshold in enumerate(thresholds):
            acc_train[threshold_idx] = calculate_accuracy(threshold, dist[train_set],
                                                          actual_issame[train_set])
        best_threshold_index = np.argmax(acc_train)
        accuracy.append(calculate_accuracy(thresholds[best_threshold_index], dist[test_set],
                                           actual_issame[test_set]))
    return np.mean(accuracy), np.std(accuracy)


def test_kfold_blocks_are_sklearn_kfold_without_shuffle():
    assert np.bincount(bin_sets.kfold_blocks(103, 10)).tolist() == [11, 11, 11] + [10] * 7
    assert np.all(np.diff(bin_sets.kfold_blocks(103, 10)) >= 0)  # consecutive blocks


def test_the_accuracy_is_insightfaces_on_uneven_folds():
    rng = np.random.default_rng(0)
    n = 103
    e1 = rng.normal(size=(n, 8))
    issame = rng.uniform(size=n) < 0.5
    e2 = np.where(issame[:, None], e1 + rng.normal(scale=0.9, size=(n, 8)),
                  rng.normal(size=(n, 8)))
    e1, e2 = (e / np.linalg.norm(e, axis=1, keepdims=True) for e in (e1, e2))
    dist = np.sum(np.square(e1 - e2), 1)
    mean, std = bin_sets.insightface_accuracy(dist, issame, 10)
    ref_mean, ref_std = reference_accuracy(e1, e2, issame, 10)
    assert 0.6 < mean < 0.99  # a figure between chance and perfect, so the rule matters
    assert (mean, std) == pytest.approx((ref_mean, ref_std), abs=1e-12)


def test_bin_metrics_flip_sums_and_normalises_as_arcface_torch(tmp_path):
    # pairs 0-9: two images of one identity; pairs 10-14: images of neighbouring identities
    first, second = np.arange(15), np.r_[np.arange(10), np.arange(11, 16)]
    faces = render_faces(np.ravel(np.c_[first, second]), np.tile([0, 1], 15), image_size=12)
    issame = [True] * 10 + [False] * 5
    path = str(tmp_path / "toy.bin")
    binfile.write_bin(path, [png(f) for f in faces], issame)
    projection = np.random.default_rng(1).normal(size=(12 * 12 * 3, 6)).astype(np.float32)
    calls = []

    def embed(images):  # any function of float32 [n, 12, 12, 3] in [-1, 1]
        chex.assert_shape(images, (8, 12, 12, 3))
        calls.append(len(images))
        return images.reshape(len(images), -1) @ projection

    results = bin_sets.bin_metrics(embed, binfile.read_bin(path), batch_size=8, folds=5)
    assert list(results) == ["accuracy", "accuracy_std", "auc", "eer", "tar@far=1e-3"]
    assert calls == [8] * 8  # 30 images in 4 padded batches, each also mirrored
    x = faces.astype(np.float32) * (2 / 255) - 1
    e = (x.reshape(30, -1) + x[:, :, ::-1].reshape(30, -1)) @ projection
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    ref_mean, ref_std = reference_accuracy(e[0::2], e[1::2], np.array(issame), 5)
    assert results["accuracy"] == pytest.approx(ref_mean, abs=1e-9)
    assert results["accuracy_std"] == pytest.approx(ref_std, abs=1e-9)
    from jfacerec import metrics
    scores = np.sum(e[0::2] * e[1::2], 1)
    assert results["auc"] == pytest.approx(metrics.roc_auc(scores, np.array(issame)), abs=1e-6)


# -- evaluate --bin -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from jfacerec.training import train

    workdir = str(tmp_path_factory.mktemp("bin_model") / "workdir")
    train(tiny_config(total_steps=10, checkpoint_every_steps=10), workdir)
    return workdir


def test_evaluate_with_bin_sets_adds_their_metrics_and_a_roc_plot(trained, tmp_path):
    paths = []
    for name, seed in (("set_a", 0), ("set_b", 1)):
        ids = np.random.default_rng(seed).permutation(40)[:12] + 500
        faces = render_faces(np.r_[np.repeat(ids[:6], 2), ids[6:]], np.arange(18) % 3,
                             image_size=24)
        paths.append(str(tmp_path / f"{name}.bin"))
        binfile.write_bin(paths[-1], [png(f) for f in faces], [True] * 6 + [False] * 3)
    config_file = tmp_path / "config.py"
    config_file.write_text("from jfacerec.core import workdir\n\n\ndef get_config():\n"
                           f"    return workdir.read_config({trained!r})\n")
    result = run_module("jfacerec.evaluate", f"--config={config_file}", f"--workdir={trained}",
                        f"--bin={paths[0]},{paths[1]}")
    assert result.returncode == 0, result.stderr
    with open(os.path.join(trained, "eval", "metrics.json")) as f:
        results = json.load(f)
    for name in ("set_a", "set_b"):
        keys = {k for k in results if k.startswith(f"bin/{name}/")}
        assert keys == {f"bin/{name}/{m}" for m in bin_sets.METRICS}
        assert 0.0 <= results[f"bin/{name}/accuracy"] <= 1.0
        assert 0.0 <= results[f"bin/{name}/auc"] <= 1.0
    assert "verification/auc" in results  # beside the existing metrics
    with Image.open(os.path.join(trained, "eval", "roc_bin.png")) as plot:
        assert plot.size[0] > 100

    # The same AUC from the recognizer's own embeddings of the decoded images.
    import jfacerec
    from jfacerec import metrics
    bin_set = binfile.read_bin(paths[0])
    e = jfacerec.load(trained).embed(bin_set.decoded())
    scores = np.sum(e[0::2] * e[1::2], 1)
    assert results["bin/set_a/auc"] == pytest.approx(metrics.roc_auc(scores, bin_set.issame),
                                                     abs=1e-6)



def test_a_missing_or_ambiguous_bin_is_an_error_before_any_work(tmp_path):
    from jfacerec.evaluation.evaluator import evaluate

    config = tiny_config()
    nowhere = str(tmp_path / "no_workdir")  # restoring from it would fail: the sets come first
    with pytest.raises(FileNotFoundError, match="none.bin"):
        evaluate(config, nowhere, [str(tmp_path / "none.bin")])
    os.makedirs(tmp_path / "other")
    for path in (tmp_path / "lfw.bin", tmp_path / "other" / "lfw.bin"):
        binfile.write_bin(str(path), [png(f) for f in FACES], ISSAME)
    with pytest.raises(ValueError, match="share a name"):
        evaluate(config, nowhere, [str(tmp_path / "lfw.bin"), str(tmp_path / "other" / "lfw.bin")])
    assert not os.path.exists(nowhere)
