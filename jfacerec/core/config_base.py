"""The base config: every key a config has, each with its one default; and what config files share.

Config files (`configs/NAME.py`, loaded by path: `--config configs/NAME.py[:ARG]`) start from
`base_config()` and change what their recipe changes, so every key exists in every config: code
reads `config.KEY` and never `config.get("KEY", default)`, and `--config.KEY=VALUE` can set any key
on any config (`--config.dataset.name=folder --config.dataset.root=DIR` on the demo, say).

- `base_config()`: the defaults. They are the demo's values (configs/demo.py is the base plus its
  smoke-test size); the `dataset` block holds the keys of every source of the registry
  (`jfacerec.data.sources`), so changing `dataset.name` needs no key a config lacks. Keys are
  shared by name: `test_images` (held out per identity) means the same to every source that reads
  it, and switching the source keeps the config's value.
- `parse_arg(arg, __file__, ...)`: the one form of a config argument, comma-separated tokens
  (`zoo.py:mobilefacenet,runlocal`); an unknown token is a ValueError naming it and the choices.
- `sibling(__file__, "NAME")`: the config file configs/NAME.py beside this one, loaded by path the
  way absl's config_flags loads a config, so a config built on another loads from any working
  directory (nothing is put on sys.path).
- `load("configs/NAME.py[:ARG]")`: a config as `--config` gives it, for tests and scripts;
  `load_module(path)`: a config file's module (its tables, such as zoo.py's BACKBONES).
- `with_defaults(mapping)`: a saved config (a workdir's config.json, possibly older than some
  keys) over the base, so that code reading newer keys still loads old workdirs.

This module is in core (it imports nothing of jfacerec) because both the config files, run from
anywhere, and `core.workdir` need it; the configs themselves stay files in configs/.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import types
from typing import Any, Iterable, Mapping

import ml_collections

RUNLOCAL = "runlocal"


def base_config() -> ml_collections.ConfigDict:
    """Every key, with its default (the demo's values)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 128  # global, over all devices and processes
    c.total_steps = 1100
    c.log_every_steps = 50
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 2
    c.image_size = 32
    c.dtype = "float32"
    c.num_devices = 0  # 0: every device
    # Devices that split the class weights by columns (a distributed softmax, for very many
    # identities); the rest of the mesh is data parallel. 1: plain data parallelism.
    c.mesh = ml_collections.ConfigDict(dict(model=1))

    # remat: recompute the backbone blocks' activations in the backward pass instead of keeping
    # them (less memory, one more forward pass; the same parameters, losses and gradients).
    # pool: "mean" or "flatten", how the embedding head pools a backbone's feature map (backbones
    # with their own embedding layer, iresnet and mobilefacenet, ignore it).
    c.model = ml_collections.ConfigDict(dict(
        name="resnet_tiny", embedding_dim=128, norm="group", norm_groups=8, width_multiplier=1.0,
        dropout=0.0, dropblock=0.0, remat=False, pool="mean",
        embedding_norm=""))
    # loss.name is one loss or a weighted sum ("0.7*softmax + 0.3*triplet"); each loss's options
    # sit under its own name (a term's own `label_smoothing`, where a config adds one, overrides
    # loss.label_smoothing for that term).
    c.loss = ml_collections.ConfigDict(dict(
        name="softmax", label_smoothing=0.1,
        # PartialFC: the fraction of classes in each step's softmax (all positives + random
        # negatives); 1.0 uses every class.
        sample_rate=1.0,
        softmax=dict(),
        arcface=dict(scale=32.0, margin=0.5),
        cosface=dict(scale=32.0, margin=0.35),
        sphereface=dict(margin=4, lambda_base=1000.0, lambda_gamma=0.12, lambda_power=1.0,
                        lambda_min=5.0),
        combined=dict(scale=32.0, m1=1.0, m2=0.3, m3=0.2),
        triplet=dict(margin=0.2, mining="batch_all"),
        center=dict(method="rule", alpha=0.5, learning_rate=0.5)))
    c.optimizer = ml_collections.ConfigDict(dict(
        name="sgd", learning_rate=0.1, momentum=0.9, nesterov=True, b1=0.9, b2=0.999,
        weight_decay=5e-4, warmup_steps=100, schedule="cosine", grad_clip_norm=0.0,
        # the backbone's learning rate over the head's (0 freezes the backbone: a fine-tune)
        backbone_multiplier=1.0))
    # Batches per optimizer update: each update applies the mean gradient of this many batches of
    # `batch_size` (an effective batch of accumulate_steps x batch_size). Every count of steps
    # (total_steps, warmup_steps, log/checkpoint/eval every_steps) counts batches; the learning
    # rate changes once per update. 1: an update per batch.
    c.accumulate_steps = 1
    # An exponential moving average of the parameters, updated after each optimizer update with
    # the decay min(decay, (1 + n) / (10 + n)) at the n-th update (counted from 0); saved with the
    # state, and the weights that validation, evaluation and jfacerec.load use. 0: none.
    c.ema = ml_collections.ConfigDict(dict(decay=0.0))
    # Weights to start from before step 0 (a fine-tune): a workdir (its newest checkpoint),
    # "WORKDIR:STEP", or a converted model's workdir (python -m jfacerec.convert). "": none.
    c.init_from = ""
    c.dataset = dataset()
    # num_threads=0 reads in the training loop's thread, which async dispatch already overlaps
    # with the step: reading threads only contend with it for the GIL (benchmarks/README.md,
    # "Synthetic input pipeline").
    c.input = ml_collections.ConfigDict(dict(
        num_workers=0, num_threads=0, worker_threads=0, sampler="random", pk_images=4,
        # brightness, contrast, saturation: the largest relative change (0: off); erase: the
        # probability of random erasing (data.pipeline.random_erase; 0: off); rotate: the largest
        # rotation in degrees (data.pipeline.random_rotate; 0: off)
        augment=dict(flip=True, min_scale=0.8, max_aspect_change=0.1, brightness=0.0,
                     contrast=0.0, saturation=0.0, erase=0.0, rotate=0.0)))
    c.eval = ml_collections.ConfigDict(dict(
        batch_size=256, flip=True, num_pairs=3000, folds=10,
        # validation during training: every `every_steps` steps (0: never) on `sets`, comma-
        # separated `.bin` files and/or "unseen" (the dataset's unseen-identity pairs); the best
        # checkpoint by `best_metric` ("SET/METRIC"; "": the first set's accuracy) is kept too
        every_steps=0, sets="", best_metric="",
        # the LFW protocol's whitening of each fold's embeddings by the within-person covariance
        # of its training faces, shrunk by this much toward the identity (0: off; inference/wccn)
        wccn=0.0))
    # The eigenfaces baseline of the ORL protocol (jfacerec.evaluation.orl).
    c.eigenfaces = ml_collections.ConfigDict(dict(components=40))
    return c


def dataset(**keys: Any) -> ml_collections.ConfigDict:
    """The base `dataset` block (the keys of every source, with their defaults), `keys` set.

    An empty text ("") is "none": `root` is required by the sources that read files (the registry
    says which key each source requires).
    """
    d = ml_collections.ConfigDict(dict(
        name="synthetic",
        # synthetic: procedural identities
        seed=0, num_identities=100, train_images=64, test_images=6, num_unseen_identities=200,
        unseen_images=10,
        # the sources that read files: folder, arrayrecord, recordio, hw2p2, lfw, orl
        root="", unseen_root="", min_images=1,
        crop_fraction=1.0,  # the central part of each image that holds the face
        cache=True,  # keep decoded faces in memory
        check=True, strict=False,  # decode every file once when scanning; unreadable: error
        # lfw: the people of fold `fold` of the pairs file `pairs` (-1: every fold) are left out
        pairs="", fold=-1,
        # orl: the seed of the random split, the known subjects (0: all), the open-set ones;
        # validation_images > 0 holds that many of each subject's training images out and tests
        # on them instead of the split's test images (choosing settings without those)
        split=0, known_identities=0, open_set_known=30, validation_images=0,
        # folder: a CSV `path,x1,y1,...,x5,y5` of five landmarks per image to align by ("": none)
        landmarks="",
        # tfds: a prepared TFDS dataset ("" data_dir: TFDS's default)
        tfds_name="", data_dir="", tfds_split="train", tfds_unseen_split="", image_key="image",
        label_key="label"))
    d.update(keys)
    return d


def with_defaults(config: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """`config` (a saved config: a ConfigDict or the dict of a config.json) over the base: every
    key it lacks takes the base's default; its own values, whatever their type, are kept."""
    def merge(base: dict, over: Mapping) -> dict:
        out = dict(base)
        for key, value in over.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
        return out

    saved = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    return ml_collections.ConfigDict(merge(base_config().to_dict(), saved))


@dataclasses.dataclass(frozen=True)
class Variant:
    """A parsed config argument: `choice` (one of the config's choices, or its default) and the
    flag tokens given (`"runlocal" in variant`)."""

    choice: str | None
    flags: frozenset[str]

    def __contains__(self, token: str) -> bool:
        return token == self.choice or token in self.flags


def config_name(path: str) -> str:
    """configs/NAME.py of a config file's path (its folder and name), for messages."""
    path = os.path.abspath(path)
    return f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}"


def parse_arg(arg: str | None, path: str, *, choices: Iterable[str] = (),
              default: str | None = None, flags: Iterable[str] = (RUNLOCAL,)) -> Variant:
    """The comma-separated tokens of the argument `arg` of the config file `path` (`__file__`):
    at most one of `choices` (else `default`) and any of `flags`. An unknown token, or two
    choices, is a ValueError naming it and what the config accepts."""
    choices, flags = tuple(choices), tuple(flags)
    tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
    for token in tokens:
        if token not in choices and token not in flags:
            raise ValueError(f"unknown variant {token!r} for {config_name(path)}; choose from "
                             f"{', '.join(choices + flags)}")
    chosen = [t for t in tokens if t in choices]
    if len(chosen) > 1:
        raise ValueError(f"{config_name(path)} takes one of {', '.join(choices)}; got "
                         f"{' and '.join(map(repr, chosen))}")
    return Variant(chosen[0] if chosen else default, frozenset(t for t in tokens if t in flags))


def load_module(path: str) -> types.ModuleType:
    """The config file `path` as a module, loaded by path as absl's config_flags loads a config
    (under a module name of its own, nothing added to sys.modules or the search path)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such config file")
    name = "jfacerec_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sibling(path: str, name: str) -> types.ModuleType:
    """The config file NAME.py in the folder of the config file `path` (pass `__file__`), loaded
    by path: `zoo = config_base.sibling(__file__, "zoo")` then `zoo.get_config("iresnet50")`."""
    return load_module(os.path.join(os.path.dirname(os.path.abspath(path)), f"{name}.py"))


def load(spec: str) -> ml_collections.ConfigDict:
    """The config of "PATH[:ARG]", as `--config PATH[:ARG]` gives it (unlocked)."""
    path, colon, arg = spec.partition(":")
    module = load_module(path)
    return module.get_config(arg) if colon else module.get_config()
