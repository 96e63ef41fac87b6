"""Sharded gallery search everywhere: a gallery of more than `gallery.SHARD_ABOVE` rows is split
over every device (of one process, or of two on localhost) with the single-device answers, and
enroll streams a folder tree larger than one batch."""

import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest

import jfacerec
from conftest import make_tree, read_csv, run_module, tiny_config
from jfacerec.data.folders import scan_identity_folders
from jfacerec.inference import gallery as gallery_lib
from jfacerec.inference.gallery import Gallery, enroll
from jfacerec.inference.matcher import ShardedGallery
from test_multihost import REPO, _check, _free_port, _two_process_env

K, THRESHOLD = 3, 0.65


def synthetic_gallery() -> tuple[Gallery, np.ndarray]:
    """(gallery of 301 unit rows, keep="all", 100 names of 3 or 4 rows; queries float32 [37, 16]).

    Queries 0-9 are near gallery rows (known), 10-14 copy row 7 exactly, which also sits at rows
    125, 250 and 300 (ties across the shards of 2, 4 and 8 devices), the rest are random (some
    unknown at THRESHOLD, some not)."""
    rng = np.random.default_rng(7)
    rows = rng.normal(size=(301, 16)).astype(np.float32)
    rows[[125, 250, 300]] = rows[7]
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    names = np.array([f"p{i % 100:03d}" for i in range(301)])
    queries = rng.normal(size=(37, 16)).astype(np.float32)
    queries[:10] = rows[rng.choice(301, 10, replace=False)] + 0.05 * queries[:10]
    queries[10:15] = rows[7]
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return Gallery(names, rows, "f" * 16, "synthetic", "all"), queries


def as_lists(matches) -> list:
    return [[m.name, m.score, [list(c) for c in m.candidates]] for m in matches]


def assert_same_matches(got: list, want: list) -> None:
    """Same identities, same unknown decisions, the same scores to float tolerance."""
    assert [[m[0], [c[0] for c in m[2]]] for m in got] == \
        [[m[0], [c[0] for c in m[2]]] for m in want]
    np.testing.assert_allclose([[c[1] for c in m[2]] for m in got],
                               [[c[1] for c in m[2]] for m in want], rtol=1e-6, atol=1e-6)


def test_a_gallery_above_shard_above_is_searched_on_every_device_alike(monkeypatch):
    gallery, queries = synthetic_gallery()
    assert isinstance(gallery.searched(), np.ndarray)  # 301 rows: far below SHARD_ABOVE
    want = as_lists(gallery.identify(queries, k=K, threshold=THRESHOLD))
    monkeypatch.setattr(gallery_lib, "SHARD_ABOVE", 301)
    assert isinstance(gallery.searched(), np.ndarray)  # not above it: one device
    monkeypatch.setattr(gallery_lib, "SHARD_ABOVE", 300)
    sharded = gallery.searched()
    assert isinstance(sharded, ShardedGallery) and sharded.mesh.size == 8
    got = as_lists(gallery.identify(queries, k=K, threshold=THRESHOLD))
    assert_same_matches(got, want)
    # The case means something: known and unknown queries, and the tied row 7 (p007) wins.
    known = [m[0] != gallery_lib.UNKNOWN for m in want]
    assert 15 <= sum(known) < len(known)
    assert [m[0] for m in want[10:15]] == ["p007"] * 5
    assert [c[0] for c in want[10][2]][0] == "p007"


# Each of 2 processes (2 CPU devices each) loads the same gallery and queries and searches them
# over all 4 devices, the gallery's rows split over both processes.
_IDENTIFY = """
import json, sys
import jax, numpy as np
from jfacerec.core import parallel
from jfacerec.inference import gallery as gallery_lib
parallel.maybe_initialize_distributed()
assert (jax.process_count(), jax.local_device_count(), jax.device_count()) == (2, 2, 4)
gallery_path, queries_path, out, k, threshold = sys.argv[1:]
gallery_lib.SHARD_ABOVE = 300
gallery = gallery_lib.Gallery.load(gallery_path)
searched = gallery.searched()
assert searched.mesh.size == 4 and not searched.rows.is_fully_addressable
matches = gallery.identify(np.load(queries_path), k=int(k), threshold=float(threshold))
with open(out, "w") as f:
    json.dump([[m.name, m.score, [list(c) for c in m.candidates]] for m in matches], f)
"""


def test_two_processes_identify_like_one_device(tmp_path):
    gallery, queries = synthetic_gallery()
    gallery.save(str(tmp_path / "gallery.npz"))
    np.save(tmp_path / "queries.npy", queries)
    address = f"127.0.0.1:{_free_port()}"
    _check([subprocess.Popen(
        [sys.executable, "-c", _IDENTIFY, str(tmp_path / "gallery.npz"),
         str(tmp_path / "queries.npy"), str(tmp_path / f"matches{p}.json"), str(K),
         str(THRESHOLD)], cwd=REPO, env=_two_process_env(p, address), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE) for p in range(2)], "2-process identify")
    want = as_lists(gallery.identify(queries, k=K, threshold=THRESHOLD))
    for p in range(2):
        with open(tmp_path / f"matches{p}.json") as f:
            assert_same_matches(json.load(f), want)


