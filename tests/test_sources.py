"""Image-file sources: folder scans with unreadable files, ArrayRecord packs, HW2P2, LFW, ORL."""

import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest

from conftest import DATA, LFW, ORL, REPO, hw2p2_tree, make_tree, needs_lfw, needs_orl, tiny_config
from jfacerec.data import folders, pack, records, sources
from jfacerec.data.images import ImageDecodeError
from jfacerec.data.pipeline import Augment, color_jitter, train_dataset
from jfacerec.data.synthetic import render_faces
from jfacerec.data.pairs import pair_images, read_lfw_pairs
from jfacerec.evaluation.protocols import thresholds_from_other_folds



def test_scan_labels_identities_in_sorted_order(tmp_path):
    root = make_tree(tmp_path / "tree")
    (root / "person_1" / "notes.txt").write_text("not an image extension: ignored")
    files = folders.scan_identity_folders(str(root))
    assert files.names == ("person_0", "person_1", "person_2")
    np.testing.assert_array_equal(files.labels, np.repeat([0, 1, 2], 4))
    assert files.skipped == () and len(files) == 12


def test_a_cached_source_decodes_each_file_once(tmp_path):
    files = folders.scan_identity_folders(str(make_tree(tmp_path / "tree")))
    cached = records.ImageFileSource(files, size=24, cache=True)
    plain = records.ImageFileSource(files, size=24)
    first = cached[5]["image"]
    np.testing.assert_array_equal(plain[5]["image"], first)
    os.remove(files.paths[5])
    # Later epochs read the kept face, not the file; an uncached source goes back to the file.
    np.testing.assert_array_equal(cached[5]["image"], first)
    with pytest.raises(FileNotFoundError, match=os.path.basename(files.paths[5])):
        plain[5]


