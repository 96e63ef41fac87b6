"""The configs: one base with every default, one argument form, loadable by path from any working
directory, and every dataset source selectable from the command line."""

import ast
import json
import os
import re
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from conftest import REPO, make_tree
from jfacerec.core import config_base
from jfacerec.data import sources

CONFIG_DIR = os.path.join(REPO, "configs")
DEMO_IDENTITIES, DEMO_IMAGES = 800, 20
CONFIGS = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f != "__init__.py")


def parse_flags(*argv):
    """The config that `--config ...` flags give a command (absl's own parsing)."""
    argv = ["command", *argv]
    values = flags.FlagValues()
    # The --config.KEY overrides are found in argv when the flag is defined.
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    values(argv)
    return values.config


def tokens_of(name):
    """The tokens a config's argument takes, as its error for an unknown one lists them."""
    with pytest.raises(ValueError) as error:
        config_base.load(f"{CONFIG_DIR}/{name}:no_such_variant")
    return re.search(r"choose from (.*)$", str(error.value)).group(1).split(", ")


# Run in a subprocess whose working directory is not the repository root, so that nothing but the
# installed jfacerec is importable: each spec is parsed by absl's --config flag.
LOAD_EVERYWHERE = r"""
import importlib.util, json, sys
from absl import flags
from ml_collections import config_flags

assert importlib.util.find_spec("configs") is None, "configs/ must not be importable here"
results = {}
for spec in json.loads(sys.argv[1]):
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values)
    try:
        values(["command", "--config", spec])
        results[spec] = {"total_steps": values.config.total_steps,
                         "dataset": values.config.dataset.name}
    except Exception as e:  # reported, with its spec, by the test
        results[spec] = {"error": f"{type(e).__name__}: {e}"}
print(json.dumps(results))
"""


