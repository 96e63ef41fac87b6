"""The grain input pipeline: source -> shuffle -> repeat -> augment -> batch -> prefetch.

Records are dicts with `image` (uint8 [h, w, 3]) and `label` (int32). Training batches hold
`image` float32 [batch, size, size, 3] normalised to [-1, 1] and `label` int32 [batch]. Every random
choice flows from the seed, and the iterator's state (saved in checkpoints) resumes it exactly.

Samplers: "random" (shuffled epochs), "pk" (each batch P identities x K images, for triplet
mining) and "triplets" (each batch [anchors; positives; negatives], a third each).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding
from PIL import Image
from jfacerec.data.images import resize
from jfacerec.data.records import Source, labels_of


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation. `min_scale`: the smallest crop side, as a fraction of the image.
    brightness, contrast, saturation: the largest relative change of each (0 leaves it alone).
    erase: the probability of random erasing (see `random_erase`; 0: never). rotate: the largest
    in-plane rotation in degrees (see `random_rotate`; 0: none)."""

    flip: bool = True
    min_scale: float = 0.8
    max_aspect_change: float = 0.1
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    erase: float = 0.0
    rotate: float = 0.0


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 in [-1, 1]."""
    return images.astype(np.float32) * (2.0 / 255.0) - 1.0


_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def color_jitter(image: np.ndarray, rng: np.random.Generator, augment: Augment) -> np.ndarray:
    """Random brightness, contrast and saturation changes of uint8 [h, w, 3]; the generator is
    only drawn from for the changes that are on."""
    if not (augment.brightness or augment.contrast or augment.saturation):
        return image
    x = image.astype(np.float32)
    if augment.brightness:
        x *= rng.uniform(1.0 - augment.brightness, 1.0 + augment.brightness)
    if augment.contrast:
        mean = float(np.mean(x @ _LUMA))
        x = (x - mean) * rng.uniform(1.0 - augment.contrast, 1.0 + augment.contrast) + mean
    if augment.saturation:
        grey = (x @ _LUMA)[..., None]
        x = grey + (x - grey) * rng.uniform(1.0 - augment.saturation, 1.0 + augment.saturation)
    return np.round(np.clip(x, 0.0, 255.0)).astype(np.uint8)


# Random erasing's rectangle: its area as a fraction of the image, and its height / width.
ERASE_AREA = (0.02, 0.25)
ERASE_ASPECT = (0.3, 3.3)


def random_erase(image: np.ndarray, rng: np.random.Generator, probability: float) -> np.ndarray:
    """With `probability`, a rectangle of uint8 [h, w, 3] (ERASE_AREA of it, aspect within
    ERASE_ASPECT, anywhere it fits) replaced by uniform noise, as in Zhong et al.'s random
    erasing: a face must be recognised with a part of it hidden (a hand, glasses, a shadow). The
    generator is only drawn from when `probability` > 0."""
    if not probability or rng.uniform() >= probability:
        return image
    h, w = image.shape[:2]
    area = rng.uniform(*ERASE_AREA) * h * w
    aspect = np.exp(rng.uniform(*np.log(ERASE_ASPECT)))
    eh = min(h, max(1, int(round(np.sqrt(area * aspect)))))
    ew = min(w, max(1, int(round(np.sqrt(area / aspect)))))
    top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
    out = image.copy()
    out[top:top + eh, left:left + ew] = rng.integers(0, 256, (eh, ew, image.shape[2]), np.uint8)
    return out


def random_rotate(image: np.ndarray, rng: np.random.Generator, degrees: float) -> np.ndarray:
    """uint8 [h, w, 3] turned about its centre by an angle uniform in +-`degrees` (bilinear), the
    corners it uncovers filled with the image's mean colour rather than black, so that no hard
    edge is left to learn. Aligned faces still tilt a little from the landmarks' errors and the
    head's roll. The generator is only drawn from when `degrees` > 0."""
    if not degrees:
        return image
    angle = float(rng.uniform(-degrees, degrees))
    fill = tuple(int(v) for v in np.round(image.reshape(-1, image.shape[-1]).mean(0)))
    return np.asarray(Image.fromarray(image).rotate(angle, Image.BILINEAR, fillcolor=fill))


