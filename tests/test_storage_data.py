"""Dataset roots on gs://: every kind of dataset gives the records of its local copy.

The data is uploaded to a Google Cloud Storage emulator on localhost (tests/gcs_emulator.py),
so the real gs:// code paths run: gcsfs for jfacerec's own reads, array_record's GCS client for
ArrayRecord shards.
"""

import os

import numpy as np
import pytest
from PIL import Image

import gcs_emulator
from conftest import make_tree, tiny_config
from jfacerec.core import storage
from jfacerec.data import align, bin as bin_sets, pack, pairs, pipeline, records, sources
from jfacerec.data.folders import scan_flat_folder, scan_identity_folders
from jfacerec.data.recordio import RecordIOSource
from jfacerec.data.synthetic import render_faces
from test_recordio import payload, png, write_pack

BUCKET = f"gs://{gcs_emulator.BUCKET}"


@pytest.fixture(scope="module")
def gcs():
    """The emulator, with this process's environment (and its worker processes') pointed at it."""
    with gcs_emulator.serving() as env:
        yield env


def upload(local, uri: str) -> str:
    """Every file below the local folder `local` as an object below `uri`; returns `uri`."""
    for name in storage.files_under(local):
        with open(os.path.join(local, name), "rb") as f:
            storage.epath_of(storage.join(uri, name)).write_bytes(f.read())
    return uri


def faces(source, indices=None) -> np.ndarray:
    """uint8 [n, h, w, 3]: the images of a source's records."""
    return np.stack([source[int(i)]["image"] for i in (indices if indices is not None
                                                          else range(len(source)))])


def relative(paths, root) -> list[str]:
    return [p[len(root):].lstrip("/") for p in paths]


def test_a_folder_dataset_on_gs_gives_the_records_of_its_local_copy(gcs, tmp_path):
    local = str(make_tree(tmp_path / "tree", identities=3, per_identity=3, size=24))
    (tmp_path / "tree" / "notes.txt").write_text("not an image")
    remote = upload(local, f"{BUCKET}/folder/tree")
    config = lambda root: tiny_config(**{"dataset.name": "folder", "dataset.root": root,  # noqa: E731
                                         "dataset.test_images": 1})
    here, there = sources.get_dataset(config(local)), sources.get_dataset(config(remote + "/"))
    assert there.names == here.names == ("person_0", "person_1", "person_2")
    for split in ("train", "test"):
        a, b = getattr(here, split), getattr(there, split)
        np.testing.assert_array_equal(b.labels(), a.labels())
        assert relative(b.files.paths, remote) == relative(a.files.paths, local)
        np.testing.assert_array_equal(faces(b), faces(a))
    flat = scan_flat_folder(remote + "/person_1")
    assert relative(flat.paths, remote) == ["person_1/0.png", "person_1/1.png", "person_1/2.png"]


def test_grain_workers_read_a_gs_folder_as_the_main_process_reads_the_local_one(gcs, tmp_path):
    local = str(make_tree(tmp_path / "tree", identities=2, per_identity=4, size=16))
    remote = upload(local, f"{BUCKET}/workers/tree")
    batch = {}
    for name, root, workers in (("local", local, 0), ("remote", remote, 1)):
        source = records.ImageFileSource(scan_identity_folders(root), size=16)
        stream = pipeline.train_dataset(source, batch_size=8, image_size=16, seed=3,
                                        num_workers=workers)
        batch[name] = next(iter(stream))
    np.testing.assert_array_equal(batch["remote"]["label"], batch["local"]["label"])
    np.testing.assert_array_equal(batch["remote"]["image"], batch["local"]["image"])


