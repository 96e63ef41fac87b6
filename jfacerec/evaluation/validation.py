"""Validation during training: the verification figures of `config.eval.sets` every
`config.eval.every_steps` steps, for `training.train(config, workdir, validate)`.

    validate = validation.from_config(config)      # None when eval.every_steps is 0
    train(config, workdir, validate)

`config.eval.sets` is comma-separated: "unseen" (the dataset's unseen identities, in pairs drawn as
the evaluator draws them: `protocols.make_pairs` with the config's seed, so every step is measured
on the same pairs), "pairs" (the pairs of the dataset's LFW pairs file `dataset.pairs`, its fold
`dataset.fold`: the pairs the LFW protocol scores, for its learning curve) and/or `.bin`
verification files (insightface's lfw.bin, cfp_fp.bin, ...). Each set gives `val/<set>/<metric>`,
`<set>` being "unseen", "pairs" or the file name without `.bin`, for the metrics accuracy (k-fold),
accuracy_std, auc, eer and tar@far=1e-3. The best checkpoint is picked
by `config.eval.best_metric` ("SET/METRIC"; "": the first set's accuracy).

Validation reads the variables and nothing else of the training: no random stream, no batch, no
update, so a run validates without changing a bit of its parameters. With several processes, each
embeds its devices' share of every batch and all get the whole result: the figures are those of
one process.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jfacerec import metrics, models
from jfacerec.core import parallel, storage
from jfacerec.data import pipeline, sources
from jfacerec.data.records import labels_of
from jfacerec.evaluation import protocols
from jfacerec.evaluation.evaluator import cosine_of_pairs, verification_metrics
from jfacerec.inference.restore import make_features_fn, to_host

UNSEEN = "unseen"
PAIRS = "pairs"
METRICS = ("accuracy", "accuracy_std", "auc", "eer", "tar@far=1e-3")
LOWER_IS_BETTER = frozenset({"accuracy_std", "eer"})

Variables = dict[str, Any]  # {"params", "batch_stats"}
Measure = Callable[[Variables], dict[str, float]]  # variables -> {metric: value} of one set


@dataclasses.dataclass
class Validation:
    """The validator that `training.train` calls (a `training.Validator`): every set's figures
    as {"val/<set>/<metric>": value}."""

    measures: dict[str, Measure]  # set name -> its measure
    best_key: str
    higher_is_better: bool

    def __call__(self, variables: Variables, step: int) -> dict[str, float]:
        del step  # every step is measured alike
        return {f"val/{name}/{metric}": float(value)
                for name, measure in self.measures.items()
                for metric, value in measure(variables).items()}


def set_name(spec: str) -> str:
    """"unseen", "pairs", or a .bin file's name without `.bin`."""
    if spec in (UNSEEN, PAIRS):
        return spec
    return spec.rstrip("/").rsplit("/", 1)[-1].removesuffix(".bin")


def set_specs(config: ml_collections.ConfigDict) -> list[str]:
    """The entries of `config.eval.sets`, checked: "unseen", "pairs" (with a `dataset.pairs`
    file) or existing `.bin` files, with distinct names. ValueError/FileNotFoundError naming the
    entry and the fix."""
    specs = [s.strip() for s in config.eval.sets.split(",") if s.strip()]
    if not specs:
        raise ValueError(f"eval.every_steps is {config.eval.every_steps} but eval.sets is empty; "
                         f"set --config.eval.sets=unseen (and/or .bin files, comma-separated)")
    for spec in specs:
        if spec == UNSEEN:
            continue
        if spec == PAIRS:
            if not config.dataset.pairs:
                raise ValueError(f"eval.sets names {PAIRS!r} but dataset.pairs is empty; give "
                                 f"--config.dataset.pairs=PAIRS_FILE (LFW's pairsDevTest.txt)")
            continue
        if not spec.endswith(".bin"):
            raise ValueError(f"eval.sets entry {spec!r} is neither 'unseen', 'pairs' nor a .bin "
                             f"file")
        if not storage.isfile(spec):
            raise FileNotFoundError(f"{spec}: no such .bin file (eval.sets)")
    names = [set_name(s) for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"eval.sets names the set(s) {twice} twice; give each set once")
    return specs


def best_metric(config: ml_collections.ConfigDict, names: list[str]) -> tuple[str, bool]:
    """(the metrics.jsonl key of `config.eval.best_metric`, whether higher is better)."""
    chosen = config.eval.best_metric or f"{names[0]}/accuracy"
    name, slash, metric = chosen.rpartition("/")
    if not slash or name not in names or metric not in METRICS:
        raise ValueError(f"eval.best_metric {chosen!r}: give SET/METRIC with SET among "
                         f"{names} and METRIC among {list(METRICS)}")
    return f"val/{chosen}", metric not in LOWER_IS_BETTER


Features = Callable[[Variables, np.ndarray], np.ndarray]


def _features_on_mesh(config: ml_collections.ConfigDict) -> tuple[Features, int]:
    """((variables, images float32 [b, h, w, 3]) -> the model's features float32 [b, d], the
    multiple of which b must be). The batch is split over the config's mesh, so that with several
    processes each computes its devices' rows, and the result is gathered on every process:
    every process gets the same figures, those of one process. Compiled once per class count
    (read from the variables' classifier)."""
    mesh = parallel.mesh_from_config(config)
    sharding = parallel.data_sharding(mesh)
    built: dict[int, Callable] = {}

    def features(variables: Variables, images: np.ndarray) -> np.ndarray:
        classes = variables["params"]["classifier"]["kernel"].shape[-1]
        if classes not in built:
            built[classes] = make_features_fn(models.from_config(config, classes), flip=False,
                                              normalize=False)
        batch = jax.make_array_from_callback(images.shape, sharding, lambda index: images[index])
        return np.asarray(to_host(built[classes](variables, batch)), np.float32)

    return features, mesh.devices.size


