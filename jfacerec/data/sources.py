"""Data sources: random-access record collections, and the dataset registry used by configs.

A source is a grain `RandomAccessDataSource`: `len(source)` records, `source[i]` a dict with
`image` (uint8 [height, width, 3]) and `label` (int32, the identity's index within the source).
A `FaceDataset` bundles the splits every evaluation needs.

Registered datasets (`config.dataset.name`): synthetic (procedural identities), folder (an
identity-folder tree), arrayrecord (shards written by `python -m jfacerec.data.pack`), hw2p2 (the
course layout), lfw (the folder, less the identities of a pairs file), orl (AT&T faces), and tfds
(any TensorFlow Datasets data source with an image and a label feature).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import threading
from typing import Callable, Protocol

import ml_collections
import numpy as np

from jfacerec.data import pack
from jfacerec.data.folders import (ImageFiles, scan_flat_folder, scan_identity_folders,
                                   split_per_identity)
from jfacerec.data.images import load_face
from jfacerec.data.synthetic import render_faces

# Unseen synthetic identities are drawn from this id upwards, far from any training id.
UNSEEN_IDENTITY_OFFSET = 1_000_000


class Source(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


class _CachedRecords:
    """A source that keeps what it has computed in `_cache`, guarded by `_lock`.

    Worker processes get the recipe, not the cache or the lock.
    """

    def __init__(self):
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class SyntheticSource(_CachedRecords):
    """Images `image_offset .. image_offset + images_per_identity - 1` of each given identity.

    Record i is image `i % images_per_identity` of identity `identity_ids[i // images_per_identity]`,
    labelled `i // images_per_identity`. Rendering is deterministic in (seed, identity, image).

    Records are rendered `chunk` at a time (vectorised rendering is several times faster than one
    by one) and kept: training revisits every record each epoch, and a 32-pixel face is 3 KiB.
    """

    def __init__(self, identity_ids: np.ndarray, images_per_identity: int, *, image_offset: int = 0,
                 image_size: int = 64, seed: int = 0, chunk: int = 128):
        if images_per_identity < 1 or len(identity_ids) < 1:
            raise ValueError("a synthetic source needs at least one identity and one image each")
        self.identity_ids = np.asarray(identity_ids, np.int64)
        self.images_per_identity = images_per_identity
        self.image_offset = image_offset
        self.image_size = image_size
        self.seed = seed
        self.chunk = chunk
        super().__init__()

    def __len__(self) -> int:
        return len(self.identity_ids) * self.images_per_identity

    def _render_chunk(self, c: int) -> np.ndarray:
        index = np.arange(c * self.chunk, min((c + 1) * self.chunk, len(self)))
        label, image = np.divmod(index, self.images_per_identity)
        return render_faces(self.identity_ids[label], self.image_offset + image,
                            image_size=self.image_size, seed=self.seed)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        c, offset = divmod(index, self.chunk)
        with self._lock:
            if c not in self._cache:
                self._cache[c] = self._render_chunk(c)
            pixels = self._cache[c][offset]
        return {"image": pixels, "label": np.int32(index // self.images_per_identity)}

    def labels(self) -> np.ndarray:
        """int32 [len(self)], without rendering anything."""
        return np.repeat(np.arange(len(self.identity_ids), dtype=np.int32),
                         self.images_per_identity)

    def __repr__(self) -> str:
        return (f"SyntheticSource({len(self.identity_ids)} identities x "
                f"{self.images_per_identity} images, size {self.image_size}, seed {self.seed})")


class _DecodedSource(_CachedRecords):
    """Records decoded from encoded images, cropped to the face and resized to `size`.

    Subclasses give `_encoded(i) -> (bytes or path, name)`. With `cache`, decoded faces are kept
    (a 112-pixel face is 37 KiB): epochs after the first skip decoding.
    """

    def __init__(self, labels: np.ndarray, *, size: int, crop_fraction: float = 1.0,
                 cache: bool = False):
        self._labels = np.asarray(labels, np.int32)
        self.size, self.crop_fraction, self.cache = size, crop_fraction, cache
        super().__init__()

    def __len__(self) -> int:
        return len(self._labels)

    def labels(self) -> np.ndarray:
        return self._labels

    def _encoded(self, index: int) -> tuple[bytes | str, str]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        face = self._cache.get(index)
        if face is None:
            data, name = self._encoded(index)
            face = load_face(data, crop_fraction=self.crop_fraction, size=self.size, name=name)
            if self.cache:
                with self._lock:
                    self._cache[index] = face
        return {"image": face, "label": self._labels[index]}


class ImageFileSource(_DecodedSource):
    """Image files on disk (from a folder scan), decoded on read."""

    def __init__(self, files: ImageFiles, **kwargs):
        super().__init__(files.labels, **kwargs)
        self.files = files

    def _encoded(self, index: int) -> tuple[str, str]:
        return self.files.paths[index], self.files.paths[index]

    def __repr__(self) -> str:
        return f"ImageFileSource({self.files.summary()})"


class ArrayRecordSource(_DecodedSource):
    """A dataset packed by `python -m jfacerec.data.pack`, read with grain's ArrayRecord source.

    indices: the packed records this source serves (all by default), in order; labels are
    renumbered 0.. over the identities present when `relabel`.
    """

    def __init__(self, directory: str, *, indices: np.ndarray | None = None, relabel: bool = True,
                 **kwargs):
        import grain

        self.directory = directory
        self.index = pack.read_index(directory)
        labels = np.repeat(np.arange(len(self.index["names"]), dtype=np.int32),
                           self.index["counts"])
        self.indices = np.arange(len(labels)) if indices is None else np.asarray(indices)
        labels = labels[self.indices]
        self.names = list(self.index["names"])
        if relabel:
            present = np.unique(labels)
            labels = np.searchsorted(present, labels).astype(np.int32)
            self.names = [self.names[i] for i in present]
        super().__init__(labels, **kwargs)
        self.records = grain.sources.ArrayRecordDataSource(
            [os.path.join(directory, s) for s in self.index["shards"]])

    def _encoded(self, index: int) -> tuple[bytes, str]:
        record_index = int(self.indices[index])
        _, image = pack.decode_record(self.records[record_index])
        return image, f"{self.directory} record {record_index}"

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self)} records of {len(self.names)} identities in " \
               f"{self.directory})"


class ArraySource:
    """Faces already in memory, uint8 [n, h, w, 3], as records (label 0)."""

    def __init__(self, images: np.ndarray):
        self.images = np.asarray(images, np.uint8)

    def __len__(self) -> int:
        return len(self.images)

    def labels(self) -> np.ndarray:
        return np.zeros(len(self.images), np.int32)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.images[int(index)], "label": np.int32(0)}


class Subset:
    """Records `indices` of another source, relabelled 0.. over the identities present."""

    def __init__(self, source: Source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, np.int64)
        labels = labels_of(source)[self.indices]
        self._present = np.unique(labels)
        self._labels = np.searchsorted(self._present, labels).astype(np.int32)

    def __len__(self) -> int:
        return len(self.indices)

    def labels(self) -> np.ndarray:
        return self._labels

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = self.source[int(self.indices[int(index)])]
        return {"image": record["image"], "label": self._labels[int(index)]}

    def __repr__(self) -> str:
        return f"Subset({len(self)} of {self.source!r})"


@dataclasses.dataclass
class FaceDataset:
    """The splits of one dataset.

    train: images of the training identities, labels 0..num_classes-1.
    test: other images of the same identities (closed-set classification), or None.
    unseen: images of identities never trained on (verification and open set), or None.
    names: the training identities' names (class i is names[i]), where the data has names.
    """

    name: str
    num_classes: int
    train: Source
    test: Source | None
    unseen: Source | None
    names: tuple[str, ...] | None = None


def labels_of(source: Source) -> np.ndarray:
    """int32 [len(source)]: a source's labels, cheaply where it knows them."""
    if hasattr(source, "labels"):
        return np.asarray(source.labels(), np.int32)
    return np.array([source[i]["label"] for i in range(len(source))], np.int32)


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
    return dict(size=image_size, crop_fraction=d.get("crop_fraction", 1.0),
                cache=d.get("cache", True))


