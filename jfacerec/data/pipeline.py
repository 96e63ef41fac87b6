"""The grain input pipeline: source -> shuffle -> repeat -> augment -> batch -> prefetch.

Records are dicts with `image` (uint8 [h, w, 3]) and `label` (int32). Training batches hold
`image` float32 [batch, size, size, 3] normalised to [-1, 1] and `label` int32 [batch]. Every random
choice flows from the seed, and the iterator's state (saved in checkpoints) resumes it exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding
from PIL import Image

from jfacerec.data.sources import Source


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation. `min_scale`: the smallest crop side, as a fraction of the image."""

    flip: bool = True
    min_scale: float = 0.8
    max_aspect_change: float = 0.1


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 in [-1, 1]."""
    return images.astype(np.float32) * (2.0 / 255.0) - 1.0


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (antialiased) resize of uint8 [h, w, 3] to [size, size, 3]; a no-op at that size."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def random_crop_flip(image: np.ndarray, rng: np.random.Generator, size: int,
                     augment: Augment) -> np.ndarray:
    """A random crop (side min_scale..1 of the image, aspect within 1 +- max_aspect_change) resized
    to [size, size, 3], flipped left-right with probability 1/2 when `augment.flip`."""
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
    return resize(np.ascontiguousarray(crop), size)


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


def train_dataset(source: Source, *, batch_size: int, image_size: int, seed: int,
                  augment: Augment = Augment(), num_workers: int = 0, num_threads: int = 2,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """The infinite, shuffled, augmented training stream of this process's share of the batch.

    `batch_size` is global; each of `process_count` processes reads a disjoint slice of the source
    and yields batch_size / process_count records per step.
    """
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
    if len(source) == 0:
        raise ValueError(f"the training source {source!r} is empty")
    ds = grain.MapDataset.source(source)
    if process_count > 1:
        ds = ds[process_index::process_count]
    ds = ds.seed(seed).shuffle().repeat().random_map(_TrainTransform(image_size, augment))
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * batch_size)
    ds = ds.to_iter_dataset(read).batch(batch_size // process_count, drop_remainder=True)
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
