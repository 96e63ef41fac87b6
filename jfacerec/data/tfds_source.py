"""TensorFlow Datasets as a source: TFDS's random-access data sources (`tfds.data_source`) read
datasets prepared in the array_record format without TensorFlow. Needs the `tfds` extra:
pip install 'jfacerec[tfds]'.

Preparing (building) a dataset is another matter: most TFDS builders, `lfw` among them, need
TensorFlow for that, once (pip install tensorflow-cpu); reading never does.
"""

from __future__ import annotations

import copy

import ml_collections
import numpy as np

from jfacerec.data.folders import split_per_identity
from jfacerec.data.records import DecodedSource, FaceDataset


class TfdsSource(DecodedSource):
    """Split `split` of the prepared TFDS dataset `name` (array_record format), decoded like image
    files: uint8 [size, size, 3] faces, the central `crop_fraction` of each image.

    Labels are the identities present in the split, numbered 0.. in sorted order of the label
    feature's values (text, or ClassLabel/integer indices); `names[i]` is identity i's name.
    """

    def __init__(self, name: str, split: str, *, size: int, data_dir: str | None = None,
                 image_key: str = "image", label_key: str = "label", crop_fraction: float = 1.0,
                 cache: bool = False):
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise ImportError("the tfds dataset needs tensorflow-datasets: "
                              "pip install 'jfacerec[tfds]'") from None
        self.description = f"tfds:{name}[{split}]"
        # tfds.data_source would download and build a missing dataset (possibly hundreds of GiB,
        # and TensorFlow for most builders); a training run should fail instead.
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.DatasetNotFoundError:
            # TFDS's own message lists every dataset it knows, burying the point.
            raise FileNotFoundError(
                f"{self.description}: no prepared dataset {name!r} under "
                f"{data_dir or 'the default TFDS data_dir'}, and no TFDS builder of that name; "
                f"set dataset.data_dir to where it was prepared") from None
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"{self.description}: not prepared under {builder.data_dir}; build it once in the "
                f"array_record format: python -c \"import tensorflow_datasets as tfds; "
                f"tfds.builder({name!r}, data_dir={data_dir!r}, file_format='array_record')"
                f".download_and_prepare()\" (most builders need TensorFlow: pip install "
                f"tensorflow-cpu)")
        features = builder.info.features
        for key in (image_key, label_key):
            if key not in features:
                raise ValueError(f"{self.description} has no feature {key!r}; its features: "
                                 f"{sorted(features.keys())}")
        image = features[image_key]
        # Float images are stored as bitcast PNGs, which only TFDS can decode.
        if not isinstance(image, tfds.features.Image) or image.np_dtype == np.float32:
            raise ValueError(f"{self.description}: feature {image_key!r} is {image!r}, not an "
                             f"image feature of integer pixels")
        # Images stay encoded (PNG/JPEG bytes): reading the labels below then costs a record read
        # and no image decoding (~0.1 ms a record rather than ~1.4 ms for a 250-pixel JPEG), and
        # faces are decoded by the same code as image files (JPEG draft mode, modes, EXIF).
        self.records = builder.as_data_source(split=split,
                                              decoders={image_key: tfds.decode.SkipDecoding()})
        if not len(self.records):
            raise ValueError(f"{self.description} has no records")
        self.image_key = image_key
        # TFDS keeps no per-record label index, so every record is read once.
        raw = [self.records[i][label_key] for i in range(len(self.records))]
        values = np.array([v.decode() if isinstance(v, bytes) else v for v in raw])
        present, labels = np.unique(values, return_inverse=True)
        label_feature = features[label_key]
        if isinstance(label_feature, tfds.features.ClassLabel):
            self.names = [label_feature.int2str(int(v)) for v in present]
        else:
            self.names = [str(v) for v in present]
        self.indices = np.arange(len(self.records))
        super().__init__(labels, size=size, crop_fraction=crop_fraction, cache=cache)

    def subset(self, indices: np.ndarray) -> TfdsSource:
        """Records `indices` of this source with their labels unchanged, so that images held out
        for testing keep the training class indices (names stay those of the whole split)."""
        part = copy.copy(self)  # through __getstate__: a fresh face cache and lock
        part.indices = self.indices[indices]
        part._labels = self._labels[indices]
        return part

    def _encoded(self, index: int) -> tuple[bytes, str]:
        record_index = int(self.indices[index])
        return (self.records[record_index][self.image_key],
                f"{self.description} record {record_index}")

    def __repr__(self) -> str:
        return (f"TfdsSource({self.description}, {len(self)} records of {len(self.names)} "
                f"identities)")


def tfds_dataset(d: ml_collections.ConfigDict, image_size: int) -> FaceDataset:
    """The prepared TFDS dataset `tfds_name` (under `data_dir`; "": TFDS's default): split
    `tfds_split` trains, less `test_images` of each identity held out for classification;
    `tfds_unseen_split`, if given, holds other identities for verification."""
    make = lambda split: TfdsSource(d.tfds_name, split, size=image_size,  # noqa: E731
                                    data_dir=d.data_dir or None, image_key=d.image_key,
                                    label_key=d.label_key, crop_fraction=d.crop_fraction,
                                    cache=d.cache)
    everything = make(d.tfds_split)
    kept, held = split_per_identity(everything.labels(), d.test_images)
    return FaceDataset(f"tfds:{d.tfds_name}", len(everything.names), everything.subset(kept),
                       everything.subset(held) if len(held) else None,
                       make(d.tfds_unseen_split) if d.tfds_unseen_split else None,
                       tuple(everything.names))
