"""Test set-up: 8 virtual CPU devices (set before JAX starts) and a tiny training config."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile the same tiny models over and over (every run builds new jitted closures, and
# commands run in subprocesses): JAX's persistent compilation cache turns repeats into disk reads.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "jfacerec-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import csv  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from absl import flags  # noqa: E402

# grain's worker processes read absl flags; under pytest nobody parses the command line.
flags.FLAGS.mark_as_parsed()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Real faces (../shared/data): tests that need them skip when the folder is absent (a user's
# clone); CI sets JFACEREC_DATA and fails before the tests if it is missing.
DATA = os.environ.get("JFACEREC_DATA", os.path.join(REPO, "..", "shared", "data"))
LFW = os.path.join(DATA, "lfw", "lfw-deepfunneled")
ORL = os.path.join(DATA, "att_faces")
needs_lfw = pytest.mark.skipif(not os.path.isdir(LFW), reason=f"no LFW at {LFW}")
needs_orl = pytest.mark.skipif(not os.path.isdir(ORL), reason=f"no ORL at {ORL}")


def load_config(spec):
    """configs/NAME.py[:ARG] as `--config` gives it (unlocked): load_config("zoo.py:resnet18")."""
    from jfacerec.core import config_base

    return config_base.load(os.path.join(REPO, "configs", spec))


def tiny_config(**overrides):
    """The demo config shrunk to seconds: 8 identities, 16-pixel faces, a 4-to-32-channel ResNet."""
    c = load_config("demo.py:runlocal")
    c.image_size = 16
    c.num_devices = 1
    c.batch_size = 16
    c.total_steps = 30
    c.log_every_steps = 5
    c.checkpoint_every_steps = 10
    c.optimizer.warmup_steps = 5
    c.dataset.update(num_identities=8, train_images=12, test_images=4, num_unseen_identities=12,
                     unseen_images=4)
    c.eval.update(batch_size=32, num_pairs=60, folds=5)
    for key, value in overrides.items():
        target = c
        *path, leaf = key.split(".")
        for part in path:
            target = target[part]
        target[leaf] = value
    return c


@pytest.fixture
def config():
    return tiny_config()


def small_lfw_pairs(path) -> list[list[str]]:
    """A View 2-style pairs file at `path` over real LFW people with 3+ images: two folds of 2
    matched then 2 mismatched pairs, 4 disjoint people each; returns each fold's people."""
    people = sorted(n for n in os.listdir(LFW) if len(os.listdir(os.path.join(LFW, n))) >= 3)
    folds = [people[0:4], people[4:8]]
    lines = ["2\t2"]
    for a, b, c, d in folds:
        lines += [f"{a}\t1\t2", f"{b}\t1\t3", f"{c}\t1\t{d}\t2", f"{a}\t3\t{d}\t1"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return folds


def small_lfw_config(pairs):
    """configs/lfw.py:runlocal shrunk to 4 steps at 16 px over `pairs` (people with 3+ images)."""
    config = load_config("lfw.py:runlocal")
    config.update(image_size=16, total_steps=4, checkpoint_every_steps=4, num_devices=1)
    config.dataset.update(root=LFW, pairs=str(pairs), min_images=3)
    return config


def make_tree(root, identities=3, per_identity=4, size=24, ext="png"):
    """root/person_i/j.<ext>: synthetic faces as real files."""
    from jfacerec.data.synthetic import render_faces

    for i in range(identities):
        os.makedirs(root / f"person_{i}", exist_ok=True)
        faces = render_faces(np.full(per_identity, i), np.arange(per_identity), image_size=size)
        for j, face in enumerate(faces):
            Image.fromarray(face).save(root / f"person_{i}" / f"{j}.{ext}")
    return root


def hw2p2_tree(root):
    """The HW2P2 layout from real LFW faces: 4 training identities, 3 known, unknown queries."""
    people = sorted(n for n in os.listdir(LFW) if len(os.listdir(os.path.join(LFW, n))) >= 6)
    train_people, known_people, strangers = people[:4], people[4:7], people[7:9]
    image = lambda name, i: os.path.join(LFW, name, f"{name}_{i:04d}.jpg")  # noqa: E731
    rows = []
    for name in train_people:
        for split, numbers in (("train", (1, 2, 3, 4)), ("dev", (5,))):
            folder = root / "classification" / split / name
            os.makedirs(folder, exist_ok=True)
            for i in numbers:
                shutil.copy(image(name, i), folder / f"{i}.jpg")
        os.makedirs(root / "classification" / "test", exist_ok=True)
        shutil.copy(image(name, 6), root / "classification" / "test" / f"{name}_6.jpg")
    for name in known_people:
        os.makedirs(root / "verification" / "known" / name, exist_ok=True)
        for i in (1, 2):
            shutil.copy(image(name, i), root / "verification" / "known" / name / f"{i}.jpg")
    for split in ("dev", "test"):
        os.makedirs(root / "verification" / f"unknown_{split}", exist_ok=True)
    for k, name in enumerate(known_people + strangers):
        query = f"q{k}.jpg"
        shutil.copy(image(name, 3), root / "verification" / "unknown_dev" / query)
        shutil.copy(image(name, 4), root / "verification" / "unknown_test" / query)
        rows.append((query, name if name in known_people else "n000000"))
    (root / "verification" / "dev_identities.csv").write_text(
        "id,label\n" + "".join(f"{q},{n}\n" for q, n in rows))
    return root, train_people, known_people


def read_csv(path):
    """The rows of a CSV file, header included."""
    with open(path, newline="") as f:
        return list(csv.reader(f))


def run_module(*args):
    """`python -m ARGS` from the repository root, on the CPU: the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="session")
def hw2p2_model(tmp_path_factory):
    """(workdir, hw2p2 root, training names, known names): a 12-step model on real faces."""
    if not os.path.isdir(LFW):
        pytest.skip(f"no LFW at {LFW}")
    from jfacerec.training import train

    tmp = tmp_path_factory.mktemp("apps")
    root, train_people, known_people = hw2p2_tree(tmp / "hw2p2")
    config = tiny_config(total_steps=12, checkpoint_every_steps=12)
    config.dataset.update(name="hw2p2", root=str(root), crop_fraction=0.5)
    workdir = str(tmp / "workdir")
    train(config, workdir)
    return workdir, root, train_people, known_people