def test_corrupt_files_are_skipped_with_a_warning_or_fail_when_strict(tmp_path):
    root = make_tree(tmp_path / "tree")
    (root / "person_0" / "9.png").write_bytes(b"garbage")
    good = (root / "person_1" / "0.png").read_bytes()
    (root / "person_1" / "9.png").write_bytes(good[:len(good) // 3])  # truncated
    with pytest.warns(folders.SkippedImageWarning, match="9.png") as caught:
        files = folders.scan_identity_folders(str(root))
    assert len(caught) == 2
    assert len(files) == 12 and len(files.skipped) == 2
    assert "skipped 2 unreadable files" in files.summary()
    with pytest.raises(ImageDecodeError, match="person_0.9.png"):
        folders.scan_identity_folders(str(root), strict=True)


def test_empty_folders_and_missing_roots_give_clear_errors(tmp_path):
    root = make_tree(tmp_path / "tree")
    os.makedirs(root / "person_empty")
    with pytest.raises(ValueError, match="person_empty holds no images"):
        folders.scan_identity_folders(str(root))
    os.makedirs(tmp_path / "nothing")
    with pytest.raises(ValueError, match="no identity folders"):
        folders.scan_identity_folders(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        folders.scan_identity_folders(str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="holds no images"):
        folders.scan_flat_folder(str(tmp_path / "nothing"))


def test_min_images_and_held_out_split(tmp_path):
    root = make_tree(tmp_path / "tree", identities=3, per_identity=3)
    for j in (1, 2):
        os.remove(root / "person_2" / f"{j}.png")
    files = folders.scan_identity_folders(str(root), min_images=2)
    assert files.names == ("person_0", "person_1")
    kept, held = folders.split_per_identity(files.labels, 1)
    np.testing.assert_array_equal(held, [2, 5])
    np.testing.assert_array_equal(kept, [0, 1, 3, 4])
    kept, held = folders.split_per_identity(files.labels, 5)  # nobody has more than 5
    assert len(held) == 0 and len(kept) == 6


def test_folder_dataset_trains_through_the_pipeline(tmp_path):
    root = make_tree(tmp_path / "tree", identities=4, per_identity=5, ext="jpg")
    unseen = make_tree(tmp_path / "unseen", identities=2, per_identity=3)
    config = tiny_config()
    config.dataset.update(name="folder", root=str(root), unseen_root=str(unseen), test_images=1,
                          crop_fraction=0.9)
    data = sources.get_dataset(config)
    assert data.num_classes == 4 and data.names[0] == "person_0"
    assert (len(data.train), len(data.test), len(data.unseen)) == (16, 4, 6)
    record = data.train[0]
    chex.assert_shape(record["image"], (16, 16, 3))
    assert record["image"].dtype == np.uint8
    batch = next(iter(train_dataset(data.train, batch_size=8, image_size=16, seed=0)))
    chex.assert_shape(batch["image"], (8, 16, 16, 3))
    assert set(batch["label"].tolist()) <= {0, 1, 2, 3}


def test_pack_round_trip_equals_the_folder(tmp_path):
    root = make_tree(tmp_path / "tree", identities=3, per_identity=4)
    (root / "person_2" / "bad.png").write_bytes(b"nope")
    with pytest.warns(folders.SkippedImageWarning, match="bad.png"):
        index = pack.pack(str(root), str(tmp_path / "packed"), shards=2)
    assert index["num_records"] == 12 and index["counts"] == [4, 4, 4]
    assert len(index["skipped"]) == 1 and len(index["shards"]) == 2
    packed = records.ArrayRecordSource(str(tmp_path / "packed"), size=24)
    with pytest.warns(folders.SkippedImageWarning, match="bad.png"):
        folder = records.ImageFileSource(folders.scan_identity_folders(str(root)), size=24)
    assert packed.names == list(folder.files.names)
    np.testing.assert_array_equal(packed.labels(), folder.labels())
    for i in range(len(folder)):  # original bytes are stored: identical pixels
        np.testing.assert_array_equal(packed[i]["image"], folder[i]["image"])
    # Packing again replaces the old pack whole; a failing pack leaves it untouched.
    with pytest.raises(ImageDecodeError):
        pack.pack(str(root), str(tmp_path / "packed"), strict=True)
    assert pack.read_index(str(tmp_path / "packed"))["num_records"] == 12
    assert not [p for p in os.listdir(tmp_path) if ".partial" in p]


def test_pack_command_with_resize_and_a_stale_index(tmp_path):
    root = make_tree(tmp_path / "tree", identities=2, per_identity=3, size=40)
    out = subprocess.run([sys.executable, "-m", "jfacerec.data.pack", str(root),
                          str(tmp_path / "p"), "--size", "20", "--crop", "0.8"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "packed 6 images of 2 identities" in out.stdout
    source = records.ArrayRecordSource(str(tmp_path / "p"), size=20)
    chex.assert_shape(source[5]["image"], (20, 20, 3))
    index_path = tmp_path / "p" / "index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({**index, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        pack.read_index(str(tmp_path / "p"))
    missing = subprocess.run([sys.executable, "-m", "jfacerec.data.pack", str(tmp_path / "no"),
                              str(tmp_path / "q")], capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 1 and "no such folder" in missing.stderr


def test_arrayrecord_dataset_holds_out_test_images(tmp_path):
    root = make_tree(tmp_path / "tree", identities=3, per_identity=4)
    pack.pack(str(root), str(tmp_path / "packed"))
    config = tiny_config()
    config.dataset.update(name="arrayrecord", root=str(tmp_path / "packed"), test_images=1)
    data = sources.get_dataset(config)
    assert (data.num_classes, len(data.train), len(data.test)) == (3, 9, 3)
    np.testing.assert_array_equal(data.test.labels(), [0, 1, 2])


def write_pairs(path, header, lines):
    path.write_text("\n".join([header] + ["\t".join(map(str, l)) for l in lines]) + "\n")
    return str(path)


def test_lfw_pairs_formats_are_detected_from_the_header(tmp_path):
    view1 = write_pairs(tmp_path / "v1.txt", "2", [("A", 1, 2), ("B", 1, 3), ("A", 1, "C", 2),
                                                   ("B", 2, "D", 1)])
    folds = read_lfw_pairs(view1)
    assert len(folds) == 1 and [p.same for p in folds[0]] == [True, True, False, False]
    assert folds[0][2].names == ("A", "C") and folds[0][2].numbers == (1, 2)
    assert folds[0][0].paths("/r") == ("/r/A/A_0001.jpg", "/r/A/A_0002.jpg")
    view2 = write_pairs(tmp_path / "v2.txt", "2\t1", [("A", 1, 2), ("A", 1, "C", 2),
                                                      ("B", 1, 3), ("B", 2, "D", 1)])
    assert [len(f) for f in read_lfw_pairs(view2)] == [2, 2]
    bad = write_pairs(tmp_path / "bad.txt", "2", [("A", 1, 2)])
    with pytest.raises(ValueError, match="promises"):
        read_lfw_pairs(bad)
    bad = write_pairs(tmp_path / "bad2.txt", "1", [("A", 1), ("A", 1, "C", 2)])
    with pytest.raises(ValueError, match="line 2"):
        read_lfw_pairs(bad)


def test_pair_images_lists_each_image_once_and_indexes_both_sides(tmp_path):
    view1 = write_pairs(tmp_path / "v1.txt", "2", [("A", 1, 2), ("B", 1, 3), ("A", 1, "C", 2),
                                                   ("B", 3, "A", 2)])
    pairs = read_lfw_pairs(view1)[0]
    unique, first, second = pair_images(pairs, "/r")
    assert unique == ["/r/A/A_0001.jpg", "/r/A/A_0002.jpg", "/r/B/B_0001.jpg", "/r/B/B_0003.jpg",
                      "/r/C/C_0002.jpg"]
    chex.assert_type([first, second], np.int64)
    np.testing.assert_array_equal(first, [0, 2, 0, 3])
    np.testing.assert_array_equal(second, [1, 3, 4, 1])
    assert [(unique[a], unique[b]) for a, b in zip(first, second)] == [p.paths("/r")
                                                                        for p in pairs]


def test_thresholds_come_from_the_other_folds():
    folds = [(np.array([0.1, 0.9]), np.array([False, True])),
             (np.array([0.3, 0.5]), np.array([False, True]))]
    chosen = thresholds_from_other_folds(folds, lambda s, y: s[y].min())
    assert chosen == [0.5, 0.9]


def test_color_jitter_changes_only_what_is_on():
    image = render_faces(np.array([0]), np.array([0]), image_size=16)[0]
    rng = np.random.default_rng(0)
    assert color_jitter(image, rng, Augment()) is image
    out = color_jitter(image, rng, Augment(brightness=0.5, contrast=0.5, saturation=0.5))
    assert out.dtype == np.uint8 and out.shape == image.shape and not np.array_equal(out, image)
    grey = np.repeat(image.mean(-1, keepdims=True).astype(np.uint8), 3, -1)
    np.testing.assert_array_equal(color_jitter(grey, rng, Augment(saturation=0.9)), grey)


@needs_lfw
def test_hw2p2_dataset_from_real_faces(tmp_path):
    root, train_people, known_people = hw2p2_tree(tmp_path / "hw2p2")
    config = tiny_config()
    config.dataset.update(name="hw2p2", root=str(root), crop_fraction=0.5)
    data = sources.get_dataset(config)
    assert data.names == tuple(train_people) and data.num_classes == 4
    assert (len(data.train), len(data.test), len(data.unseen)) == (16, 4, 6)
    np.testing.assert_array_equal(data.test.labels(), [0, 1, 2, 3])
    chex.assert_shape(data.unseen[0]["image"], (16, 16, 3))


@needs_lfw
def test_lfw_dataset_leaves_out_the_people_of_the_pairs(tmp_path):
    pairs = os.path.join(DATA, "lfw", "pairsDevTest.txt")
    config = tiny_config()
    config.dataset.update(name="lfw", root=LFW, pairs=pairs, min_images=2, test_images=0,
                          crop_fraction=0.5)
    data = sources.get_dataset(config)
    held = sources.lfw_identities_in_pairs(pairs)
    assert len(held) == 963 and not held & set(data.names)
    assert data.num_classes == 1262 and len(data.train) == 6968  # README counts, less held out
    assert len(data.unseen) == 2741
    chex.assert_shape(data.train[0]["image"], (16, 16, 3))


@needs_orl
def test_orl_splits_are_disjoint_and_seeded():
    config = tiny_config()
    config.dataset.update(name="orl", root=ORL, split=3, known_identities=30, train_images=5)
    data = sources.get_dataset(config)
    assert data.num_classes == 30 and len(data.train) == 150 and len(data.test) == 150
    assert len(data.unseen) == 100
    assert not set(data.train.files.paths) & set(data.test.files.paths)
    assert not set(data.names) & set(data.unseen.files.names)
    again = sources.get_dataset(config)
    assert again.train.files.paths == data.train.files.paths
    config.dataset.split = 4
    assert sources.get_dataset(config).train.files.paths != data.train.files.paths
    image = data.train[0]["image"]
    chex.assert_shape(image, (16, 16, 3))
    np.testing.assert_array_equal(image[..., 0], image[..., 2])  # grey PGM -> RGB


@needs_orl
def test_orl_validation_images_are_held_out_of_the_training_images_only():
    config = tiny_config()
    config.dataset.update(name="orl", root=ORL, split=3, known_identities=40, train_images=5)
    outer = sources.get_dataset(config)
    config.dataset.validation_images = 2
    inner = sources.get_dataset(config)
    assert len(inner.train) == 40 * 3 and len(inner.test) == 40 * 2
    assert np.all(np.bincount(inner.test.labels()) == 2)
    # the split's training images, divided; none of its test images
    assert (sorted(inner.train.files.paths + inner.test.files.paths)
            == sorted(outer.train.files.paths))
    assert inner.names == outer.names
    assert sources.get_dataset(config).test.files.paths == inner.test.files.paths
    config.dataset.validation_images = 5
    with pytest.raises(ValueError, match=r"validation_images=5 must be in \[1, train_images\)"):
        sources.get_dataset(config)
