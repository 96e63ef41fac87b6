"""Verification on `.bin` sets (lfw.bin, cfp_fp.bin, agedb_30.bin ...), as arcface_torch reports it.

The accuracy is insightface's (recognition/arcface_torch/eval/verification.py): embeddings of each
image and of its mirror image are summed and L2-normalised; pairs are split into `folds`
consecutive blocks (sklearn's KFold(n_splits=folds, shuffle=False): the first n % folds blocks hold
one pair more); for each block, the threshold on the squared distance between the pair's
embeddings, among 0, 0.01, ..., 3.99, that is most accurate on the other blocks (the smallest on a
tie; accept distance < threshold) is applied to the block. Reported: the mean and std of the block
accuracies, beside AUC, EER and TAR@FAR=1e-3 of the cosine scores (jfacerec.metrics).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from jfacerec import metrics
from jfacerec.core import parallel
from jfacerec.data.bin import BinSet
from jfacerec.data.pipeline import normalize
from jfacerec.inference.restore import Restored, make_features_fn, to_host

Embed = Callable[[np.ndarray], np.ndarray]  # float32 [n, h, w, 3] in [-1, 1] -> [n, dim]

METRICS = ("accuracy", "accuracy_std", "auc", "eer", "tar@far=1e-3")
# insightface's thresholds on the squared L2 distance of unit vectors (0..4).
THRESHOLDS = np.arange(0, 4, 0.01)


def kfold_blocks(n: int, folds: int) -> np.ndarray:
    """int [n]: each pair's block under KFold(n_splits=folds, shuffle=False), whose first
    n % folds blocks hold n // folds + 1 consecutive pairs and the others n // folds."""
    if not 2 <= folds <= n:
        raise ValueError(f"folds must be in [2, {n}] for {n} pairs, got {folds}")
    sizes = np.full(folds, n // folds)
    sizes[:n % folds] += 1
    return np.repeat(np.arange(folds), sizes)


def insightface_accuracy(distances: np.ndarray, issame: np.ndarray, folds: int = 10
                         ) -> tuple[float, float]:
    """(mean, std) of the block accuracies, thresholds as the module docstring says.
    distances: squared L2 [pairs]; issame: bool [pairs]."""
    block = kfold_blocks(len(distances), folds)
    # correct[t, i]: pair i is classified right at threshold t
    correct = (distances[None, :] < THRESHOLDS[:, None]) == issame[None, :]
    accuracies = []
    for b in range(folds):
        test = block == b
        best = int(np.argmax(correct[:, ~test].mean(axis=1)))
        accuracies.append(correct[best, test].mean())
    return float(np.mean(accuracies)), float(np.std(accuracies))


def embed_bin(embed: Embed, bin_set: BinSet, *, batch_size: int, flip: bool = True,
              image_size: int | None = None) -> np.ndarray:
    """Unit-norm float32 [2 * pairs, dim]: each image (resized to `image_size` when given) through
    `embed`, in batches of `batch_size` (the last one padded, so that a jitted `embed` compiles
    once); with `flip`, normalise(embed(x) + embed(mirror of x))."""
    n = len(bin_set.images)
    out = []
    with tqdm(total=n, desc=bin_set.name, unit="img", leave=False) as bar:
        for start in range(0, n, batch_size):
            images = normalize(bin_set.decoded(image_size, start, min(start + batch_size, n)))
            count = len(images)
            images = np.pad(images, ((0, batch_size - count), (0, 0), (0, 0), (0, 0)))
            e = np.asarray(embed(images), np.float32)
            if flip:
                e = e + np.asarray(embed(np.ascontiguousarray(images[:, :, ::-1])), np.float32)
            out.append(e[:count])
            bar.update(count)
    e = np.concatenate(out)
    return e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def pair_metrics(embeddings: np.ndarray, issame: np.ndarray, folds: int = 10
                 ) -> tuple[dict[str, float], np.ndarray]:
    """(the METRICS of unit-norm embeddings [2 * pairs, dim], image 2i paired with 2i + 1, and
    the pairs' cosine scores [pairs])."""
    first, second = embeddings[0::2], embeddings[1::2]
    distances = np.sum(np.square(first - second), axis=-1)
    scores = np.sum(first * second, axis=-1)
    mean, std = insightface_accuracy(distances, issame, folds)
    return {"accuracy": mean, "accuracy_std": std, "auc": metrics.roc_auc(scores, issame),
            "eer": metrics.eer(scores, issame),
            "tar@far=1e-3": metrics.tar_at_far(scores, issame, 1e-3)}, scores


def bin_metrics(embed: Embed, bin_set: BinSet, *, batch_size: int, flip: bool = True,
                folds: int = 10, image_size: int | None = None) -> dict[str, float]:
    """arcface_torch's figures of `embed` on a .bin set: the keys of METRICS. `embed` maps
    float32 [n, h, w, 3] in [-1, 1] to embeddings [n, dim] (normalised or not); pass the model's
    `image_size` when the set's images are of another size."""
    embeddings = embed_bin(embed, bin_set, batch_size=batch_size, flip=flip,
                           image_size=image_size)
    return pair_metrics(embeddings, bin_set.issame, folds)[0]


def restored_embed(restored: Restored, batch_size: int) -> tuple[Embed, int]:
    """(embed of a restored model's features, split over its mesh; the batch size it takes, a
    multiple of the mesh's devices). Unnormalised and unflipped: `bin_metrics` flips and
    normalises as arcface_torch does."""
    n_dev = restored.mesh.devices.size
    batch_size = -(-batch_size // n_dev) * n_dev
    sharding = parallel.data_sharding(restored.mesh)
    features = make_features_fn(restored.model, flip=False, normalize=False)

    def embed(images: np.ndarray) -> np.ndarray:
        # Each process puts its own rows; the features are gathered on every process.
        batch = jax.make_array_from_callback(images.shape, sharding, lambda i: images[i])
        return to_host(features(restored.variables, batch))

    return embed, batch_size


def check_names(bin_sets: Sequence[BinSet]) -> None:
    """ValueError when two sets share a name: their figures would share keys."""
    names = [s.name for s in bin_sets]
    if len(set(names)) < len(names):
        paths = [s.path for s in bin_sets]
        raise ValueError(f"two .bin files share a name ({', '.join(paths)}): their metrics would "
                         f"share keys bin/<name>/...; rename one")


def evaluate_bins(restored: Restored, bin_sets: Sequence[BinSet], *, image_size: int,
                  batch_size: int, flip: bool = True, folds: int = 10
                  ) -> tuple[dict[str, float], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A restored model on each set: ({"bin/<set>/<metric>": value}, {set: (scores, issame)}
    for a ROC plot). Images are resized to the model's `image_size`."""
    check_names(bin_sets)
    embed, batch_size = restored_embed(restored, batch_size)
    results, curves = {}, {}
    for bin_set in bin_sets:
        embeddings = embed_bin(embed, bin_set, batch_size=batch_size, flip=flip,
                               image_size=image_size)
        values, scores = pair_metrics(embeddings, bin_set.issame, folds)
        results.update({f"bin/{bin_set.name}/{k}": v for k, v in values.items()})
        curves[bin_set.name] = (scores, bin_set.issame)
    return results, curves
