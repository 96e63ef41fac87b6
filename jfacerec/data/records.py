"""Record sources: random-access collections of faces that grain reads, and `FaceDataset`.

A source is a grain `RandomAccessDataSource`: `len(source)` records, `source[i]` a dict with
`image` (uint8 [height, width, 3]) and `label` (int32, the identity's index within the source).
A `FaceDataset` bundles the splits every evaluation needs; `sources.py` builds them by name.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Protocol

import numpy as np

from jfacerec.core import storage
from jfacerec.data import pack
from jfacerec.data.folders import ImageFiles
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


class DecodedSource(_CachedRecords):
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
            face = self._decode(index)
            if self.cache:
                with self._lock:
                    self._cache[index] = face
        return {"image": face, "label": self._labels[index]}

    def _decode(self, index: int) -> np.ndarray:
        """Record `index`'s face, uint8 [size, size, 3]: its encoded image, cropped and resized."""
        data, name = self._encoded(index)
        return load_face(data, crop_fraction=self.crop_fraction, size=self.size, name=name)


class ImageFileSource(DecodedSource):
    """Image files on disk (from a folder scan), decoded on read."""

    def __init__(self, files: ImageFiles, **kwargs):
        super().__init__(files.labels, **kwargs)
        self.files = files

    def _encoded(self, index: int) -> tuple[str, str]:
        return self.files.paths[index], self.files.paths[index]

    def __repr__(self) -> str:
        return f"ImageFileSource({self.files.summary()})"


class ArrayRecordSource(DecodedSource):
    """A dataset packed by `python -m jfacerec.data.pack`, read with grain's ArrayRecord source.

    `directory` may be gs://: array_record's reader has its own GCS client (Google Cloud C++,
    application default credentials; CLOUD_STORAGE_EMULATOR_ENDPOINT points it at an emulator).

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
            [storage.join(directory, s) for s in self.index["shards"]])

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
