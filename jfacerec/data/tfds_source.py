"""TensorFlow Datasets as a source: `tfds.data_source` reads prepared datasets (array_record
format) without TensorFlow. Needs the `tfds` extra: pip install 'jfacerec[tfds]'."""

from __future__ import annotations

import ml_collections
import numpy as np

from jfacerec.data.folders import split_per_identity
from jfacerec.data.images import as_rgb_array, center_crop, resize
from jfacerec.data.sources import FaceDataset, Subset


class TfdsSource:
    """A TensorFlow Datasets data source (`tfds.data_source`, array_record format, no TensorFlow
    needed to read). Text labels are mapped to indices in sorted order."""

    def __init__(self, name: str, split: str, *, size: int, data_dir: str | None = None,
                 image_key: str = "image", label_key: str = "label", crop_fraction: float = 1.0):
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise ImportError("the tfds dataset needs tensorflow-datasets: "
                              "pip install 'jfacerec[tfds]'") from None
        self.description = f"tfds:{name}[{split}]"
        self.records = tfds.data_source(name, split=split, data_dir=data_dir)
        self.image_key, self.size, self.crop_fraction = image_key, size, crop_fraction
        raw = [self.records[i][label_key] for i in range(len(self.records))]
        if raw and isinstance(raw[0], (bytes, str)):
            text = [r.decode() if isinstance(r, bytes) else r for r in raw]
            self.names = sorted(set(text))
            self._labels = np.searchsorted(np.array(self.names), np.array(text)).astype(np.int32)
        else:
            self._labels = np.asarray(raw, np.int32)
            self.names = [str(i) for i in range(int(self._labels.max(initial=-1)) + 1)]

    def __len__(self) -> int:
        return len(self._labels)

    def labels(self) -> np.ndarray:
        return self._labels

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        image = as_rgb_array(self.records[int(index)][self.image_key])
        face = resize(np.ascontiguousarray(center_crop(image, self.crop_fraction)), self.size)
        return {"image": face, "label": self._labels[int(index)]}

    def __repr__(self) -> str:
        return f"TfdsSource({self.description}, {len(self)} records)"


def tfds_dataset(d: ml_collections.ConfigDict, image_size: int) -> FaceDataset:
    """`tfds.data_source(d.tfds_name)`: `split` trains (less `test_images` per identity);
    `unseen_split`, if given, holds other identities for verification."""
    make = lambda split: TfdsSource(d.tfds_name, split, size=image_size,  # noqa: E731
                                    data_dir=d.get("data_dir") or None,
                                    image_key=d.get("image_key", "image"),
                                    label_key=d.get("label_key", "label"),
                                    crop_fraction=d.get("crop_fraction", 1.0))
    everything = make(d.get("split", "train"))
    kept, held = split_per_identity(everything.labels(), d.get("test_images", 0))
    return FaceDataset(f"tfds:{d.tfds_name}", len(everything.names), Subset(everything, kept),
                       Subset(everything, held) if len(held) else None,
                       make(d.unseen_split) if d.get("unseen_split") else None,
                       tuple(everything.names))