def test_lfw_pairs_landmarks_and_a_bin_on_gs_read_as_their_local_copies(gcs, tmp_path):
    root = tmp_path / "lfw"
    people = ("Ann", "Bob", "Cid")
    for i, person in enumerate(people):
        os.makedirs(root / person)
        for j, face in enumerate(render_faces(np.full(2, i), np.arange(2), image_size=32), 1):
            Image.fromarray(face).save(root / person / f"{person}_{j:04d}.jpg")
    (tmp_path / "pairs.txt").write_text("1\nAnn\t1\t2\nAnn\t1\tBob\t2\n")
    lines = ["path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5"] + [
        f"{p}/{p}_{j:04d}.jpg,10,12,21,12,16,17,11,23,21,23" for p in people for j in (1, 2)]
    (tmp_path / "landmarks.csv").write_text("\n".join(lines) + "\n")
    remote = upload(str(tmp_path), f"{BUCKET}/lfw-set")

    assert pairs.read_lfw_pairs(f"{remote}/pairs.txt") == pairs.read_lfw_pairs(
        str(tmp_path / "pairs.txt"))
    bin_sets.pack_pairs(f"{remote}/pairs.txt", f"{remote}/lfw", f"{remote}/out/lfw.bin", size=16)
    bin_sets.pack_pairs(str(tmp_path / "pairs.txt"), str(root), str(tmp_path / "lfw.bin"), size=16)
    there, here = bin_sets.read_bin(f"{remote}/out/lfw.bin"), bin_sets.read_bin(
        str(tmp_path / "lfw.bin"))
    assert there.name == "lfw"
    np.testing.assert_array_equal(there.issame, here.issame)
    np.testing.assert_array_equal(there.decoded(), here.decoded())

    lfw = {name: sources.get_dataset(tiny_config(**{
        "dataset.name": "lfw", "dataset.root": storage.join(base, "lfw"), "dataset.min_images": 2,
        "dataset.pairs": storage.join(base, "pairs.txt"), "dataset.test_images": 1}))
        for name, base in (("local", str(tmp_path)), ("remote", remote))}
    assert lfw["remote"].names == lfw["local"].names == ("Cid",)
    np.testing.assert_array_equal(faces(lfw["remote"].unseen), faces(lfw["local"].unseen))

    aligned = {}
    for name, base in (("local", str(tmp_path)), ("remote", remote)):
        files = scan_identity_folders(storage.join(base, "lfw"))
        table = align.read_landmarks_csv(storage.join(base, "landmarks.csv"),
                                         storage.join(base, "lfw"))
        points, origins = table.lookup(files.paths)
        assert origins[-1].endswith("landmarks.csv line 7")
        aligned[name] = faces(align.AlignedFileSource(files, points, size=16))
    np.testing.assert_array_equal(aligned["remote"], aligned["local"])


def test_a_recordio_pack_on_gs_gives_the_records_of_its_local_copy(gcs, tmp_path, monkeypatch):
    images = render_faces(np.repeat(np.arange(3), 2), np.tile(np.arange(2), 3), image_size=16)
    entries = [(0, payload(7.0, b"", (1.0, 3.0)))] + [
        (1 + i, payload(float(i // 2), png(face, magic_text=i == 4)))
        for i, face in enumerate(images)]
    write_pack(tmp_path / "pack", entries, num_classes=3, header=True)
    remote = upload(str(tmp_path / "pack"), f"{BUCKET}/recordio/pack")
    # Windows smaller than a record: headers straddle them, and one request reads several.
    monkeypatch.setattr(pack, "_REMOTE_WINDOW", 64)
    here, there = pack.open_recordio(str(tmp_path / "pack")), pack.open_recordio(remote)
    for field in ("offsets", "lengths", "labels"):
        np.testing.assert_array_equal(getattr(there, field), getattr(here, field))
    assert there.image(4) == here.image(4)  # the record split in three parts
    a, b = RecordIOSource(here, size=16), RecordIOSource(there, size=16)
    np.testing.assert_array_equal(faces(b), faces(a))
    np.testing.assert_array_equal(faces(b), images)


def test_an_arrayrecord_pack_written_to_gs_reads_as_its_local_copy(gcs, tmp_path):
    local = str(make_tree(tmp_path / "tree", identities=2, per_identity=3, size=16))
    remote = f"{BUCKET}/arrayrecord/packed"
    pack.pack(local, str(tmp_path / "packed"), shards=2)
    index = pack.pack(upload(local, f"{BUCKET}/arrayrecord/tree"), remote, shards=2)
    assert storage.listdir(remote) == sorted(["index.json"] + index["shards"])
    here = records.ArrayRecordSource(str(tmp_path / "packed"), size=16)
    there = records.ArrayRecordSource(remote, size=16)
    assert there.names == here.names
    np.testing.assert_array_equal(there.labels(), here.labels())
    np.testing.assert_array_equal(faces(there), faces(here))


def test_missing_gs_roots_and_files_are_the_errors_local_ones_are_naming_the_uri(gcs, tmp_path):
    missing = f"{BUCKET}/nothing-here"
    cases = [
        (lambda root: scan_identity_folders(root), FileNotFoundError, "no such folder"),
        (lambda root: pack.open_recordio(root), FileNotFoundError, "no such folder"),
        (lambda root: pack.read_index(root), FileNotFoundError, "no packed dataset here"),
        (lambda root: pairs.read_lfw_pairs(storage.join(root, "pairs.txt")), FileNotFoundError,
         "No such file or directory"),
        (lambda root: bin_sets.read_bin(storage.join(root, "lfw.bin")), FileNotFoundError,
         "No such file or directory"),
        (lambda root: align.read_landmarks_csv(storage.join(root, "l.csv"), root),
         FileNotFoundError, "no such landmarks file"),
    ]
    for read, error, words in cases:
        for root in (str(tmp_path / "nothing-here"), missing):
            with pytest.raises(error, match=words) as caught:
                read(root)
            assert root in str(caught.value) and "\n" not in str(caught.value)
