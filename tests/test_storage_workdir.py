"""A workdir on object storage: train -> evaluate -> load -> gallery with `--workdir gs://...`.

The store is a real GCS JSON API served on localhost (tests/gcs_emulator.py); gcsfs (etils.epath's
gs:// backend) and TensorStore (orbax's arrays) talk to it as they would to Google's. Every figure
and file must equal the same run's on a local workdir.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import gcs_emulator
from conftest import REPO, make_tree, read_csv, tiny_config

GS = f"gs://{gcs_emulator.BUCKET}"

# tiny_config's sizes, as the commands take them.
TINY = ["--config", "configs/demo.py:runlocal", "--config.image_size=16", "--config.num_devices=1",
        "--config.batch_size=16", "--config.total_steps=12", "--config.log_every_steps=4",
        "--config.checkpoint_every_steps=6", "--config.optimizer.warmup_steps=2",
        "--config.dataset.num_identities=8", "--config.dataset.train_images=12",
        "--config.dataset.test_images=4", "--config.dataset.num_unseen_identities=12",
        "--config.dataset.unseen_images=4", "--config.eval.batch_size=32",
        "--config.eval.num_pairs=60", "--config.eval.folds=5"]


@pytest.fixture(scope="module")
def gcs():
    """The emulator's environment, set in this process and given to the commands run."""
    with gcs_emulator.serving() as env:
        yield env


def run(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "images_per_second"} for r in records]


def local_run(workdir: str, faces, out) -> None:
    """What the commands of `both` do, in this process, on a local workdir (the commands are
    thin: each calls these)."""
    import jfacerec
    from jfacerec.data.folders import scan_identity_folders
    from jfacerec.evaluation.evaluator import evaluate
    from jfacerec.inference.gallery import enroll, query_files, write_matches
    from jfacerec.training import train

    config = tiny_config(total_steps=12, log_every_steps=4, checkpoint_every_steps=6,
                         **{"optimizer.warmup_steps": 2})
    train(config, workdir)
    evaluate(config, workdir, [])
    model = jfacerec.load(workdir)
    gallery = enroll(model, scan_identity_folders(str(faces), strict=False))
    gallery.save(str(out / "gallery.npz"))
    files, ids = query_files(str(faces), strict=False)
    write_matches(str(out / "matches.csv"), ids,
                  model.identify(list(files.paths), gallery, threshold=None), 1)


@pytest.fixture(scope="module")
def both(gcs, tmp_path_factory):
    """(local workdir, gs:// workdir, local tmp, faces): the same run trained, evaluated and
    enrolled in each, with a gallery and matches written beside each workdir: by the commands
    on gs://, by the library calls they make on the local one."""
    tmp = tmp_path_factory.mktemp("storage")
    faces = make_tree(tmp / "faces", identities=3, per_identity=2, size=20)
    local, remote = str(tmp / "run"), f"{GS}/run"
    ok(run("jfacerec.train", *TINY, "--workdir", remote))
    ok(run("jfacerec.evaluate", *TINY, "--workdir", remote))
    ok(run("jfacerec.gallery", "enroll", "--workdir", remote, "--images", str(faces),
           "--out", f"{GS}/gallery.npz"))
    ok(run("jfacerec.gallery", "identify", "--gallery", f"{GS}/gallery.npz",
           "--images", str(faces), "--out", f"{GS}/matches.csv"))
    local_run(local, faces, tmp)
    return local, remote, tmp, faces


def data_folder(name: str) -> str:
    return name.rsplit("/d/", 1)[0] if "/d/" in name else ""


def named(files: set[str]) -> set[str]:
    """The files' names, less OCDBT's random data-file names, with TensorBoard's timestamps
    blanked."""
    return {"tb/events.out.tfevents.*" if f.startswith("tb/events.out.tfevents.") else f
            for f in files if not data_folder(f)}


def test_a_gs_workdir_holds_the_files_of_a_local_one(both):
    from jfacerec.core import storage

    local, remote, _, _ = both
    local_files = set(storage.files_under(local)) - {".lock"}
    remote_files = set(storage.files_under(remote))
    # OCDBT names its data files at random: those are compared by folder.
    assert named(remote_files) == named(local_files)
    assert {data_folder(f) for f in remote_files} == {data_folder(f) for f in local_files}
    for name in ("config.json", "metrics.jsonl", "training.png",
                 "eval/metrics.json", "eval/roc.png", "eval/scores.png",
                 "checkpoints/12/sha256.json", "checkpoints/6/sha256.json"):
        assert name in local_files
    assert any(name.startswith("tb/events.out.tfevents") for name in local_files)
    assert storage.read_text(f"{remote}/config.json") == storage.read_text(f"{local}/config.json")


def test_training_and_evaluation_on_gs_give_the_local_figures(both):
    from jfacerec.core import workdir as workdir_files

    local, remote, _, _ = both
    assert without_timing(workdir_files.read_metrics(remote)) == \
        without_timing(workdir_files.read_metrics(local))
    assert [r["step"] for r in workdir_files.read_metrics(remote)] == [4, 8, 12]
    assert workdir_files.read_eval_metrics(remote) == workdir_files.read_eval_metrics(local)


