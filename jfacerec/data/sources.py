"""The dataset registry used by configs: `get_dataset(config)` -> a `FaceDataset` of sources.

The sources themselves (random-access record collections) are in records.py.

Registered datasets (`config.dataset.name`): synthetic (procedural identities), folder (an
identity-folder tree, aligned by a landmarks CSV when one is given), arrayrecord (shards written
by `python -m jfacerec.data.pack`), hw2p2 (the course layout), lfw (the folder, less the
identities of a pairs file), orl (AT&T faces), and tfds
(any TensorFlow Datasets data source with an image and a label feature). Every root and file may
be local or on an object store (gs://, through jfacerec.core.storage). Each is registered with
the `dataset.*` keys it reads and the ones it requires; every key's default is in the base config
(jfacerec/core/config_base.py), so `--config.dataset.name=folder --config.dataset.root=DIR` works
on any config.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Callable

import ml_collections
import numpy as np

from jfacerec.core import storage
from jfacerec.data.align import AlignedFileSource, read_landmarks_csv
from jfacerec.data.folders import ImageFiles, scan_identity_folders, split_per_identity
from jfacerec.data.pairs import pair_images, read_lfw_pairs
from jfacerec.data.records import (UNSEEN_IDENTITY_OFFSET, ArrayRecordSource, FaceDataset,
                                   ImageFileSource, SyntheticSource)


def synthetic_dataset(config: ml_collections.ConfigDict, image_size: int) -> FaceDataset:
    """Synthetic identities: `num_identities` for training, `num_unseen_identities` for the open set.

    Each training identity has `train_images` training images and `test_images` held-out ones;
    each unseen identity has `unseen_images`.
    """
    d = config
    train_ids = np.arange(d.num_identities)
    unseen_ids = UNSEEN_IDENTITY_OFFSET + np.arange(d.num_unseen_identities)
    make = lambda ids, n, offset=0: SyntheticSource(  # noqa: E731
        ids, n, image_offset=offset, image_size=image_size, seed=d.seed)
    return FaceDataset(
        name="synthetic",
        num_classes=d.num_identities,
        train=make(train_ids, d.train_images),
        test=make(train_ids, d.test_images, d.train_images) if d.test_images else None,
        unseen=make(unseen_ids, d.unseen_images) if d.num_unseen_identities else None,
    )


def data_root() -> str:
    """Where the real-image datasets live: $JFACEREC_DATA, default ../shared/data."""
    return os.environ.get("JFACEREC_DATA", os.path.join("..", "shared", "data"))


def _decoding(d: ml_collections.ConfigDict, image_size: int) -> dict:
    return dict(size=image_size, crop_fraction=d.crop_fraction, cache=d.cache)


def _scan(d: ml_collections.ConfigDict, root: str, **kwargs) -> ImageFiles:
    return scan_identity_folders(storage.absolute(root), check=d.check, strict=d.strict, **kwargs)


def _held_out_split(d: ml_collections.ConfigDict, files: ImageFiles, image_size: int):
    """(train, test) sources of one tree: `test_images` of each identity held out for testing."""
    kept, held = split_per_identity(files.labels, d.test_images)
    make = lambda idx: ImageFileSource(files.subset(idx), **_decoding(d, image_size))  # noqa: E731
    return make(kept), (make(held) if len(held) else None)


def _folder_source(d: ml_collections.ConfigDict, image_size: int
                   ) -> Callable[[ImageFiles], ImageFileSource]:
    """ImageFiles -> their source: aligned by the `landmarks` CSV where one is given (paths in
    it relative to `root`), else cropped by `crop_fraction`."""
    if not d.landmarks:
        return lambda files: ImageFileSource(files, **_decoding(d, image_size))
    if d.crop_fraction != 1.0:
        raise ValueError(f"dataset.crop_fraction={d.crop_fraction} crops unaligned images; "
                         f"with dataset.landmarks the aligned face is the crop: leave it at 1.0")
    table = read_landmarks_csv(d.landmarks, d.root)

    def make(files: ImageFiles) -> ImageFileSource:
        landmarks, origins = table.lookup(files.paths)
        return AlignedFileSource(files, landmarks, size=image_size, cache=d.cache,
                                 origins=origins)

    return make


def folder_dataset(d: ml_collections.ConfigDict, image_size: int) -> FaceDataset:
    """`root/<identity>/<image>`: train on every identity (less `test_images` held out per
    identity for classification); verification on `unseen_root`, another tree, if given. With
    `landmarks`, every image is aligned to the ArcFace template by its five points."""
    files = _scan(d, d.root, min_images=d.min_images)
    make = _folder_source(d, image_size)
    kept, held = split_per_identity(files.labels, d.test_images)
    train, test = make(files.subset(kept)), (make(files.subset(held)) if len(held) else None)
    unseen = make(_scan(d, d.unseen_root)) if d.unseen_root else None
    return FaceDataset(f"folder:{d.root}", len(files.names), train, test, unseen, files.names)


def arrayrecord_dataset(d: ml_collections.ConfigDict, image_size: int) -> FaceDataset:
    """Shards written by `python -m jfacerec.data.pack` (`root`), like `folder` otherwise."""
    everything = ArrayRecordSource(d.root, size=image_size)
    kept, held = split_per_identity(everything.labels(), d.test_images)
    make = lambda idx: ArrayRecordSource(d.root, indices=idx, relabel=False,  # noqa: E731
                                         **_decoding(d, image_size))
    unseen = None
    if d.unseen_root:
        unseen = ArrayRecordSource(d.unseen_root, **_decoding(d, image_size))
    return FaceDataset(f"arrayrecord:{d.root}", len(everything.names), make(kept),
                       make(held) if len(held) else None, unseen, tuple(everything.names))


def read_id_label_csv(path: str) -> dict[str, str]:
    """An `id,label` CSV (HW2P2's dev_identities.csv, our submissions) -> {id: label}."""
    if not storage.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (an id,label CSV)")
    with storage.open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["id", "label"]:
        raise ValueError(f"{path}: expected a header line 'id,label'")
    return {r[0].strip(): r[1].strip() for r in rows[1:] if r}


@dataclasses.dataclass
class Hw2p2Layout:
    """The course's layout under `root`:

        classification/{train,dev}/<identity>/*.jpg, classification/test/*.jpg
        verification/known/<identity>/*.jpg, verification/unknown_{dev,test}/*.jpg
        verification/dev_identities.csv (`id,label`; n000000 for someone not in known/)
    """

    root: str

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def train(self) -> str:
        return self.path("classification", "train")

    @property
    def dev(self) -> str:
        return self.path("classification", "dev")

    @property
    def test(self) -> str:
        return self.path("classification", "test")

    @property
    def known(self) -> str:
        return self.path("verification", "known")

    def unknown(self, split: str) -> str:
        return self.path("verification", f"unknown_{split}")

    @property
    def dev_identities(self) -> str:
        return self.path("verification", "dev_identities.csv")


def hw2p2_files(d: ml_collections.ConfigDict) -> tuple[ImageFiles, ImageFiles | None]:
    """(train, dev) scans of the classification folders, dev labelled with train's indices."""
    layout = Hw2p2Layout(d.root)
    train = _scan(d, layout.train)
    if not storage.isdir(layout.dev):
        return train, None
    dev = _scan(d, layout.dev)
    position = {name: i for i, name in enumerate(train.names)}
    strangers = [n for n in dev.names if n not in position]
    if strangers:
        raise ValueError(f"{layout.dev} has identities that classification/train lacks: "
                         f"{strangers[:3]}; dev images must be of training identities")
    labels = np.array([position[dev.names[c]] for c in dev.labels], np.int32)
    return train, dataclasses.replace(dev, names=train.names, labels=labels)


def hw2p2_dataset(d: ml_collections.ConfigDict, image_size: int) -> FaceDataset:
    """Train on classification/train, classify classification/dev, verify on verification/known
    (identities other than the training ones, in the course's data)."""
    train, dev = hw2p2_files(d)
    layout = Hw2p2Layout(d.root)
    unseen = None
    if storage.isdir(layout.known):
        unseen = ImageFileSource(_scan(d, layout.known), **_decoding(d, image_size))
    make = lambda files: ImageFileSource(files, **_decoding(d, image_size))  # noqa: E731
    return FaceDataset(f"hw2p2:{d.root}", len(train.names), make(train),
                       make(dev) if dev is not None else None, unseen, train.names)


def _pairs_of_fold(path: str, fold: int) -> list:
    """The LfwPairs of a pairs file's fold (every fold when `fold` is -1)."""
    folds = read_lfw_pairs(path)
    if not -1 <= fold < len(folds):
        raise ValueError(f"{path} has {len(folds)} folds; fold {fold} does not exist")
    return [pair for pairs in (folds if fold == -1 else [folds[fold]]) for pair in pairs]


def lfw_identities_in_pairs(path: str, fold: int = -1) -> set[str]:
    """The people in a pairs file's fold (every fold when `fold` is -1)."""
    return {name for pair in _pairs_of_fold(path, fold) for name in pair.names}


def lfw_pair_images(d: ml_collections.ConfigDict, image_size: int
                    ) -> tuple[ImageFileSource, np.ndarray, np.ndarray, np.ndarray]:
    """The pairs of fold `d.fold` of the pairs file `d.pairs` (every fold when -1) under the LFW
    tree `d.root`: (their distinct images, decoded as the training images are; first and second
    int64 [pairs] indices into it; same bool [pairs])."""
    pairs = _pairs_of_fold(d.pairs, d.fold)
    unique, first, second = pair_images(pairs, storage.absolute(d.root))
    files = ImageFiles(d.root, ("pairs",), tuple(unique), np.zeros(len(unique), np.int32))
    return (ImageFileSource(files, **_decoding(d, image_size)), first, second,
            np.array([pair.same for pair in pairs]))


def lfw_dataset(d: ml_collections.ConfigDict, image_size: int) -> FaceDataset:
    """LFW for training: every identity outside fold `fold` of the pairs file `pairs` (all its
    folds when -1) with `min_images` or more images; `test_images` of each held out; the held-out
    people as the unseen set."""
    everyone = _scan(d, d.root)
    held = lfw_identities_in_pairs(d.pairs, d.fold) if d.pairs else set()
    outside = tuple(n for n in everyone.names if n not in held)
    files = everyone.select(outside, d.min_images)
    train, test = _held_out_split(d, files, image_size)
    unseen = None
    if held:
        unseen = ImageFileSource(everyone.select(tuple(held)), **_decoding(d, image_size))
    return FaceDataset("lfw", len(files.names), train, test, unseen, files.names)


def orl_dataset(d: ml_collections.ConfigDict, image_size: int) -> FaceDataset:
    """AT&T/ORL (s1..s40, 10 images each): `train_images` random images of each of the first
    `known_identities` subjects (0: all of them; in a random order drawn from `split`) train,
    their other images test; the remaining subjects are the unseen (open-set unknown) ones.
    With `validation_images`, that many of each subject's training images are the test images
    instead and the split's own test images are left out, so that settings can be chosen
    without them."""
    files = _scan(d, d.root)
    rng = np.random.default_rng(d.split)
    order = rng.permutation(len(files.names))
    known = np.sort(order[:d.known_identities or len(files.names)])
    in_known = np.isin(files.labels, known)
    known_idx = np.flatnonzero(in_known)
    per_identity = int(np.bincount(files.labels).max())
    kept, held = split_per_identity(files.labels[known_idx],
                                    per_identity - d.train_images, rng)
    if d.validation_images:
        if not 0 < d.validation_images < d.train_images:
            raise ValueError(f"dataset.validation_images={d.validation_images} must be in [1, "
                             f"train_images) (train_images={d.train_images}), or 0 for off")
        inner_kept, inner_held = split_per_identity(files.labels[known_idx[kept]],
                                                    d.validation_images, rng)
        kept, held = kept[inner_kept], kept[inner_held]
    make = lambda idx: ImageFileSource(files.subset(idx, relabel=True),  # noqa: E731
                                       **_decoding(d, image_size))
    unknown_idx = np.flatnonzero(~in_known)
    return FaceDataset("orl", len(known), make(known_idx[kept]), make(known_idx[held]),
                       make(unknown_idx) if len(unknown_idx) else None,
                       tuple(files.names[i] for i in known))


def recordio_dataset(d: ml_collections.ConfigDict, image_size: int) -> FaceDataset:
    from jfacerec.data.recordio import recordio_dataset as build

    return build(d, image_size)


def tfds_dataset(d: ml_collections.ConfigDict, image_size: int) -> FaceDataset:
    from jfacerec.data.tfds_source import tfds_dataset as build  # optional dependency

    return build(d, image_size)


@dataclasses.dataclass(frozen=True)
class Source:
    """A registered dataset: its builder, the `dataset.*` keys it reads and, of those, the ones it
    cannot do without (an empty value is an error). The keys' defaults are in the base config
    (jfacerec/core/config_base.py), whose `dataset` block holds every source's keys."""

    build: Callable[[ml_collections.ConfigDict, int], FaceDataset]
    keys: tuple[str, ...]
    required: tuple[str, ...] = ()


_PATHS = ("root", "unseen_root", "pairs", "landmarks")  # the keys naming files or folders
_DECODED = ("crop_fraction", "cache")  # every source of image files
_SCANNED = _DECODED + ("check", "strict")  # the image-folder trees

_DATASETS: dict[str, Source] = {
    "synthetic": Source(synthetic_dataset, ("seed", "num_identities", "train_images",
                                            "test_images", "num_unseen_identities",
                                            "unseen_images")),
    "folder": Source(folder_dataset, ("root", "min_images", "test_images", "unseen_root",
                                      "landmarks") + _SCANNED, required=("root",)),
    "arrayrecord": Source(arrayrecord_dataset, ("root", "test_images", "unseen_root") + _DECODED,
                          required=("root",)),
    "recordio": Source(recordio_dataset, ("root", "test_images", "unseen_root", "strict")
                       + _DECODED, required=("root",)),
    "hw2p2": Source(hw2p2_dataset, ("root",) + _SCANNED, required=("root",)),
    "lfw": Source(lfw_dataset, ("root", "pairs", "fold", "min_images", "test_images") + _SCANNED,
                  required=("root",)),
    "orl": Source(orl_dataset, ("root", "split", "known_identities", "train_images",
                                "validation_images") + _SCANNED,
                  required=("root",)),
    "tfds": Source(tfds_dataset, ("tfds_name", "data_dir", "tfds_split", "tfds_unseen_split",
                                  "image_key", "label_key", "test_images") + _DECODED,
                   required=("tfds_name",)),
}


def registered_datasets() -> dict[str, Source]:
    return dict(_DATASETS)


def get_dataset(config: ml_collections.ConfigDict) -> FaceDataset:
    """The dataset named by `config.dataset.name`, built from the keys of `config.dataset` that
    its source reads (a missing or empty required one is a one-line ValueError)."""
    d = config.dataset
    name = d.name
    try:
        source = _DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; registered: {sorted(_DATASETS)}") from None
    for key in source.keys:
        if key not in d:
            raise ValueError(f"dataset.{key} is missing (dataset.name={name} reads it); build "
                             f"configs on jfacerec.core.config_base.base_config(), which has "
                             f"every source's keys")
    for key in source.required:
        if not d[key]:
            raise ValueError(f"dataset.{key} is required for dataset.name={name}")
    for key in _PATHS:
        if key in source.keys and d[key]:
            storage.check_credentials(d[key])  # at once, not after gcsfs's minutes of retries
    # Only the source's own keys: a builder reading an undeclared key fails in the tests.
    return source.build(ml_collections.ConfigDict({k: d[k] for k in source.keys}),
                        config.image_size)
