"""Data sources: random-access record collections, and the dataset registry used by configs.

A source is a grain `RandomAccessDataSource`: `len(source)` records, `source[i]` a dict with
`image` (uint8 [height, width, 3]) and `label` (int32, the identity's index within the source).
A `FaceDataset` bundles the splits every evaluation needs.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Protocol

import ml_collections
import numpy as np

from jfacerec.data.synthetic import render_faces

# Unseen synthetic identities are drawn from this id upwards, far from any training id.
UNSEEN_IDENTITY_OFFSET = 1_000_000


class Source(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


class SyntheticSource:
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
        self._chunks: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        # Worker processes get the recipe, not the rendered cache or the lock.
        state = self.__dict__.copy()
        state["_chunks"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

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
            if c not in self._chunks:
                self._chunks[c] = self._render_chunk(c)
            pixels = self._chunks[c][offset]
        return {"image": pixels, "label": np.int32(index // self.images_per_identity)}

    def labels(self) -> np.ndarray:
        """int32 [len(self)], without rendering anything."""
        return np.repeat(np.arange(len(self.identity_ids), dtype=np.int32),
                         self.images_per_identity)

    def __repr__(self) -> str:
        return (f"SyntheticSource({len(self.identity_ids)} identities x "
                f"{self.images_per_identity} images, size {self.image_size}, seed {self.seed})")


@dataclasses.dataclass
class FaceDataset:
    """The splits of one dataset.

    train: images of the training identities, labels 0..num_classes-1.
    test: other images of the same identities (closed-set classification), or None.
    unseen: images of identities never trained on (verification and open set), or None.
    """

    name: str
    num_classes: int
    train: Source
    test: Source | None
    unseen: Source | None


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


_DATASETS: dict[str, Callable[[ml_collections.ConfigDict, int], FaceDataset]] = {
    "synthetic": synthetic_dataset,
}


def get_dataset(config: ml_collections.ConfigDict) -> FaceDataset:
    """The dataset named by `config.dataset.name`, built from `config.dataset`."""
    name = config.dataset.name
    try:
        build = _DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; registered: {sorted(_DATASETS)}") from None
    return build(config.dataset, config.image_size)
