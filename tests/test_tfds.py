"""The tfds dataset on a tiny TFDS dataset built here: no network, no TensorFlow (images are handed
to TFDS already encoded, and array_record files need neither)."""

import io
import json
import math
import os
import pickle

import chex
import numpy as np
import pytest

if os.environ.get("CI"):
    # CI installs the test extras, tensorflow-datasets among them: missing, it must fail, not skip.
    import tensorflow_datasets as tfds
else:
    tfds = pytest.importorskip("tensorflow_datasets",
                               reason="needs tensorflow-datasets: pip install -e '.[test]'")

from PIL import Image  # noqa: E402

from conftest import tiny_config  # noqa: E402
from jfacerec.data.sources import get_dataset  # noqa: E402
from jfacerec.data.synthetic import render_faces  # noqa: E402
from jfacerec.data.tfds_source import TfdsSource  # noqa: E402
from jfacerec.training import train  # noqa: E402

NAME = "tiny_faces"
SIZE = 32
# identity: images. Names sort as text ("person_10" < "person_2"): labels must follow that order.
# person_10, class 0, has one image: none of it is held out, yet the test images of the others
# must keep their training classes.
TRAIN = {2: 5, 3: 5, 10: 1, 11: 5}
UNSEEN = {20: 3, 21: 3, 22: 3}
TRAIN_NAMES = ("person_10", "person_11", "person_2", "person_3")


def faces_of(identity: int, count: int) -> np.ndarray:
    """uint8 [count, SIZE, SIZE, 3]: the pictures of `identity` in the dataset."""
    return render_faces(np.full(count, identity), np.arange(count), image_size=SIZE)


def png(face: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(face).save(buffer, format="PNG")
    return buffer.getvalue()


class TinyFaces(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Text labels like LFW's; unregistered, so reading goes through TFDS's builder-from-files,
    as for any dataset built elsewhere."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(SIZE, SIZE, 3)),
            "label": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(TRAIN), "test": self._generate_examples(UNSEEN)}

    def _generate_examples(self, counts):
        for identity, count in counts.items():
            for k, face in enumerate(faces_of(identity, count)):
                # Encoded bytes: TFDS encodes arrays with TensorFlow, bytes it stores as they are.
                yield f"{identity}/{k}", {"image": png(face), "label": f"person_{identity}"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    TinyFaces(data_dir=str(directory), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return str(directory)


def assert_faces_match(source, names, counts):
    """Every record's image is one of the pictures of `names[label]` (PNG keeps them exact)."""
    for i in range(len(source)):
        record = source[i]
        chex.assert_shape(record["image"], (SIZE, SIZE, 3))
        chex.assert_type(record["image"], np.uint8)
        assert record["label"].dtype == np.int32
        identity = int(names[record["label"]].removeprefix("person_"))
        pictures = faces_of(identity, counts[identity])
        assert any(np.array_equal(record["image"], p) for p in pictures), i


def test_source_maps_text_labels_to_sorted_indices(data_dir):
    source = TfdsSource(NAME, "train", size=SIZE, data_dir=data_dir)
    assert len(source) == sum(TRAIN.values())
    assert source.names == list(TRAIN_NAMES)
    np.testing.assert_array_equal(np.bincount(source.labels()), [1, 5, 5, 5])
    assert_faces_match(source, source.names, TRAIN)
    restored = pickle.loads(pickle.dumps(source))  # as grain's worker processes get it
    np.testing.assert_array_equal(restored[3]["image"], source[3]["image"])


def test_source_resizes_and_crops(data_dir):
    whole = TfdsSource(NAME, "test", size=SIZE, data_dir=data_dir)
    small = TfdsSource(NAME, "test", size=16, data_dir=data_dir)
    chex.assert_shape(small[0]["image"], (16, 16, 3))
    chex.assert_type(small[0]["image"], np.uint8)
    # The central half of a 32-pixel face is 16 pixels: no resizing, so exactly the middle.
    center = TfdsSource(NAME, "test", size=16, data_dir=data_dir, crop_fraction=0.5)
    np.testing.assert_array_equal(center[0]["image"], whole[0]["image"][8:24, 8:24])
    assert center[0]["label"] == whole[0]["label"]


def test_missing_datasets_and_features_are_named(data_dir):
    empty = os.path.join(data_dir, "empty")
    with pytest.raises(FileNotFoundError, match="no prepared dataset .* no TFDS builder"):
        TfdsSource(NAME, "train", size=SIZE, data_dir=empty)
    with pytest.raises(FileNotFoundError, match=r"tfds:lfw\[train\]: not prepared"):
        TfdsSource("lfw", "train", size=SIZE, data_dir=empty)  # a builder, but never built
    with pytest.raises(ValueError, match="no feature 'identity'"):
        TfdsSource(NAME, "train", size=SIZE, data_dir=data_dir, label_key="identity")


def tfds_config(data_dir, **overrides):
    config = tiny_config(**overrides)
    config.dataset.update(name="tfds", tfds_name=NAME, data_dir=data_dir, tfds_split="train",
                          tfds_unseen_split="test", test_images=1)
    return config


def test_get_dataset_holds_out_test_images_and_the_unseen_split(data_dir):
    dataset = get_dataset(tfds_config(data_dir, image_size=SIZE))
    assert dataset.num_classes == len(TRAIN)
    assert dataset.names == TRAIN_NAMES
    assert len(dataset.train) == 1 + 3 * 4
    assert len(dataset.test) == 3  # one image each of the people with more than one
    assert len(dataset.unseen) == sum(UNSEEN.values())
    # Held-out images keep the training class indices: class c is names[c] in both.
    np.testing.assert_array_equal(np.unique(dataset.train.labels()), [0, 1, 2, 3])
    np.testing.assert_array_equal(np.unique(dataset.test.labels()), [1, 2, 3])
    for split in (dataset.train, dataset.test):
        assert_faces_match(split, dataset.names, TRAIN)
    assert dataset.unseen.names == ["person_20", "person_21", "person_22"]
    assert_faces_match(dataset.unseen, dataset.unseen.names, UNSEEN)


def test_training_runs_on_a_tfds_dataset(data_dir, tmp_path):
    config = tfds_config(data_dir, image_size=16, total_steps=4, checkpoint_every_steps=4,
                         log_every_steps=2, num_devices=1)
    train(config, str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == ["4"]
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(math.isfinite(r["loss"]) for r in rows)