def random_crop_flip(image: np.ndarray, rng: np.random.Generator, size: int,
                     augment: Augment) -> np.ndarray:
    """A random crop (side min_scale..1 of the image, aspect within 1 +- max_aspect_change) resized
    to [size, size, 3], flipped left-right with probability 1/2 when `augment.flip`, then color
    jitter and random erasing. A rotation (`augment.rotate`) comes first, so that the crop mostly
    leaves out the corners it fills."""
    image = random_rotate(image, rng, augment.rotate)
    h, w = image.shape[:2]
    scale = rng.uniform(augment.min_scale, 1.0)
    aspect = rng.uniform(1.0 - augment.max_aspect_change, 1.0 + augment.max_aspect_change)
    ch = min(h, max(1, int(round(h * scale * np.sqrt(aspect)))))
    cw = min(w, max(1, int(round(w * scale / np.sqrt(aspect)))))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    crop = image[top:top + ch, left:left + cw]
    if augment.flip and rng.uniform() < 0.5:
        crop = crop[:, ::-1]
    image = color_jitter(resize(np.ascontiguousarray(crop), size), rng, augment)
    return random_erase(image, rng, augment.erase)


class _TrainTransform(grain.transforms.RandomMap):
    def __init__(self, size: int, augment: Augment):
        self.size, self.augment = size, augment

    def random_map(self, record, rng: np.random.Generator):
        image = random_crop_flip(record["image"], rng, self.size, self.augment)
        return {"image": normalize(image), "label": np.int32(record["label"])}


class _EvalTransform(grain.transforms.Map):
    def __init__(self, size: int):
        self.size = size

    def map(self, record):
        return {"image": normalize(resize(record["image"], self.size)),
                "label": np.int32(record["label"])}


class _SampledBatch(grain.transforms.RandomMap):
    """Batch index -> one whole batch drawn by the "pk" or "triplets" sampler."""

    def __init__(self, source: Source, sampler: str, rows: int, pk_images: int, size: int,
                 augment: Augment):
        labels = labels_of(source)
        self.groups = [g for g in (np.flatnonzero(labels == c) for c in np.unique(labels))
                       if len(g) > 1]
        if len(self.groups) < 2:
            raise ValueError(f"sampler {sampler!r} needs two identities with two images or more in "
                             f"{source!r}")
        self.source, self.sampler, self.rows, self.k = source, sampler, rows, pk_images
        self.size, self.augment = size, augment

    def _indices(self, rng: np.random.Generator) -> np.ndarray:
        g = self.groups
        if self.sampler == "pk":
            p = self.rows // self.k
            chosen = rng.choice(len(g), p, replace=p > len(g))
            return np.concatenate([rng.choice(g[c], self.k, replace=len(g[c]) < self.k)
                                   for c in chosen])
        n = self.rows // 3
        anchors, positives, negatives = [], [], []
        for _ in range(n):
            a_id, n_id = rng.choice(len(g), 2, replace=False)
            a, pos = rng.choice(g[a_id], 2, replace=False)
            anchors.append(a)
            positives.append(pos)
            negatives.append(rng.choice(g[n_id]))
        return np.array(anchors + positives + negatives)

    def random_map(self, batch_index, rng: np.random.Generator):
        records = [self.source[int(i)] for i in self._indices(rng)]
        images = [normalize(random_crop_flip(r["image"], rng, self.size, self.augment))
                  for r in records]
        return {"image": np.stack(images),
                "label": np.array([r["label"] for r in records], np.int32)}


