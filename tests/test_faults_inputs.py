"""Bad input meets one line naming the fix, never a traceback, and leaves files whole.

Command-line behaviour runs the real commands as subprocesses: a bad command line or config exits
with status 2, bad input with status 1, stderr holding exactly one line, `error: ...`, and nothing
written. Library behaviour (images, galleries, embeddings, atomic writes) is tested in-process.
"""

import errno
import os
import re
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import ml_collections
import numpy as np
import pytest
from PIL import Image

import jfacerec
from conftest import REPO, make_tree, tiny_config
from jfacerec.core import atomic, cli
from jfacerec.core.atomic import atomic_open
from jfacerec.data import images
from jfacerec.data.folders import SkippedImageWarning, scan_identity_folders
from jfacerec.data.sources import Hw2p2Layout
from jfacerec.evaluation.hw2p2 import check_layout
from jfacerec.inference.gallery import Gallery

COMMANDS = ["jfacerec.train", "jfacerec.evaluate", "jfacerec.predict", "jfacerec.gallery",
            "jfacerec.data.pack", "jfacerec.models.summary", "jfacerec.evaluation.lfw",
            "jfacerec.evaluation.orl"]


def command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)


def messages(stderr: str) -> list[str]:
    """stderr's lines, less a progress bar's redrawn segments."""
    return [segment for line in stderr.splitlines() for segment in line.split("\r")
            if segment.strip() and not re.match(r"\S+:\s+\d+%\|", segment)]


def assert_one_error_line(result: subprocess.CompletedProcess, status: int) -> str:
    """The error line, once the command exited with `status` and printed only that line."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = messages(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.returncode == status, result.stderr
    return lines[0]


# -- The command line -----------------------------------------------------------------------------

RAISING_CONFIG = """def get_config(arg=None):
    raise ValueError(f"unknown variant {arg!r}; choose from runlocal")
"""

# (case, train's arguments but --workdir, what the error line must say)
BAD_COMMAND_LINES = [
    ("an unknown config key", ["--config", "configs/demo.py", "--config.nonexistent_key=3"],
     ["--config.nonexistent_key", "no key 'nonexistent_key'", "configs/demo.py"]),
    ("a misspelt nested key", ["--config", "configs/demo.py", "--config.model.nme=resnet18"],
     ["--config.model.nme", "no key 'nme'", '"name"']),
    ("a missing config file", ["--config", "configs/nope.py"], ["configs/nope.py", "no such"]),
    ("a missing config file with an override",
     ["--config", "configs/nope.py", "--config.total_steps=3"], ["configs/nope.py", "no such"]),
    ("a config file raising ValueError", ["--config", "RAISING:runlocl"],
     ["unknown variant 'runlocl'", "choose from runlocal"]),
    ("a value of the wrong type", ["--config", "configs/demo.py", "--config.total_steps=abc"],
     ["--config.total_steps=abc"]),
    ("zero total_steps", ["--config", "configs/demo.py", "--config.total_steps=0"],
     ["total_steps", "positive integer"]),
    ("zero checkpoint_every_steps",
     ["--config", "configs/demo.py", "--config.checkpoint_every_steps=0"],
     ["checkpoint_every_steps", "positive integer"]),
    ("zero image_size", ["--config", "configs/demo.py", "--config.image_size=0"],
     ["image_size", "positive integer"]),
    ("a negative batch_size", ["--config", "configs/demo.py", "--config.batch_size=-4"],
     ["batch_size", "positive integer"]),
    ("no --config", [], ["--config is required"]),
    ("an unknown flag", ["--config", "configs/demo.py", "--bogus"], ["bogus"]),
]


@pytest.fixture(scope="module")
def bad_command_lines(tmp_path_factory):
    """{case: (train's result, its workdir)}, the cases run side by side (each is a process)."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "raising.py").write_text(RAISING_CONFIG)

    def run(case):
        name, args, _ = case
        workdir = tmp / re.sub(r"\W+", "_", name)
        args = [a.replace("RAISING", str(tmp / "raising.py")) for a in args]
        return name, (command("jfacerec.train", *args, "--workdir", str(workdir)), workdir)

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(run, BAD_COMMAND_LINES))


@pytest.mark.parametrize("case, expected", [(c[0], c[2]) for c in BAD_COMMAND_LINES],
                         ids=[c[0] for c in BAD_COMMAND_LINES])
def test_a_bad_command_line_or_config_is_one_line_exit_2_and_writes_nothing(
        bad_command_lines, case, expected):
    result, workdir = bad_command_lines[case]
    line = assert_one_error_line(result, 2)
    for words in expected:
        assert words in line
    assert not workdir.exists()


def test_verbose_shows_the_traceback_of_a_bad_command_line(tmp_path):
    result = command("jfacerec.train", "--config", "configs/demo.py", "--config.nonexistent=3",
                     "--workdir", str(tmp_path / "w"), "--verbose")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_help_exits_0_for_every_command_and_lists_verbose():
    runs = [(module, "--help") for module in COMMANDS] + [
        ("jfacerec.train", "--helpshort"), ("jfacerec.data.pack", "--helpfull")]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda args: command(*args), runs))
    for args, result in zip(runs, results):
        assert result.returncode == 0, (args, result.stderr)
        assert "--[no]verbose" in result.stdout, args