@pytest.fixture(scope="module")
def model_and_faces(tmp_path_factory):
    """(workdir of a 2-step tiny model, a tree of 3 identities x 5 synthetic faces)."""
    from jfacerec.training import train

    tmp = tmp_path_factory.mktemp("sharded")
    workdir = str(tmp / "w")
    train(tiny_config(total_steps=2, checkpoint_every_steps=2, log_every_steps=1), workdir)
    return workdir, make_tree(tmp / "known", identities=3, per_identity=5, size=20)


@pytest.mark.slow  # trains a tiny model
def test_enroll_streams_more_faces_than_a_batch_into_the_same_gallery(model_and_faces):
    workdir, root = model_and_faces
    files = scan_identity_folders(str(root), strict=True)
    # One device: 15 faces are 4 batches of 4 (the last one padded), against one batch of all 15.
    streamed, whole = jfacerec.load(workdir, batch_size=4), jfacerec.load(workdir, batch_size=64)
    assert streamed._restored.mesh.size == 1 and len(files) > streamed.batch_size
    at_once = whole.embed_files(list(files.paths))
    every = enroll(streamed, files, keep="all")
    chex.assert_shape(every.embeddings, (15, at_once.shape[1]))
    np.testing.assert_array_equal(every.names, np.array(files.names)[files.labels])
    np.testing.assert_allclose(every.embeddings, at_once, rtol=1e-5, atol=1e-6)
    mean = enroll(streamed, files, keep="mean")
    sums = np.stack([at_once[files.labels == c].sum(0) for c in range(3)])
    np.testing.assert_array_equal(mean.names, ["person_0", "person_1", "person_2"])
    np.testing.assert_allclose(mean.embeddings, sums / np.linalg.norm(sums, axis=1, keepdims=True),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # trains a tiny model
def test_recognizer_identify_searches_a_large_gallery_sharded(model_and_faces, monkeypatch):
    workdir, root = model_and_faces
    model = jfacerec.load(workdir)
    gallery = enroll(model, scan_identity_folders(str(root), strict=True), keep="all")
    queries = [os.path.join(root, f"person_{i}", "2.png") for i in range(3)]
    want = as_lists(model.identify(queries, gallery, k=2, threshold=0.9))
    monkeypatch.setattr(gallery_lib, "SHARD_ABOVE", 0)
    assert isinstance(gallery.searched(), ShardedGallery)
    assert_same_matches(as_lists(model.identify(queries, gallery, k=2, threshold=0.9)), want)
    # Each query is an enrolled face: it finds itself.
    assert [m[0] for m in want] == [f"person_{i}" for i in range(3)]


def large_gallery(model, files) -> Gallery:
    """Every face of `files` enrolled (keep="all") among random unit rows: one row more than
    SHARD_ABOVE in all, so that identify searches it split over every device."""
    enrolled = enroll(model, files, keep="all")
    filler = np.random.default_rng(8).normal(
        size=(gallery_lib.SHARD_ABOVE + 1 - len(files), enrolled.dim)).astype(np.float32)
    return Gallery(np.concatenate([enrolled.names, [f"filler_{i}" for i in range(len(filler))]]),
                   np.concatenate([enrolled.embeddings,
                                   filler / np.linalg.norm(filler, axis=1, keepdims=True)]),
                   enrolled.fingerprint, enrolled.model, "all", workdir=enrolled.workdir)


def one_device_matches(model, gallery, files, root, out, monkeypatch) -> list:
    """The matches of every face of `files` against `gallery` searched on one device, written to
    `out` as the identify command writes them (k=2, threshold 0.99); `model` runs on one device
    too."""
    monkeypatch.setattr(gallery_lib, "SHARD_ABOVE", len(gallery.names))
    assert gallery.search_devices() == 1
    matches = gallery.identify(model.embed_files(list(files.paths)), k=2, threshold=0.99)
    gallery_lib.write_matches(str(out), [os.path.relpath(p, root) for p in files.paths], matches, 2)
    return matches


@pytest.mark.slow  # trains a tiny model
def test_identify_command_searches_a_gallery_above_shard_above_on_every_device(model_and_faces,
                                                                               tmp_path,
                                                                               monkeypatch):
    workdir, root = model_and_faces
    model = jfacerec.load(workdir)
    files = scan_identity_folders(str(root), strict=True)
    large = large_gallery(model, files)
    large.save(str(tmp_path / "large.npz"))
    out = run_module("jfacerec.gallery", "identify", "--gallery", str(tmp_path / "large.npz"),
                     "--images", str(root), "--out", str(tmp_path / "m.csv"), "--top-k", "2",
                     "--threshold", "0.99")
    assert out.returncode == 0, out.stderr
    assert f"searched {gallery_lib.SHARD_ABOVE + 1:,} gallery rows on 8 devices" in out.stdout
    want = one_device_matches(model, large, files, root, tmp_path / "want.csv", monkeypatch)
    rows = read_csv(tmp_path / "m.csv")[1:]
    assert [r[0] for r in rows] == [os.path.relpath(p, root) for p in files.paths]
    assert [[r[1], r[3]] for r in rows] == [[m.name, m.candidates[1][0]] for m in want]
    np.testing.assert_allclose([[float(r[2]), float(r[4])] for r in rows],
                               [[c[1] for c in m.candidates] for m in want], atol=2e-6)
    assert [r[1] for r in rows] == np.array(files.names)[files.labels].tolist()  # each finds itself


# Both processes (2 CPU devices each) run `python -m jfacerec.gallery identify` together (the
# command joins jax.distributed itself): its batches of 64 rows put 16 on each device, and the 15
# faces all on process 0's, none on process 1's. Then the Python API, with batches of 8 rows (2 per
# device): 15 faces leave process 1 three rows of the second batch, 9 faces none. Each process
# saves what it got.
_COMMAND_THEN_API = """
import json, runpy, sys
import numpy as np
workdir, root, large, out = sys.argv[1:]
sys.argv = ["jfacerec.gallery", "identify", "--gallery", large, "--images", root,
            "--out", out + "/matches.csv", "--top-k", "2", "--threshold", "0.99"]
try:
    runpy.run_module("jfacerec.gallery", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
import jax, jfacerec
from jfacerec.data.folders import scan_identity_folders
from jfacerec.inference.gallery import enroll
assert (jax.process_count(), jax.local_device_count(), jax.device_count()) == (2, 2, 4)
p = jax.process_index()
model = jfacerec.load(workdir, batch_size=8)
assert model._restored.mesh.size == 4
files = scan_identity_folders(root, strict=True)
paths = list(files.paths)
np.save(f"{out}/embed_{p}.npy", model.embed(paths))
np.save(f"{out}/embed9_{p}.npy", model.embed(paths[:9]))
np.save(f"{out}/enrolled_{p}.npy", enroll(model, files, keep="mean").embeddings)
matches = model.identify(paths, large, k=2, threshold=0.99)
with open(f"{out}/identify_{p}.json", "w") as f:
    json.dump([[m.name, m.score, [list(c) for c in m.candidates]] for m in matches], f)
"""


@pytest.mark.slow  # trains a tiny model, then 2 processes restore it
def test_two_processes_run_the_identify_command_and_the_api_like_one_device(model_and_faces,
                                                                            tmp_path,
                                                                            monkeypatch):
    workdir, root = model_and_faces
    files = scan_identity_folders(str(root), strict=True)
    paths = list(files.paths)
    # XLA's CPU convolutions round by the batch shape they are compiled for: the answers are
    # those of one device given the batches each device gets (16 rows, then 2), bit for bit.
    command_like, api_like = (jfacerec.load(workdir, batch_size=b) for b in (16, 2))
    assert command_like._restored.mesh.size == api_like._restored.mesh.size == 1
    large = large_gallery(command_like, files)
    large.save(str(tmp_path / "large.npz"))
    address = f"127.0.0.1:{_free_port()}"
    out = _check([subprocess.Popen(
        [sys.executable, "-c", _COMMAND_THEN_API, workdir, str(root), str(tmp_path / "large.npz"),
         str(tmp_path)], cwd=REPO, env=_two_process_env(p, address), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE) for p in range(2)], "2-process gallery identify")
    assert f"searched {gallery_lib.SHARD_ABOVE + 1:,} gallery rows on 4 devices" in out
    one_device_matches(command_like, large, files, root, tmp_path / "want.csv", monkeypatch)
    # Only process 0 wrote a matches file: the one a single device writes, byte for byte.
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".csv")) == [
        "matches.csv", "want.csv"]
    assert (tmp_path / "matches.csv").read_text() == (tmp_path / "want.csv").read_text()
    assert [r[1] for r in read_csv(tmp_path / "want.csv")[1:]] == \
        np.array(files.names)[files.labels].tolist()  # each face finds itself
    embeddings = api_like.embed(paths)
    enrolled = enroll(api_like, files, keep="mean").embeddings
    want = as_lists(api_like.identify(paths, large, k=2, threshold=0.99))
    for p in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"embed_{p}.npy"), embeddings)
        np.testing.assert_array_equal(np.load(tmp_path / f"embed9_{p}.npy"), embeddings[:9])
        np.testing.assert_array_equal(np.load(tmp_path / f"enrolled_{p}.npy"), enrolled)
        with open(tmp_path / f"identify_{p}.json") as f:
            assert json.load(f) == want