def events(data: bytes) -> list:
    """The Event protos of a TensorBoard event file (TFRecord framing: length, its CRC, data,
    its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    out, at = [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        out.append(Event.FromString(data[at + 12:at + 12 + length]))
        at += 12 + length + 4
    return out


def test_tensorboard_events_on_gs_hold_the_logged_losses(both):
    from jfacerec.core import storage, workdir as workdir_files

    local, remote, _, _ = both
    name = next(n for n in storage.files_under(remote) if n.startswith("tb/"))
    losses = [(e.step, v.simple_value) for e in events(storage.read_bytes(f"{remote}/{name}"))
              for v in e.summary.value if v.tag == "train/loss"]
    want = [(r["step"], r["loss"]) for r in workdir_files.read_metrics(local)]
    assert [s for s, _ in losses] == [s for s, _ in want]
    np.testing.assert_allclose([v for _, v in losses], [v for _, v in want], rtol=1e-6)


def test_load_and_gallery_on_gs_give_the_local_answers(both):
    import jfacerec
    from jfacerec.inference.gallery import Gallery

    local, remote, tmp, faces = both
    images = sorted(str(p) for p in faces.rglob("*.png"))
    from_gs, from_local = jfacerec.load(remote), jfacerec.load(local)
    assert from_gs.step == from_local.step == 12
    np.testing.assert_array_equal(from_gs.embed(images), from_local.embed(images))
    gs_gallery, local_gallery = Gallery.load(f"{GS}/gallery.npz"), Gallery.load(
        str(tmp / "gallery.npz"))
    np.testing.assert_array_equal(gs_gallery.embeddings, local_gallery.embeddings)
    assert gs_gallery.identities == local_gallery.identities
    from jfacerec.core import storage
    copy = tmp / "gs_matches.csv"
    copy.write_text(storage.read_text(f"{GS}/matches.csv"))
    assert read_csv(copy) == read_csv(tmp / "matches.csv")
    assert [m.name for m in from_gs.identify(images, f"{GS}/gallery.npz")] == \
        [m.name for m in from_local.identify(images, str(tmp / "gallery.npz"))]


def test_a_missing_bucket_is_one_line_before_anything_is_written(gcs):
    result = run("jfacerec.train", *TINY, "--workdir", "gs://no-such-bucket/run")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot write to gs://no-such-bucket/run"), result.stderr
    assert "bucket" in lines[-1]
    assert "Traceback" not in result.stderr


def test_no_credentials_is_one_line_naming_the_path():
    env = {k: "" for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
    env["GOOGLE_APPLICATION_CREDENTIALS"] = "/nonexistent/key.json"
    result = run("jfacerec.train", *TINY, "--workdir", "gs://some-bucket/run", env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: cannot use gs://some-bucket/run: no Google Cloud credentials"), result.stderr


def test_a_file_system_without_renames_stops_training_before_it_writes(tmp_path, monkeypatch):
    from jfacerec.core import atomic
    from jfacerec.training import train

    def refuse(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link", source, None, target)

    monkeypatch.setattr(atomic.os, "replace", refuse)
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=f"cannot write to {workdir}: OSError.*renames"):
        train(tiny_config(total_steps=2), str(workdir))
    assert sorted(os.listdir(workdir)) == []


def test_appending_metrics_on_gs_rewrites_the_object_whole(gcs):
    from jfacerec.core import storage, workdir as workdir_files

    workdir = f"{GS}/append"
    for step in (1, 2, 3):
        workdir_files.append_metrics({"step": step, "loss": 1.0 / step}, workdir)
    workdir_files.keep_metrics(workdir, 2)
    assert workdir_files.read_metrics(workdir) == [{"step": 1, "loss": 1.0},
                                                   {"step": 2, "loss": 0.5}]
    assert storage.listdir(workdir) == ["metrics.jsonl"]  # no temporary object is left
    json.loads(storage.read_text(f"{workdir}/metrics.jsonl").splitlines()[0])


def test_a_damaged_checkpoint_on_gs_is_found_and_skipped(both):
    """Last in this module: it damages the gs:// workdir's newest step, then mends it."""
    import jfacerec
    from jfacerec.core import storage
    from jfacerec.core.checkpoint import DamagedCheckpointWarning

    _, remote, _, _ = both
    data = sorted(n for n in storage.files_under(f"{remote}/checkpoints/12") if "/d/" in n)[0]
    target = storage.epath_of(f"{remote}/checkpoints/12/{data}")
    saved = target.read_bytes()
    target.write_bytes(bytes([saved[0] ^ 0xFF]) + saved[1:])  # a new object, one byte changed
    try:
        with pytest.warns(DamagedCheckpointWarning, match=f"checkpoints/12.*{data.split('/')[-1]}"):
            assert jfacerec.load(remote).step == 6
    finally:
        target.write_bytes(saved)
    assert jfacerec.load(remote).step == 12