def test_a_command_used_without_its_arguments_is_one_line_exit_2():
    with ThreadPoolExecutor(2) as pool:
        gallery, pack = pool.map(lambda args: command(*args),
                                 [("jfacerec.gallery", "enroll"), ("jfacerec.data.pack",)])
    assert "--workdir, --images, --out" in assert_one_error_line(gallery, 2)
    assert "SRC DST" in assert_one_error_line(pack, 2)


def test_validate_config_names_the_first_key_that_is_not_a_positive_integer():
    config = ml_collections.ConfigDict(dict(total_steps=10, batch_size=8, image_size=16))
    cli.validate_config(config)  # keys it lacks (keep_checkpoints...) are not required
    for key, value in [("total_steps", 0), ("batch_size", -1), ("image_size", 1.5),
                       ("image_size", True)]:
        bad = ml_collections.ConfigDict({**config.to_dict(), key: value})
        with pytest.raises(ValueError, match=f"--config.{key}=.*positive integer"):
            cli.validate_config(bad)


# -- Writing errors -------------------------------------------------------------------------------

def exit_line(capsys, error: Exception, output: str | None = None) -> str:
    """The line exit_on_user_error prints for `error`, once it exited with status 1."""
    with pytest.raises(SystemExit) as exited:
        with cli.exit_on_user_error(output=output):
            raise error
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


@pytest.mark.parametrize("code, fix", [(errno.ENOSPC, "free some space"),
                                       (errno.EDQUOT, "free some space"),
                                       (errno.EROFS, "write elsewhere"),
                                       (errno.EACCES, "change its permissions")])
def test_a_full_read_only_or_forbidden_disk_is_one_line_naming_the_path_and_the_fix(
        capsys, code, fix):
    line = exit_line(capsys, OSError(code, os.strerror(code), "/results/out.csv"))
    assert "/results/out.csv" in line and fix in line


def test_a_writing_error_without_a_file_name_names_the_commands_output(capsys):
    line = exit_line(capsys, OSError(errno.ENOSPC, "No space left on device"), output="/w")
    assert "/w" in line and "no space left" in line


def test_tensorstores_full_disk_value_error_is_one_line_naming_its_file(capsys):
    error = ValueError('RESOURCE_EXHAUSTED: Error writing local file "/w/checkpoints/20/x": '
                       "Failed to write 24513 bytes: No space left on device "
                       "[os_error_code='28']")
    line = exit_line(capsys, error, output="/w")
    assert "no space left on the device of /w/checkpoints/20/x" in line


def test_another_os_error_keeps_its_traceback():
    with pytest.raises(OSError, match="Input/output"):
        with cli.exit_on_user_error():
            raise OSError(errno.EIO, "Input/output error", "/dev/sdz")


@pytest.fixture
def small_disk(tmp_path):
    """A mount point for a tmpfs of the size given (skips where mounting is not allowed)."""
    mounted = []

    def mount(size_bytes: int):
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs",
                                 str(point)], capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=True)


def test_a_full_disk_while_writing_keeps_the_old_file_and_is_one_line_naming_it(
        small_disk, capsys):
    disk = small_disk(256 * 1024)
    path = disk / "gallery.npz"
    path.write_bytes(b"old")
    with pytest.raises(OSError) as raised:
        with atomic_open(str(path), "wb") as f:
            f.write(os.urandom(512 * 1024))
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
    assert path.read_bytes() == b"old" and os.listdir(disk) == ["gallery.npz"]
    line = exit_line(capsys, raised.value)
    assert str(path) in line and "no space left" in line


# -- Atomic writes --------------------------------------------------------------------------------

def test_atomic_open_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    path = tmp_path / "classification.csv"
    for mode in (0o644, 0o640, 0o664):
        path.write_text("old\n")
        path.chmod(mode)
        with atomic_open(str(path)) as f:
            f.write("new\n")
        assert (path.stat().st_mode & 0o7777, path.read_text()) == (mode, "new\n")