def test_every_config_loads_from_another_directory_with_no_arg_runlocal_and_each_choice(tmp_path):
    specs, full_and_small = [], []
    for name in CONFIGS:
        path = os.path.join(CONFIG_DIR, name)
        specs += [path, f"{path}:runlocal"]
        full_and_small.append((path, f"{path}:runlocal"))
        for token in tokens_of(name):
            if token != "runlocal":
                specs += [f"{path}:{token}", f"{path}:{token},runlocal"]
                full_and_small.append((f"{path}:{token}", f"{path}:{token},runlocal"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", LOAD_EVERYWHERE, json.dumps(specs)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    failed = {spec: r["error"] for spec, r in results.items() if "error" in r}
    assert not failed, "\n".join(f"{spec}: {error[-500:]}" for spec, error in failed.items())
    assert len(results) == len(specs) > 2 * len(CONFIGS)
    for full, small in full_and_small:
        assert results[small]["total_steps"] < results[full]["total_steps"], small


def test_the_zoo_takes_a_backbone_and_runlocal_as_one_argument():
    small = config_base.load(f"{CONFIG_DIR}/zoo.py:mobilefacenet,runlocal")
    full = config_base.load(f"{CONFIG_DIR}/zoo.py:mobilefacenet")
    assert small.model.name == full.model.name == "mobilefacenet"
    assert (small.image_size, full.image_size) == (64, 112)
    assert config_base.load(f"{CONFIG_DIR}/zoo.py:runlocal").model.name == "iresnet50"
    with pytest.raises(ValueError, match="configs/zoo.py takes one of .*; got 'iresnet50' and "
                                         "'mobilefacenet'"):
        config_base.load(f"{CONFIG_DIR}/zoo.py:iresnet50,mobilefacenet")


@pytest.mark.parametrize("name", CONFIGS)
def test_an_unknown_variant_is_an_error_naming_it_and_the_choices(name):
    with pytest.raises(flags.IllegalFlagValueError, match=f"unknown variant 'runlocl' for "
                                                          f"configs/{name}; choose from "
                                                          f"(.*, )?runlocal"):
        parse_flags("--config", f"{CONFIG_DIR}/{name}:runlocl")


def test_the_demo_names_its_one_variant():
    with pytest.raises(ValueError, match=re.escape(
            "unknown variant 'runlocl' for configs/demo.py; choose from base, runlocal")):
        config_base.load(f"{CONFIG_DIR}/demo.py:runlocl")


def test_no_config_file_touches_the_module_search_path():
    for name in os.listdir(CONFIG_DIR):
        if name.endswith(".py"):
            with open(os.path.join(CONFIG_DIR, name)) as f:
                text = f.read()
            assert "sys.path" not in text and "import sys" not in text, name


def test_every_config_is_built_on_the_base_and_has_all_of_its_keys():
    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {prefix + k}
        return out

    base = keys(config_base.base_config().to_dict())
    for name in CONFIGS:
        config = config_base.load(f"{CONFIG_DIR}/{name}:runlocal")
        assert not base - keys(config.to_dict()), name


def test_the_demo_is_the_base_config_with_its_recipe():
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    base = flat(config_base.base_config().to_dict())
    demo = flat(config_base.load(f"{CONFIG_DIR}/demo.py").to_dict())
    assert demo.keys() == base.keys()
    changed = {k: demo[k] for k in demo if demo[k] != base[k]}
    assert changed == {"total_steps": 2500, "optimizer.warmup_steps": 200, "model.norm": "batch",
                       "ema.decay": 0.999, "dataset.num_identities": DEMO_IDENTITIES,
                       "dataset.train_images": DEMO_IMAGES}
    # "base" is the base config itself; the smoke test is the base's, shrunk: the tests' configs
    # build on it
    assert (config_base.load(f"{CONFIG_DIR}/demo.py:base").to_dict()
            == config_base.base_config().to_dict())
    smoke = flat(config_base.load(f"{CONFIG_DIR}/demo.py:runlocal").to_dict())
    assert {k for k in smoke if smoke[k] != base[k]} == {
        "total_steps", "log_every_steps", "checkpoint_every_steps", "batch_size",
        "model.width_multiplier", "dataset.num_identities", "dataset.train_images",
        "dataset.test_images", "dataset.num_unseen_identities", "dataset.unseen_images"}


def test_every_key_a_dataset_source_reads_is_in_the_base_config():
    base = config_base.base_config().dataset
    for name, source in sources.registered_datasets().items():
        assert set(source.keys) <= set(base.keys()), name
        assert set(source.required) <= set(source.keys), name


def test_the_demo_trains_on_a_folder_named_on_the_command_line(tmp_path):
    root = make_tree(tmp_path / "faces", identities=3, per_identity=4)
    config = parse_flags("--config", f"{CONFIG_DIR}/demo.py", "--config.dataset.name=folder",
                         f"--config.dataset.root={root}", "--config.dataset.test_images=1")
    data = sources.get_dataset(config)
    assert data.name == f"folder:{root}" and data.names == ("person_0", "person_1", "person_2")
    assert (len(data.train), len(data.test), data.unseen) == (9, 3, None)
    assert data.train[0]["image"].shape == (config.image_size, config.image_size, 3)


@pytest.mark.parametrize("name,key", [(n, k) for n, s in sources.registered_datasets().items()
                                      for k in s.required])
def test_a_source_without_its_required_key_is_a_one_line_error(name, key):
    config = parse_flags("--config", f"{CONFIG_DIR}/demo.py", f"--config.dataset.name={name}")
    with pytest.raises(ValueError) as error:
        sources.get_dataset(config)
    assert str(error.value) == f"dataset.{key} is required for dataset.name={name}"


def test_an_unknown_dataset_lists_the_registered_ones():
    config = parse_flags("--config", f"{CONFIG_DIR}/demo.py", "--config.dataset.name=imagenet")
    with pytest.raises(ValueError, match=re.escape(
            f"unknown dataset 'imagenet'; registered: {sorted(sources.registered_datasets())}")):
        sources.get_dataset(config)


def test_a_dataset_block_lacking_a_key_names_it():
    config = config_base.load(f"{CONFIG_DIR}/demo.py")
    del config.dataset["crop_fraction"]
    config.dataset.update(name="folder", root="/nowhere")
    with pytest.raises(ValueError, match=r"dataset.crop_fraction is missing \(dataset.name=folder "
                                         r"reads it\)"):
        sources.get_dataset(config)


def test_an_old_saved_config_gains_the_newer_keys_and_keeps_its_values():
    saved = config_base.load(f"{CONFIG_DIR}/lfw.py").to_dict()
    del saved["mesh"], saved["model"]["dropblock"], saved["input"]["sampler"]
    del saved["dataset"]["crop_fraction"]
    saved["dataset"]["split"] = "train"  # a value of another type than the base's is kept
    config = config_base.with_defaults(json.loads(json.dumps(saved)))
    assert config.mesh.model == 1 and config.model.dropblock == 0.0
    assert config.input.sampler == "random" and config.dataset.crop_fraction == 1.0
    assert config.dataset.split == "train" and config.dataset.name == "lfw"
    assert config.model.norm == "batch" and config.image_size == 48


def test_the_variant_parser_reads_comma_separated_tokens():
    parse = config_base.parse_arg
    assert parse(None, "configs/x.py") == config_base.Variant(None, frozenset())
    v = parse(" b , runlocal", "configs/x.py", choices=("a", "b"), default="a")
    assert v.choice == "b" and "runlocal" in v and "b" in v and "a" not in v
    assert parse("", "configs/x.py", choices=("a", "b"), default="a").choice == "a"


# Receivers of `.get("key", default)` that are not configs: flax variable collections, a
# checkpoint's tree and metadata, a gallery file's JSON, the environment, an ONNX node's
# attributes (ONNX's own defaults).
NOT_CONFIGS = {"variables", "updates", "shapes", "meta", "data", "os.environ", "attrs"}


def test_no_config_key_is_read_with_a_fallback_default_in_the_package():
    """Every default is in the base config: code reads `config.KEY`, never
    `config.get("KEY", default)` (a default written a second time, which can disagree)."""
    package = os.path.join(REPO, "jfacerec")
    found = []
    for folder, _, files in os.walk(package):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "get" and len(node.args) == 2
                        and isinstance(node.args[0], ast.Constant)
                        and isinstance(node.args[0].value, str)
                        and ast.unparse(node.func.value) not in NOT_CONFIGS):
                    found.append(f"{os.path.relpath(path, REPO)}:{node.lineno}: "
                                 f"{ast.unparse(node)}")
    assert not found, "config keys read with a default:\n" + "\n".join(found)


def test_no_config_key_shares_a_name_with_a_configdict_attribute():
    """`config.loss.center.update` would read ConfigDict.update (a method), and
    `--config.loss.center.update=param` cannot be parsed: such keys can never be used."""
    import ml_collections

    def keys(d, prefix=""):
        for key, value in d.items():
            yield prefix + key, key
            if isinstance(value, ml_collections.ConfigDict):
                yield from keys(value, f"{prefix}{key}.")

    shadowed = [path for path, key in keys(config_base.base_config())
                if hasattr(ml_collections.ConfigDict, key)]
    assert not shadowed, f"rename these config keys: {shadowed}"


@pytest.mark.parametrize("arg", ["lfw", "lfw,runlocal"])
def test_orl_lfw_fine_tunes_the_lfw_recipes_model_at_its_face_size(arg):
    """configs/orl.py:lfw starts from configs/lfw.py's workdir: the same model and face size
    (its runlocal's with runlocal), so that the checkpoint restores; dropout off."""
    orl = config_base.load(f"{CONFIG_DIR}/orl.py:{arg}")
    lfw = config_base.load(f"{CONFIG_DIR}/lfw.py" + (":runlocal" if "runlocal" in arg else ""))
    assert orl.init_from == os.path.join("workdirs", "lfw", "fold_00")
    assert orl.image_size == lfw.image_size
    assert orl.model.to_dict() == {**lfw.model.to_dict(), "dropout": 0.0}
    assert orl.model.dropout == 0.0 < lfw.model.dropout
    assert orl.optimizer.learning_rate == lfw.optimizer.learning_rate / 10
    assert orl.dataset.name == "orl" and orl.loss.name == lfw.loss.name