def _scan(d: ml_collections.ConfigDict, root: str, **kwargs) -> ImageFiles:
    return scan_identity_folders(os.path.abspath(root), check=d.get("check", True),
                                 strict=d.get("strict", False), **kwargs)


def _held_out_split(d: ml_collections.ConfigDict, files: ImageFiles, image_size: int):
    """(train, test) sources of one tree: `test_images` of each identity held out for testing."""
    kept, held = split_per_identity(files.labels, d.get("test_images", 0))
    make = lambda idx: ImageFileSource(files.subset(idx), **_decoding(d, image_size))  # noqa: E731
    return make(kept), (make(held) if len(held) else None)


def folder_dataset(d: ml_collections.ConfigDict, image_size: int) -> FaceDataset:
    """`root/<identity>/<image>`: train on every identity (less `test_images` held out per
    identity for classification); verification on `unseen_root`, another tree, if given."""
    files = _scan(d, d.root, min_images=d.get("min_images", 1))
    train, test = _held_out_split(d, files, image_size)
    unseen = None
    if d.get("unseen_root"):
        unseen = ImageFileSource(_scan(d, d.unseen_root), **_decoding(d, image_size))
    return FaceDataset(f"folder:{d.root}", len(files.names), train, test, unseen, files.names)


def arrayrecord_dataset(d: ml_collections.ConfigDict, image_size: int) -> FaceDataset:
    """Shards written by `python -m jfacerec.data.pack` (`root`), like `folder` otherwise."""
    everything = ArrayRecordSource(d.root, size=image_size)
    kept, held = split_per_identity(everything.labels(), d.get("test_images", 0))
    make = lambda idx: ArrayRecordSource(d.root, indices=idx, relabel=False,  # noqa: E731
                                         **_decoding(d, image_size))
    unseen = None
    if d.get("unseen_root"):
        unseen = ArrayRecordSource(d.unseen_root, **_decoding(d, image_size))
    return FaceDataset(f"arrayrecord:{d.root}", len(everything.names), make(kept),
                       make(held) if len(held) else None, unseen, tuple(everything.names))