def test_atomic_open_gives_a_new_file_the_mode_open_would(tmp_path):
    for umask in (0o022, 0o027, 0o002):
        previous = os.umask(umask)
        try:
            with atomic_open(str(tmp_path / f"new_{umask:o}.csv")) as f:
                f.write("x\n")
            with open(tmp_path / f"plain_{umask:o}.csv", "w") as f:
                f.write("x\n")
        finally:
            os.umask(previous)
        assert ((tmp_path / f"new_{umask:o}.csv").stat().st_mode & 0o777
                == (tmp_path / f"plain_{umask:o}.csv").stat().st_mode & 0o777
                == 0o666 & ~umask)


def test_atomic_open_leaves_the_old_file_and_no_temporary_file_when_writing_fails(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(str(path)) as f:
            f.write("half of the new")
            raise KeyboardInterrupt
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["report.json"]


def test_atomic_open_leaves_the_old_file_and_no_temporary_file_when_the_rename_fails(
        tmp_path, monkeypatch):
    path = tmp_path / "matches.csv"
    path.write_text("old\n")

    def failing_replace(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="cross-device") as raised:
        with atomic_open(str(path)) as f:
            f.write("new\n")
    assert raised.value.filename == str(path)
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["matches.csv"]


def test_atomic_open_over_a_folder_fails_and_leaves_no_temporary_file(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError):
        with atomic_open(str(tmp_path / "out")) as f:
            f.write("x")
    assert os.listdir(tmp_path) == ["out"]


# -- Images ---------------------------------------------------------------------------------------

def write_bomb(path) -> None:
    """A 14000 x 14000 PNG (over twice Pillow's decompression-bomb limit) of a few kilobytes."""
    Image.new("1", (14000, 14000)).save(path)


def test_an_image_over_the_decompression_bomb_limit_is_skipped_like_an_unreadable_file(
        tmp_path):
    root = make_tree(tmp_path / "faces", identities=2, per_identity=2)
    bomb = root / "person_0" / "bomb.png"
    write_bomb(bomb)
    assert bomb.stat().st_size < 100_000
    with pytest.warns(SkippedImageWarning, match="bomb.png"):
        files = scan_identity_folders(str(root))
    assert files.skipped == (str(bomb),) and len(files) == 4
    with pytest.raises(images.ImageDecodeError, match="bomb.png.*DecompressionBomb"):
        scan_identity_folders(str(root), strict=True)


@pytest.mark.parametrize("image, says", [
    (np.zeros((0, 0, 3), np.uint8), "no pixels"),
    (np.zeros((0, 5), np.float32), "no pixels"),
    (Image.new("RGB", (0, 0)), "no pixels"),
    (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
    (np.full((8, 8), np.inf), "NaN or infinite"),
])
def test_an_image_without_pixels_or_with_nan_is_refused(image, says):
    with pytest.raises(ValueError, match=says):
        images.as_rgb_array(image)


# -- Models, embeddings and galleries -------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir with a 10-step tiny model (checkpoint at step 10)."""
    from jfacerec.training import train

    workdir = tmp_path_factory.mktemp("model") / "workdir"
    train(tiny_config(total_steps=10, checkpoint_every_steps=10), str(workdir))
    return workdir


def test_embed_refuses_an_empty_or_nan_image_naming_its_index(trained):
    model = jfacerec.load(str(trained))
    face = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="image 1 of 2: the image has no pixels"):
        model.embed([face, np.zeros((0, 0, 3), np.uint8)])
    with pytest.raises(ValueError, match="image 0 of 1: .*NaN"):
        model.embed(np.full((1, 16, 16, 3), np.nan, np.float32))
    assert model.embed([face]).shape == (1, model.embedding_dim)


def saved_gallery(path, **fields) -> str:
    """A valid gallery file at `path` (2 identities, dim 4), its arrays replaced by `fields`."""
    embeddings = np.eye(2, 4, dtype=np.float32)
    Gallery(np.array(["a", "b"]), embeddings, "f" * 16, "resnet_tiny", "mean").save(str(path))
    if fields:
        with np.load(path, allow_pickle=False) as z:
            data = {**{k: z[k] for k in z.files}, **fields}
        np.savez(path, **data)
    return str(path)


@pytest.mark.parametrize("damage, says", [
    ("truncated", "truncated"),
    ("text", "not a gallery file"),
    ("empty file", "not a gallery file"),
    ("zip of other things", "missing"),
    ("no rows", "empty"),
    ("nan", "finite"),
    ("inf", "finite"),
    ("version text", "format_version is a <U3 array"),
    ("version float", "format_version is a float64"),
    ("version list", "format_version is a int64 array of shape \\(2,\\)"),
    ("version 3", "reads versions 1 and 2"),
    ("whitening missing", "without its whitening"),
    ("whitening of another size", "do not fit 4-dimensional"),
    ("whitening nan", "whitening is not all finite"),
])
def test_a_damaged_gallery_file_is_refused_with_one_line_saying_enroll_again(
        tmp_path, damage, says):
    path = tmp_path / "gallery.npz"
    if damage == "truncated":
        whole = open(saved_gallery(path), "rb").read()
        path.write_bytes(whole[:len(whole) // 2])
    elif damage == "text":
        path.write_text("id,label\n")
    elif damage == "empty file":
        path.write_bytes(b"")
    elif damage == "zip of other things":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "hello")
    else:
        fields = {"no rows": dict(names=np.array([], str), embeddings=np.zeros((0, 4), np.float32)),
                  "nan": dict(embeddings=np.full((2, 4), np.nan, np.float32)),
                  "inf": dict(embeddings=np.array([[np.inf, 0, 0, 0], [0, 1, 0, 0]], np.float32)),
                  "version text": dict(format_version=np.str_("one")),
                  "version float": dict(format_version=np.float64(1.0)),
                  "version list": dict(format_version=np.array([1, 1])),
                  "version 3": dict(format_version=np.int64(3)),
                  "whitening missing": dict(format_version=np.int64(2)),
                  "whitening of another size": dict(format_version=np.int64(2),
                                                    wccn_mean=np.zeros(3),
                                                    wccn_transform=np.eye(3)),
                  "whitening nan": dict(format_version=np.int64(2), wccn_mean=np.zeros(4),
                                        wccn_transform=np.full((4, 4), np.nan))}[damage]
        saved_gallery(path, **fields)
    with pytest.raises(ValueError, match=says) as raised:
        Gallery.load(str(path))
    message = str(raised.value)
    assert "\n" not in message and "pickle" not in message and "enroll" in message


def test_identify_with_a_truncated_gallery_is_one_line_exit_1(tmp_path):
    whole = open(saved_gallery(tmp_path / "whole.npz"), "rb").read()
    (tmp_path / "gallery.npz").write_bytes(whole[:-100])
    result = command("jfacerec.gallery", "identify", "--gallery", str(tmp_path / "gallery.npz"),
                     "--images", str(tmp_path), "--out", str(tmp_path / "matches.csv"))
    assert "enroll again" in assert_one_error_line(result, 1)
    assert not (tmp_path / "matches.csv").exists()


def test_predict_on_a_folder_without_the_hw2p2_layout_names_the_missing_folders(tmp_path):
    make_tree(tmp_path / "faces", identities=2, per_identity=1)
    result = command("jfacerec.predict", "--workdir", str(tmp_path / "no_model"), "--data",
                     str(tmp_path / "faces"), "--out", str(tmp_path / "out"))
    line = assert_one_error_line(result, 1)
    assert "classification/test/" in line and "verification/known/" in line
    assert not (tmp_path / "out").exists()


def test_the_hw2p2_check_names_what_verification_needs_besides_known(tmp_path):
    (tmp_path / "verification" / "known" / "a").mkdir(parents=True)
    (tmp_path / "verification" / "unknown_dev").mkdir()
    with pytest.raises(FileNotFoundError, match="dev_identities.csv, verification/unknown_test"):
        check_layout(Hw2p2Layout(str(tmp_path)), "test")
    (tmp_path / "verification" / "unknown_test").mkdir()
    (tmp_path / "verification" / "dev_identities.csv").write_text("id,label\n")
    check_layout(Hw2p2Layout(str(tmp_path)), "test")


RESUME_CONFIG = """import json

import ml_collections


def get_config():  # the config the workdir was trained with, 10 steps longer
    with open({path!r}) as f:
        c = ml_collections.ConfigDict(json.load(f))
    c.total_steps = 20
    return c
"""


def test_training_on_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(
        trained, small_disk, tmp_path):
    from jfacerec.core.checkpoint import Checkpointer

    used = sum(f.stat().st_size for f in trained.rglob("*") if f.is_file())
    disk = small_disk(int(used * 1.5) // 4096 * 4096)  # the workdir fits, a second checkpoint not
    workdir = disk / "workdir"
    shutil.copytree(trained, workdir)
    config = tmp_path / "resume.py"
    config.write_text(RESUME_CONFIG.format(path=str(trained / "config.json")))
    result = command("jfacerec.train", "--config", str(config), "--workdir", str(workdir))
    line = assert_one_error_line(result, 1)
    assert str(workdir) in line and "no space left" in line
    checkpointer = Checkpointer(str(workdir))
    assert checkpointer.latest_step() == 10 and checkpointer.meta(10)["step"] == 10
