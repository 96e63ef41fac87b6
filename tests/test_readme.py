"""Every command block of README.md runs, at its smallest size, in a scratch directory: a README
command that breaks fails here.

One test per block (tests/readme_commands.py parses them), its commands run in README order, so
that a command building on an earlier one (evaluate after train, identify after enroll, predict
after training on HW2P2) finds what that one wrote. Each command runs as a subprocess from the
repository root (configs are found by path) with the environment a user's shell would have (one
CPU device: conftest's 8 virtual devices are taken out of XLA_FLAGS), rewritten by a rule:

- its outputs (`--workdir`, `--out`, relative paths) go under the test's tmp_path, and the
  placeholder data of the README (`/data/...`, `known_people/`, `queries/`) become small real
  trees made here (PLACEHOLDERS);
- every `--config configs/X.py[:ARG]` gets the `runlocal` token, and trainings run SMALL's couple
  of steps (replacing the README's own values of those keys);
- a command that reads what another README block makes (the gallery block's `workdirs/demo`)
  first runs the README command that makes it, in the same scratch directory;
- success is exit code 0 and the files the command promises (RULES).

A command with no rule fails its test, naming it: add a rule, or a SKIPPED entry whose reason is
a fact. Python blocks run as scripts (cwd: the scratch directory) when PYTHON_BLOCKS has a rule
for them: a preamble that defines the names a fragment leaves to the reader, and substitutions
that shrink its sizes.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import sys
from typing import Callable

import numpy as np
import pytest
from PIL import Image

import readme_commands
from conftest import LFW, ORL, REPO, hw2p2_tree, needs_lfw, needs_orl

with open(os.path.join(REPO, "README.md"), encoding="utf-8") as _f:
    BLOCKS = readme_commands.blocks(_f.read())

# Commands not run: a regex matching the whole command (its words joined by single spaces) and
# why. An entry that matches no README command fails test_skipped_entries_match_readme_commands.
SKIPPED = {
    r"pip install .*":
        "pip install: .ci/run installs the environment (`pip install -e '.[test]'`, which "
        "includes tensorflow-datasets, torch, onnx and onnxruntime); the bench and tfds-build "
        "extras' faiss-cpu and TensorFlow are not installed in CI",
    r"python -m pytest .*tests":
        "runs the whole test suite, this file included: it is .ci/run's own command",
    r"python -m jfacerec\.models\.summary --all":
        "compiles all 13 backbones at their native input sizes: about 100 s of CPU, more than "
        "this file's whole budget; `summary --model iresnet50` (run) goes through the same "
        "summary.totals",
    r"python -c import tensorflow_datasets as tfds; tfds\.builder\('lfw', .*\)\."
    r"download_and_prepare\(\)":
        "needs TensorFlow (the tfds-build extra, not installed in CI) and downloads LFW; the "
        "training on configs/tfds_lfw.py after it reads a tiny TFDS `lfw` built here instead",
    r"python benchmarks/train_step\.py --models resnet_tiny --steps 8":
        "a timing run (our step in three variants against two torch layouts, 8 steps each after "
        "warm-up), minutes of CPU that assert nothing; tests/test_benchmarks.py runs the same "
        "script's jax side",
    r"python benchmarks/train_step\.py --quick --sides jax":
        "its default three backbones, each also timed without the CPU conv path (slow by "
        "design), took 170 s of CPU on the 2-core machine; tests/test_benchmarks.py::"
        "test_train_step_benchmark_times_our_variants_without_torch runs this command with "
        "--models resnet_tiny",
    r"python benchmarks/matcher\.py --quick":
        "times faiss (default --sides jfacerec,faiss,numpy): faiss-cpu is in the bench extra, not "
        "installed in CI; tests/test_benchmarks.py runs the jfacerec and numpy sides",
    r"python benchmarks/time_to_accuracy\.py --config configs/lfw\.py --minutes 5,10,20 .*":
        "trains the LFW recipe twice for 20 minutes each (about 45 minutes of CPU); "
        "tests/test_benchmarks.py::test_time_to_accuracy_benchmark_snapshots_both_sides_within_"
        "the_budget runs the same script on both sides at a 0.1-minute budget and 40 pairs",
    r"python benchmarks/pipeline\.py":
        "a timing run over LFW's JPEGs against a PyTorch DataLoader, 4 rounds of each, minutes "
        "of CPU that assert nothing; tests/test_benchmarks.py runs --sides grain",
}

# Trainings run this long, on faces this small (replacing the README's own values of these keys;
# 32 pixels: every backbone takes it).
SMALL = {"total_steps": "2", "checkpoint_every_steps": "2", "log_every_steps": "1",
         "image_size": "32"}

# README placeholder paths (trailing "/" ignored) -> the fixture made in their place.
PLACEHOLDERS = {
    "/data/vggface2_subset": "faces",
    "/data/vggface2/train": "faces",
    "/data/hw2p2": "hw2p2",
    "known_people": "known_people",
    "queries": "queries",
    "/data/lfw-deepfunneled": "lfw",
    "/data/pairs.txt": "lfw_view2_pairs",
    "/data/pairsDevTest.txt": "lfw_view1_pairs",
    "/data/ms1m-retinaface-t1": "recordio",
    "/data/IJB_release/IJBC": "ijbc",
    "backbone.pth": "arcface_pth",
    "w600k_r50.onnx": "arcface_onnx",
}
# The arcface_torch backbone the conversion commands read, whatever model the README names: the
# smallest one (the others convert through the same code: tests/test_convert_torch.py).
CONVERTED_MODEL = "mobilefacenet"
# README placeholder paths that commands write (absolute, so not simply under tmp_path).
OUTPUTS = {"/data/vggface2_packed": "vggface2_packed", "/data/ms1m_packed": "ms1m_packed"}
PATHLIKE = re.compile(r"/|\.(npz|csv|txt|json|jpe?g|png|pgm|npy|array_record|bin|pth|onnx)$")
DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\d+")


def no_rule(command: str, what: str) -> str:
    return (f"README command `{command}`: {what}. Add a rule to tests/test_readme.py that runs it "
            f"at its smallest size, or a SKIPPED entry whose reason is a fact.")


# ---- fixtures: small real data in place of the README's placeholders ----------------------------

def save_faces(root, identities, images, size=40):
    """root/person_<i>/<j>.jpg: synthetic faces of `identities`, pictures `images` of each."""
    from jfacerec.data.synthetic import render_faces

    for i in identities:
        os.makedirs(root / f"person_{i}", exist_ok=True)
        faces = render_faces(np.full(len(images), i), np.asarray(images), image_size=size)
        for j, face in zip(images, faces):
            Image.fromarray(face).save(root / f"person_{i}" / f"{j}.jpg")
    return root


def lfw_people(count, min_images):
    people = sorted(n for n in os.listdir(LFW) if len(os.listdir(os.path.join(LFW, n)))
                    >= min_images)
    return people[:count]


def lfw_subset(root):
    """16 LFW people with at least 4 images each, 4 images of each (copies). Every pairs file
    below names 2 of them per fold, so each fold trains on 14 identities: one compiled program."""
    import shutil

    for name in lfw_people(16, 4):
        os.makedirs(root / name)
        for i in range(1, 5):
            shutil.copy(os.path.join(LFW, name, f"{name}_{i:04d}.jpg"), root / name)
    return root


def lfw_view1_pairs(path):
    """pairsDevTest.txt's format: N, N matched pairs, N mismatched pairs (one test set); N = 5,
    so that its 10 pairs can be cross-validated in 10 folds."""
    a, b = lfw_people(16, 4)[:2]
    matched = [f"{a}\t1\t2", f"{a}\t1\t3", f"{a}\t2\t3", f"{b}\t1\t2", f"{b}\t1\t3"]
    mismatched = [f"{a}\t{i}\t{b}\t{j}" for i, j in ((1, 1), (1, 2), (2, 1), (2, 2), (3, 3))]
    path.write_text("\n".join(["5", *matched, *mismatched]) + "\n")
    return path


def lfw_view2_pairs(path):
    """pairs.txt's format: `folds N`, then per fold N matched and N mismatched pairs; 4 folds."""
    people = lfw_people(16, 4)
    lines = ["4\t1"]
    for a, b in zip(people[0:8:2], people[1:8:2]):
        lines += [f"{a}\t1\t2", f"{a}\t3\t{b}\t1"]
    path.write_text("\n".join(lines) + "\n")
    return path