class _ProcessRows(grain.MapDataset):
    """One process's rows of every global batch of `parent` (a global record stream).

    Local element k is global element (k // rows) * batch_size + process_index * rows + k % rows:
    process p reads rows p*rows..(p+1)*rows-1 of each global batch of `batch_size` records, and
    only those (grain's random access), so every process count sees the same global stream.
    """

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, *, batch_size: int, rows: int,
                 process_index: int):
        super().__init__(parent)
        self.batch_size, self.rows, self.offset = batch_size, rows, process_index * rows
        self._length = len(parent) // batch_size * rows

    def __len__(self) -> int:
        return self._length

    def _global_index(self, index: int) -> int:
        batch, row = divmod(index, self.rows)
        return batch * self.batch_size + self.offset + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._global_index(index)]

    def _getitems(self, indices):
        return self._parent._getitems([self._global_index(i) for i in indices])

    def __str__(self) -> str:
        last = self.offset + self.rows - 1
        return f"_ProcessRows(rows {self.offset}..{last} of each {self.batch_size})"


SAMPLERS = ("random", "pk", "triplets")


def train_dataset(source: Source, *, batch_size: int, image_size: int, seed: int,
                  augment: Augment = Augment(), num_workers: int = 0, num_threads: int = 2,
                  worker_threads: int = 0, process_index: int = 0, process_count: int = 1,
                  sampler: str = "random", pk_images: int = 4) -> grain.IterDataset:
    """The infinite, augmented training stream of this process's share of the batch.

    `batch_size` is global; each of `process_count` processes yields batch_size / process_count
    records per step. The random sampler's global batches do not depend on `process_count`:
    process p yields (and reads) rows p*rows..(p+1)*rows-1 of each. The pk and triplets samplers
    draw each process's batches on its own. "pk" draws identities with at least two images,
    `pk_images` images each.

    Reading: with `num_workers` 0, `num_threads` threads read and augment records in this process
    (0: the calling thread does). With `num_workers` > 0 (grain processes) each worker reads with
    `worker_threads` threads, by default none: the processes are the parallelism, and threads
    beside them mostly contend for the GIL (decoding LFW JPEGs on 2 cores, workers without threads
    used 11-27% less CPU per image than with 2 threads each, and made 1-11% more images/s;
    benchmarks/README.md).
    """
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
    if len(source) == 0:
        raise ValueError(f"the training source {source!r} is empty")
    rows = batch_size // process_count
    threads = worker_threads if num_workers > 0 else num_threads
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * batch_size)
    if sampler == "random":
        # The global stream (shuffled epochs, each record's augmentation drawn from its index) is
        # the same for any number of processes; each process reads its rows of each batch.
        ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
        ds = ds.random_map(_TrainTransform(image_size, augment))
        if process_count > 1:
            ds = _ProcessRows(ds, batch_size=batch_size, rows=rows, process_index=process_index)
        ds = ds.to_iter_dataset(read).batch(rows, drop_remainder=True)
    elif sampler in ("pk", "triplets"):
        if sampler == "pk" and rows % pk_images:
            raise ValueError(f"the pk sampler needs batch_size / processes ({rows}) divisible by "
                             f"pk_images ({pk_images})")
        if sampler == "triplets" and rows % 3:
            raise ValueError(f"the triplets sampler needs batch_size / processes ({rows}) "
                             f"divisible by 3")
        ds = grain.MapDataset.range(0, 1 << 40)[process_index::process_count].seed(seed)
        ds = ds.random_map(_SampledBatch(source, sampler, rows, pk_images, image_size, augment))
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4))
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return ds


def eval_batches(source: Source, *, batch_size: int, image_size: int,
                 num_threads: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Every record once, in order, in batches (the last one may be short)."""
    ds = grain.MapDataset.source(source).map(_EvalTransform(image_size))
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * batch_size)
    return iter(ds.to_iter_dataset(read).batch(batch_size, drop_remainder=False))


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows of the batch -> global arrays sharded over the mesh's `data` axis."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