def _batch_size(config: ml_collections.ConfigDict, multiple: int) -> int:
    return -(-config.eval.batch_size // multiple) * multiple


def _embedder(config: ml_collections.ConfigDict, source: Any, desc: str
              ) -> Callable[[Variables], np.ndarray]:
    """variables -> the unit-norm embeddings float32 [len(source), d] of `source`'s images, in
    order (as the evaluator embeds: each image plus, with `eval.flip`, its mirror image)."""
    features, multiple = _features_on_mesh(config)
    batch_size = _batch_size(config, multiple)

    def embed(variables: Variables) -> np.ndarray:
        out = []
        with tqdm(total=len(source), desc=f"validation {desc}", unit="img", leave=False,
                  disable=jax.process_index() != 0) as bar:
            for batch in pipeline.eval_batches(source, batch_size=batch_size,
                                               image_size=config.image_size):
                n = len(batch["label"])
                images = np.pad(batch["image"], ((0, batch_size - n), (0, 0), (0, 0), (0, 0)))
                e = features(variables, images)
                if config.eval.flip:
                    e = e + features(variables, np.ascontiguousarray(images[:, :, ::-1]))
                out.append(e[:n])
                bar.update(n)
        e = np.concatenate(out)
        return e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)

    return embed


def _pair_figures(config: ml_collections.ConfigDict, embeddings: np.ndarray, first: np.ndarray,
                  second: np.ndarray, same: np.ndarray,
                  folds: int | np.ndarray | None = None) -> dict[str, float]:
    """`folds`: each pair's fold [pairs], or None for `eval.folds` contiguous folds."""
    figures = verification_metrics(cosine_of_pairs(embeddings, first, second), same,
                                   config.eval.folds if folds is None else folds)
    return {metric: figures[f"verification/{metric}"] for metric in METRICS}


def unseen_measure(config: ml_collections.ConfigDict) -> Measure:
    """The verification figures on the dataset's unseen identities (as the evaluator measures
    them: unit-norm embeddings of each image plus its mirror image, `eval.num_pairs` pairs,
    `eval.folds` folds)."""
    dataset = sources.get_dataset(config)
    if dataset.unseen is None:
        raise ValueError(f"eval.sets names {UNSEEN!r} but the dataset {config.dataset.name!r} has "
                         f"no unseen identities; give .bin files in --config.eval.sets instead")
    embed = _embedder(config, dataset.unseen, UNSEEN)
    # labels are fixed, so the pairs are drawn once, as the evaluator draws them
    pairs = protocols.make_pairs(labels_of(dataset.unseen), config.eval.num_pairs, seed=config.seed)
    return lambda variables: _pair_figures(config, embed(variables), *pairs)


def pairs_measure(config: ml_collections.ConfigDict) -> Measure:
    """The verification figures on the pairs of `dataset.pairs` (fold `dataset.fold`; every fold
    when -1): the pairs that jfacerec.evaluation.lfw scores, embedded as it embeds them, accuracy
    by `eval.folds`-fold cross-validation on folds holding both kinds (the protocol's rule for
    one fold)."""
    source, first, second, same = sources.lfw_pair_images(config.dataset, config.image_size)
    embed = _embedder(config, source, PAIRS)
    folds = metrics.stratified_folds(same, config.eval.folds)
    return lambda variables: _pair_figures(config, embed(variables), first, second, same, folds)


def bin_measure(config: ml_collections.ConfigDict, path: str) -> Measure:
    """The figures of the `.bin` set at `path`, as `evaluate --bin` gives them
    (jfacerec.evaluation.bin_sets: unnormalised features of each image and its mirror summed,
    insightface's 10-fold accuracy); images resized to the model's `image_size`."""
    from jfacerec.data.bin import read_bin  # deferred: only runs validating .bin sets need them
    from jfacerec.evaluation.bin_sets import bin_metrics

    bin_set = read_bin(path)
    features, multiple = _features_on_mesh(config)

    def measure(variables: Variables) -> dict[str, float]:
        figures = bin_metrics(lambda images: features(variables, images), bin_set,
                              batch_size=_batch_size(config, multiple), flip=config.eval.flip,
                              folds=config.eval.folds, image_size=config.image_size)
        return {metric: figures[metric] for metric in METRICS}

    return measure


def from_config(config: ml_collections.ConfigDict) -> Validation | None:
    """The validator of `config.eval`, or None when `eval.every_steps` is 0 (no validation).
    Bad sets or best metric raise here, before training starts."""
    if not config.eval.every_steps:
        return None
    if config.eval.every_steps < 0:
        raise ValueError(f"eval.every_steps is {config.eval.every_steps}: give 0 (never) or a "
                         f"positive step count")
    specs = set_specs(config)
    names = [set_name(s) for s in specs]
    key, higher = best_metric(config, names)
    build = {UNSEEN: unseen_measure, PAIRS: pairs_measure}
    measures = {set_name(s): build[s](config) if s in build else bin_measure(config, s)
                for s in specs}
    return Validation(measures, key, higher)