def read_id_label_csv(path: str) -> dict[str, str]:
    """An `id,label` CSV (HW2P2's dev_identities.csv, our submissions) -> {id: label}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (an id,label CSV)")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["id", "label"]:
        raise ValueError(f"{path}: expected a header line 'id,label'")
    return {r[0].strip(): r[1].strip() for r in rows[1:] if r}


@dataclasses.dataclass
class Hw2p2Layout:
    """The course's layout under `root` (see ../shared/ARCHITECTURE.md)."""

    root: str

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

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
    if not os.path.isdir(layout.dev):
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
    if os.path.isdir(layout.known):
        unseen = ImageFileSource(_scan(d, layout.known), **_decoding(d, image_size))
    make = lambda files: ImageFileSource(files, **_decoding(d, image_size))  # noqa: E731
    return FaceDataset(f"hw2p2:{d.root}", len(train.names), make(train),
                       make(dev) if dev is not None else None, unseen, train.names)


def lfw_identities_in_pairs(path: str, fold: int = -1) -> set[str]:
    """The people in a pairs file's fold (every fold when `fold` is -1)."""
    from jfacerec.protocols import read_lfw_pairs

    folds = read_lfw_pairs(path)
    if not -1 <= fold < len(folds):
        raise ValueError(f"{path} has {len(folds)} folds; fold {fold} does not exist")
    chosen = folds if fold == -1 else [folds[fold]]
    return {name for pairs in chosen for pair in pairs for name in pair.names}


def lfw_dataset(d: ml_collections.ConfigDict, image_size: int) -> FaceDataset:
    """LFW for training: every identity outside fold `fold` of the pairs file `pairs` (all its
    folds when -1) with `min_images` or more images; `test_images` of each held out; the held-out
    people as the unseen set."""
    everyone = _scan(d, d.root)
    held = lfw_identities_in_pairs(d.pairs, d.get("fold", -1)) if d.get("pairs") else set()
    outside = tuple(n for n in everyone.names if n not in held)
    files = everyone.select(outside, d.get("min_images", 1))
    train, test = _held_out_split(d, files, image_size)
    unseen = None
    if held:
        unseen = ImageFileSource(everyone.select(tuple(held)), **_decoding(d, image_size))
    return FaceDataset("lfw", len(files.names), train, test, unseen, files.names)


def orl_dataset(d: ml_collections.ConfigDict, image_size: int) -> FaceDataset:
    """AT&T/ORL (s1..s40, 10 images each): `train_images` random images of each of the first
    `known_identities` subjects (in a random order drawn from `split`) train, their other
    images test; the remaining subjects are the unseen (open-set unknown) ones."""
    files = _scan(d, d.root)
    rng = np.random.default_rng(d.get("split", 0))
    order = rng.permutation(len(files.names))
    known = np.sort(order[:d.get("known_identities", len(files.names))])
    in_known = np.isin(files.labels, known)
    known_idx = np.flatnonzero(in_known)
    per_identity = int(np.bincount(files.labels).max())
    kept, held = split_per_identity(files.labels[known_idx],
                                    per_identity - d.get("train_images", 5), rng)
    make = lambda idx: ImageFileSource(files.subset(idx, relabel=True),  # noqa: E731
                                       **_decoding(d, image_size))
    unknown_idx = np.flatnonzero(~in_known)
    return FaceDataset("orl", len(known), make(known_idx[kept]), make(known_idx[held]),
                       make(unknown_idx) if len(unknown_idx) else None,
                       tuple(files.names[i] for i in known))


def tfds_dataset(d: ml_collections.ConfigDict, image_size: int) -> FaceDataset:
    from jfacerec.data.tfds_source import tfds_dataset as build  # optional dependency

    return build(d, image_size)


_DATASETS: dict[str, Callable[[ml_collections.ConfigDict, int], FaceDataset]] = {
    "synthetic": synthetic_dataset,
    "folder": folder_dataset,
    "arrayrecord": arrayrecord_dataset,
    "hw2p2": hw2p2_dataset,
    "lfw": lfw_dataset,
    "orl": orl_dataset,
    "tfds": tfds_dataset,
}


def get_dataset(config: ml_collections.ConfigDict) -> FaceDataset:
    """The dataset named by `config.dataset.name`, built from `config.dataset`."""
    name = config.dataset.name
    try:
        build = _DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; registered: {sorted(_DATASETS)}") from None
    return build(config.dataset, config.image_size)