def tfds_lfw(root):
    """A prepared TFDS `lfw` (its registered builder's name, version and features) of 14 synthetic
    people (as many as each LFW fold above trains on), built without TensorFlow or a download:
    the encoded images are stored as given."""
    import io

    if os.environ.get("CI"):  # CI installs tensorflow-datasets (the test extra): it must be there
        import tensorflow_datasets as tfds
    else:
        tfds = pytest.importorskip("tensorflow_datasets",
                                   reason="needs tensorflow-datasets: pip install -e '.[test]'")

    from jfacerec.data.synthetic import render_faces

    registered = tfds.builder_cls("lfw")

    class TinyLfw(registered, skip_registration=True):
        name = "lfw"

        def _split_generators(self, dl_manager):
            return {"train": self._examples()}

        def _examples(self):
            for i in range(14):
                for j, face in enumerate(render_faces(np.full(4, i), np.arange(4),
                                                      image_size=250)):
                    buffer = io.BytesIO()
                    Image.fromarray(face).save(buffer, format="JPEG")
                    yield f"person_{i}/{j}", {"label": f"person_{i}", "image": buffer.getvalue()}

    TinyLfw(data_dir=str(root), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return root


def recordio_pack(root):
    """An insightface-layout RecordIO pack of 16 synthetic people x 4 JPEG faces (the writer of
    tests/test_recordio.py, written from the format's description)."""
    from test_recordio import faces, insightface_pack, jpeg

    insightface_pack(root, *faces(16, 4), jpeg)
    return root


def ijb_release(root):
    """A tiny IJB-C release (meta/ and loose_crop/) of 4 synthetic people (tests/test_ijb.py)."""
    from test_ijb import _release

    return _release(root)


def arcface_torch_file(path, onnx=False):
    """arcface_torch's CONVERTED_MODEL with random weights, saved with torch.save (or exported to
    ONNX with BatchNorms folded): torch is a test dependency."""
    import torch
    from arcface_torch_models import get_model, randomize

    model = randomize(get_model(CONVERTED_MODEL), 0)
    if onnx:
        torch.onnx.export(model, torch.zeros(1, 3, 112, 112), str(path), opset_version=17,
                          dynamo=False, input_names=["data"], output_names=["embedding"])
    else:
        torch.save(model.state_dict(), path)
    return path


FIXTURES: dict[str, tuple[Callable, str | None]] = {  # name: (make(path), the data it needs)
    # 16 people, as many as configs/demo.py:runlocal has: the demo's compiled train step
    "faces": (lambda p: save_faces(p, range(16), range(4)), None),
    "known_people": (lambda p: save_faces(p, range(100, 103), range(2)), None),
    # the enrolled people's other images, and someone not enrolled: identity folders, so
    # `identify` also reports accuracy
    "queries": (lambda p: save_faces(p, range(100, 104), [2]), None),
    "hw2p2": (lambda p: hw2p2_tree(p)[0], "lfw"),
    "lfw": (lfw_subset, "lfw"),
    "lfw_view1_pairs": (lfw_view1_pairs, "lfw"),
    "lfw_view2_pairs": (lfw_view2_pairs, "lfw"),
    "tfds_lfw": (tfds_lfw, None),
    "orl": (lambda p: ORL, "orl"),
    "recordio": (recordio_pack, None),
    "ijbc": (ijb_release, None),
    "arcface_pth": (arcface_torch_file, None),
    "arcface_onnx": (lambda p: arcface_torch_file(p, onnx=True), None),
}
DATA_MARKS = {"lfw": needs_lfw, "orl": needs_orl}
_DRY_ROOT = pathlib.Path("/nonexistent-readme-scratch")  # dry rewrites make nothing


class Scratch:
    """A block's scratch directory: where its commands' outputs go and fixtures are made. With
    dry=True nothing is made; `needs` records the real data the fixtures would read."""

    def __init__(self, root, dry=False):
        self.root, self.dry, self.needs, self.made = root, dry, set(), {}

    def fixture(self, name: str) -> str:
        make, data = FIXTURES[name]
        if data:
            self.needs.add(data)
        path = self.root / "fixtures" / name
        if not self.dry and name not in self.made:
            if data == "lfw" and not os.path.isdir(LFW):
                pytest.skip(f"no LFW at {LFW}")
            if data == "orl" and not os.path.isdir(ORL):
                pytest.skip(f"no ORL at {ORL}")
            os.makedirs(path.parent, exist_ok=True)
            self.made[name] = str(make(path))
        return self.made.get(name, str(path))

    def path(self, value: str, command: str) -> str:
        """The scratch path in place of a README path."""
        key = value.rstrip("/") or value
        if key in PLACEHOLDERS:
            return self.fixture(PLACEHOLDERS[key])
        if key in OUTPUTS:
            return str(self.root / OUTPUTS[key])
        if os.path.isabs(key):
            raise AssertionError(no_rule(command, f"no fixture for the path {value!r} (add it to "
                                                  f"PLACEHOLDERS or OUTPUTS)"))
        return str(self.root / key)


# ---- rules: how each README command runs ---------------------------------------------------------

@dataclasses.dataclass
class Step:
    """A command to run: argv from the repository root (or `cwd`), extra environment, the files
    it must leave (`expect`), and the README paths it reads and writes (for prerequisites)."""

    argv: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    expect: list[str] = dataclasses.field(default_factory=list)
    reads: list[str] = dataclasses.field(default_factory=list)
    writes: list[str] = dataclasses.field(default_factory=list)
    cwd: str = REPO
    stdout: str | None = None  # a text the output must contain


def runlocal(value: str) -> str:
    """configs/X.py[:ARG] with the runlocal token."""
    path, colon, arg = value.partition(":")
    tokens = [t for t in arg.split(",") if t] if colon else []
    return f"{path}:{','.join(tokens + ['runlocal'] if 'runlocal' not in tokens else tokens)}"


def rewrite(args, command, scratch, *, path_flags=(), small=False, positional_paths=0):
    """args with paths mapped (values of `path_flags`, `--config.dataset.*` paths and the first
    `positional_paths` bare words), --config given runlocal and, with small, SMALL's overrides.
    Returns (args, {flag or position: (README value, scratch value)})."""
    out, seen, positional, i = [], {}, 0, 0
    dataset_paths = {f"config.dataset.{k}" for k in ("root", "unseen_root", "pairs", "data_dir",
                                                     "landmarks")} | {"config.init_from"}
    while i < len(args):
        word = args[i]
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            takes = name in path_flags or name == "config" or name in dataset_paths
            if not eq and takes:
                if i + 1 >= len(args):
                    raise AssertionError(no_rule(command, f"--{name} has no value"))
                value, i = args[i + 1], i + 1
            i += 1
            if name == "config":
                out += ["--config", runlocal(value)]
            elif small and name.startswith("config.") and name[7:] in SMALL:
                continue  # ours instead
            elif takes:
                seen[name] = (value, scratch.path(value, command))
                out.append(f"--{name}={seen[name][1]}")
            elif eq and PATHLIKE.search(value):
                raise AssertionError(no_rule(command, f"--{name}={value} looks like a path"))
            else:
                out.append(word)
            continue
        i += 1
        if positional < positional_paths:
            seen[positional] = (word, scratch.path(word, command))
            out.append(seen[positional][1])
            positional += 1
        elif PATHLIKE.search(word):
            raise AssertionError(no_rule(command, f"the argument {word!r} looks like a path"))
        else:
            out.append(word)
    if small:
        out += [f"--config.{k}={v}" for k, v in SMALL.items()]
    return out, seen


def python_m(module, args):
    return [sys.executable, "-m", module, *args]


def given(seen, flag, command):
    """The (README, scratch) values of a flag the rule needs."""
    if flag not in seen:
        what = f"--{flag}" if isinstance(flag, str) else f"argument {flag + 1}"
        raise AssertionError(no_rule(command, f"it has no {what}, which its rule reads"))
    return seen[flag]


def rule_train(args, command, scratch):
    args, seen = rewrite(args, command, scratch, path_flags=("workdir",), small=True)
    config = args[args.index("--config") + 1] if "--config" in args else ""
    if config.startswith("configs/tfds_lfw.py") and "config.dataset.data_dir" not in seen:
        args.append(f"--config.dataset.data_dir={scratch.fixture('tfds_lfw')}")
    workdir = given(seen, "workdir", command)
    validated = any(a.startswith("--config.eval.every_steps=") for a in args)
    return Step(python_m("jfacerec.train", args), writes=[workdir[0]],
                reads=[seen["config.init_from"][0]] if "config.init_from" in seen else [],
                expect=[os.path.join(workdir[1], "config.json"),
                        os.path.join(workdir[1], "metrics.jsonl"),
                        os.path.join(workdir[1], "checkpoints")]
                + [os.path.join(workdir[1], "validation.png")] * validated)


def rule_evaluate(args, command, scratch):
    args, seen = rewrite(args, command, scratch, path_flags=("workdir", "bin"), small=True)
    workdir = given(seen, "workdir", command)
    bins = seen["bin"][0].split(",") if "bin" in seen else []
    if len(bins) > 1:
        raise AssertionError(no_rule(command, "--bin with several files (give the rule a "
                                              "fixture for each)"))
    return Step(python_m("jfacerec.evaluate", args), reads=[workdir[0], *bins],
                writes=[f"{workdir[0]}/eval/metrics.json"],
                expect=[os.path.join(workdir[1], "eval", "metrics.json")]
                + [os.path.join(workdir[1], "eval", "roc_bin.png")] * bool(bins))


def rule_bin(args, command, scratch):
    args, seen = rewrite(args, command, scratch, path_flags=("pairs", "images", "out"))
    out = given(seen, "out", command)
    return Step(python_m("jfacerec.data.bin", args), writes=[out[0]], expect=[out[1]])


def rule_ijb(args, command, scratch):
    args, seen = rewrite(args, command, scratch, path_flags=("workdir", "root"))
    workdir = given(seen, "workdir", command)
    target = args[args.index("--target") + 1] if "--target" in args else ""
    return Step(python_m("jfacerec.evaluation.ijb", args), reads=[workdir[0]],
                expect=[os.path.join(workdir[1], "eval", f"ijb_{target.lower()}.json")])


def rule_convert(args, command, scratch):
    if not args or args[0] not in ("torch", "onnx"):
        raise AssertionError(no_rule(command, "jfacerec.convert without torch or onnx"))
    rest, seen = rewrite(args[1:], command, scratch, path_flags=("workdir",), positional_paths=1)
    if "--model" in rest:
        rest[rest.index("--model") + 1] = CONVERTED_MODEL
    workdir = given(seen, "workdir", command)
    return Step(python_m("jfacerec.convert", [args[0], *rest]), writes=[workdir[0]],
                expect=[os.path.join(workdir[1], "config.json")])


def rule_export(args, command, scratch):
    if not args or args[0] != "onnx":
        raise AssertionError(no_rule(command, "jfacerec.export without onnx"))
    rest, seen = rewrite(args[1:], command, scratch, path_flags=("workdir", "out"))
    out = given(seen, "out", command)
    return Step(python_m("jfacerec.export", ["onnx", *rest]),
                reads=[given(seen, "workdir", command)[0]], writes=[out[0]], expect=[out[1]])


def rule_summary(args, command, scratch):
    args, _ = rewrite(args, command, scratch)
    return Step(python_m("jfacerec.models.summary", args), stdout="parameters")


def rule_pack(args, command, scratch):
    args, seen = rewrite(args, command, scratch, positional_paths=2)  # --from-recordio: a flag
    destination = given(seen, 1, command)
    return Step(python_m("jfacerec.data.pack", args), writes=[destination[0]],
                expect=[os.path.join(destination[1], "index.json")])


def rule_lfw(args, command, scratch):
    args, seen = rewrite(args, command, scratch, path_flags=("workdir", "data", "pairs"),
                         small=True)
    if "data" not in seen:  # the config's own LFW: all of it, decoded once, is minutes
        args.append(f"--data={scratch.fixture('lfw')}")
    if "pairs" not in seen:  # the config's own View 1 (pairsDevTest.txt)
        args.append(f"--pairs={scratch.fixture('lfw_view1_pairs')}")
    return Step(python_m("jfacerec.evaluation.lfw", args),
                expect=[os.path.join(given(seen, "workdir", command)[1], "lfw_results.json")])


def rule_orl(args, command, scratch):
    args, seen = rewrite(args, command, scratch, path_flags=("workdir",), small=True)
    scratch.fixture("orl")  # the config reads AT&T/ORL from JFACEREC_DATA (400 small images)
    if not any(a.startswith("--splits") for a in args):
        args.append("--splits=1")
    return Step(python_m("jfacerec.evaluation.orl", args),
                expect=[os.path.join(given(seen, "workdir", command)[1], "orl_results.json")])


def rule_predict(args, command, scratch):
    args, seen = rewrite(args, command, scratch, path_flags=("workdir", "data", "out"))
    out = given(seen, "out", command)[1]
    return Step(python_m("jfacerec.predict", args), reads=[given(seen, "workdir", command)[0]],
                expect=[os.path.join(out, f) for f in ("classification.csv", "verification.csv",
                                                       "report.json")])


def rule_gallery(args, command, scratch):
    if not args or args[0] not in ("enroll", "identify"):
        raise AssertionError(no_rule(command, "jfacerec.gallery without enroll or identify"))
    rest, seen = rewrite(args[1:], command, scratch,
                         path_flags=("workdir", "images", "out", "gallery"))
    reads = [seen[k][0] for k in ("workdir", "gallery") if k in seen]
    out = given(seen, "out", command)
    return Step(python_m("jfacerec.gallery", [args[0], *rest]), reads=reads, writes=[out[0]],
                expect=[out[1]])


RULES = {
    "jfacerec.train": rule_train,
    "jfacerec.evaluate": rule_evaluate,
    "jfacerec.models.summary": rule_summary,
    "jfacerec.data.pack": rule_pack,
    "jfacerec.evaluation.lfw": rule_lfw,
    "jfacerec.evaluation.orl": rule_orl,
    "jfacerec.predict": rule_predict,
    "jfacerec.gallery": rule_gallery,
    "jfacerec.data.bin": rule_bin,
    "jfacerec.evaluation.ijb": rule_ijb,
    "jfacerec.convert": rule_convert,
    "jfacerec.export": rule_export,
}


def skip_reason(command: readme_commands.Command) -> str | None:
    for pattern, reason in SKIPPED.items():
        if re.fullmatch(pattern, command.text):
            return reason
    return None


def step(command: readme_commands.Command, scratch: Scratch) -> Step | None:
    """The command rewritten by its rule; None when SKIPPED; AssertionError without a rule."""
    if skip_reason(command):
        return None
    argv = list(command.argv)
    if argv[0] in ("python", "python3") and len(argv) > 2 and argv[1] == "-m":
        rule = RULES.get(argv[2])
        if rule is None:
            raise AssertionError(no_rule(command.text, f"no rule for the module {argv[2]}"))
        result = rule(argv[3:], command.text, scratch)
    else:
        raise AssertionError(no_rule(command.text, f"no rule for `{' '.join(argv[:2])}`"))
    result.env.update(dict(command.env))
    return result


# ---- python blocks -------------------------------------------------------------------------------

@dataclasses.dataclass
class PythonRule:
    preamble: str = ""  # defines the names the block leaves to the reader
    substitutions: dict[str, str] = dataclasses.field(default_factory=dict)  # shrink sizes
    reads: list[str] = dataclasses.field(default_factory=list)  # README paths made first
    files: Callable | None = None  # files(scratch root): the block's own inputs


def api_inputs(root):
    """a.jpg and b.jpg: two pictures of one synthetic person; q.jpg: a copy of a.jpg."""
    from jfacerec.data.synthetic import render_faces

    a, b = render_faces(np.array([100, 100]), np.array([3, 4]), image_size=64)
    for name, face in (("a.jpg", a), ("b.jpg", b), ("q.jpg", a)):
        Image.fromarray(face).save(root / name)


def wccn_inputs(root):
    """api_inputs, and two pictures each of two other synthetic people to fit WCCN on."""
    from jfacerec.data.synthetic import render_faces

    api_inputs(root)
    faces = render_faces(np.array([7, 7, 8, 8]), np.array([0, 1, 0, 1]), image_size=64)
    for name, face in zip(("ann_1", "ann_2", "bob_1", "bob_2"), faces):
        Image.fromarray(face).save(root / f"{name}.jpg")


# A text the block contains -> its rule, or the reason it is skipped. Each python block must
# match exactly one entry.
PYTHON_BLOCKS: dict[str, PythonRule | str] = {
    "render_faces([0, 0, 1], [0, 1, 0], image_size=64)": PythonRule(),
    "losses.arcface_loss(embeddings, class_weights, labels": PythonRule(preamble=(
        "import numpy as np\n"
        "rng = np.random.default_rng(0)\n"
        "embeddings = rng.standard_normal((8, 16)).astype(np.float32)\n"
        "class_weights = rng.standard_normal((16, 4)).astype(np.float32)\n"
        "labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])\n")),
    'model = jfacerec.load("workdirs/demo")': PythonRule(
        preamble=("import numpy as np\nfrom PIL import Image\n"
                  "pil_image = Image.open('a.jpg')\narray = np.asarray(Image.open('b.jpg'))\n"),
        reads=["workdirs/demo/eval/metrics.json", "gallery.npz"], files=api_inputs),
    "wccn.fit(recognizer.embed(known)": PythonRule(reads=["workdirs/demo/eval/metrics.json"],
                                                   files=wccn_inputs),
    "metrics.roc_auc(pair_scores, same)": PythonRule(preamble=(
        "import numpy as np\n"
        "rng = np.random.default_rng(0)\n"
        "queries = rng.standard_normal((4, 16)).astype(np.float32)\n"
        "gallery = rng.standard_normal((20, 16)).astype(np.float32)\n"
        "pair_scores = rng.uniform(-1, 1, 40).astype(np.float32)\n"
        "same = np.arange(40) % 2 == 0\n")),
    "jfacerec.align(picture, kps)": PythonRule(),
    "shard_gallery(gallery, make_mesh())": PythonRule(
        substitutions={"standard_normal((100_000, 512)": "standard_normal((1_000, 512)"}),
}


def python_rule(block: readme_commands.Block) -> PythonRule | str:
    keys = [k for k in PYTHON_BLOCKS if k in block.code]
    if len(keys) != 1:
        raise AssertionError(
            f"README python block at line {block.line} matches {len(keys)} entries of "
            f"PYTHON_BLOCKS ({keys}): give it exactly one rule (or skip reason) in "
            f"tests/test_readme.py")
    return PYTHON_BLOCKS[keys[0]]


# ---- running -------------------------------------------------------------------------------------

def environment(extra: dict[str, str]) -> dict[str, str]:
    """A user's environment: conftest's 8 virtual CPU devices taken out (one device, as a shell
    has), the compilation cache kept; then the command's own assignments."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def run_step(s: Step, label: str):
    done = subprocess.run(s.argv, cwd=s.cwd, env=environment(s.env), capture_output=True,
                          text=True, timeout=600)
    where = f"{label}\n  ran: {' '.join(s.argv)}" + (f"\n  env: {s.env}" if s.env else "")
    assert done.returncode == 0, (f"{where}\nexit code {done.returncode}; stderr:\n"
                                  f"{done.stderr[-4000:]}")
    missing = [p for p in s.expect if not os.path.exists(p)]
    assert not missing, f"{where}\nexited 0 but did not write {missing}"
    if s.stdout is not None:
        assert s.stdout in done.stdout, f"{where}\nno {s.stdout!r} in its output:\n{done.stdout}"


def producer(readme_path: str) -> readme_commands.Command:
    """The first README command that writes readme_path (a workdir, or a file like gallery.npz)."""
    for block in BLOCKS:
        for command in block.commands:
            try:
                s = step(command, Scratch(_DRY_ROOT, dry=True))
            except AssertionError:
                continue
            if s is not None and readme_path in s.writes:
                return command
    raise AssertionError(f"the README reads {readme_path!r} but no README command writes it")


def run_with_prerequisites(s: Step, scratch: Scratch, label: str):
    for readme_path in s.reads:
        if not os.path.exists(scratch.path(readme_path, label)):
            command = producer(readme_path)
            before = step(command, scratch)
            run_with_prerequisites(
                before, scratch, f"{label}\n  (its prerequisite {readme_path!r}, made by the "
                                 f"README command `{command.text}`)")
    run_step(s, label)


def block_marks(block: readme_commands.Block):
    """needs_lfw / needs_orl for a block whose fixtures read real faces (a dry rewrite)."""
    scratch = Scratch(_DRY_ROOT, dry=True)
    try:
        if block.lang == "bash":
            for command in block.commands:
                step(command, scratch)
    except AssertionError:
        return []  # the test itself reports it
    return [DATA_MARKS[d] for d in sorted(scratch.needs)]


@pytest.mark.slow
@pytest.mark.parametrize("block", [pytest.param(b, id=b.id, marks=block_marks(b))
                                   for b in BLOCKS])
def test_readme_block(block, tmp_path):
    scratch = Scratch(tmp_path)
    if block.lang == "python":
        rule = python_rule(block)
        if isinstance(rule, str):
            pytest.skip(rule)
        code = block.code
        for old, new in rule.substitutions.items():
            assert old in code, (f"README python block at line {block.line}: no {old!r} to "
                                 f"shrink any more; update its rule in tests/test_readme.py")
            code = code.replace(old, new)
        if rule.files:
            rule.files(tmp_path)
        script = tmp_path / f"readme_block_{block.index:02d}.py"
        script.write_text(rule.preamble + code)
        s = Step([sys.executable, str(script)], reads=rule.reads, cwd=str(tmp_path))
        run_with_prerequisites(s, scratch, f"README python block at line {block.line}")
        return
    ran = 0
    for command in block.commands:
        s = step(command, scratch)
        if s is None:
            continue
        run_with_prerequisites(s, scratch, f"README block at line {block.line}: `{command.text}`")
        ran += 1
    if not ran:
        pytest.skip("; ".join(f"`{c.text}`: {skip_reason(c)}" for c in block.commands))


def test_every_readme_command_has_a_rule(tmp_path):
    """Without running anything (so also where the data the blocks need is absent)."""
    problems = []
    for block in BLOCKS:
        try:
            if block.lang == "python":
                python_rule(block)
            for command in block.commands:
                step(command, Scratch(tmp_path, dry=True))
        except AssertionError as e:
            problems.append(str(e))
    assert not problems, "\n".join(problems)


def test_skipped_entries_match_readme_commands():
    commands = [c.text for b in BLOCKS for c in b.commands]
    stale = [p for p in SKIPPED if not any(re.fullmatch(p, c) for c in commands)]
    assert not stale, f"SKIPPED entries that match no README command: {stale}"
    blocks = [b.code for b in BLOCKS if b.lang == "python"]
    stale = [k for k in PYTHON_BLOCKS if not any(k in code for code in blocks)]
    assert not stale, f"PYTHON_BLOCKS entries that match no README python block: {stale}"
