"""RecordIO packs (insightface's training sets) as a dataset: `config.dataset.name = "recordio"`.

`root` holds `train.rec`, `train.idx` and `property`; the format is read with NumPy and Pillow
(jfacerec/data/pack.py: `open_recordio`), without mxnet. Faces are decoded on read, one positioned
read per record through the index, so that grain shuffles the pack and each process reads its
share of it.
"""

from __future__ import annotations

import warnings

import ml_collections
import numpy as np

from jfacerec.data import pack
from jfacerec.data.folders import SkippedImageWarning, split_per_identity
from jfacerec.data.images import ImageDecodeError
from jfacerec.data.records import DecodedSource, FaceDataset


class RecordIOSource(DecodedSource):
    """The images of a RecordIO pack, labelled with the pack's labels.

    An image that does not decode is, with `strict`, an ImageDecodeError naming the file and byte
    offset; otherwise it is skipped with a warning: the record serves the next readable image of
    the same identity instead, so that the source keeps its length and every label its images.
    """

    def __init__(self, records: pack.RecordIOPack, *, strict: bool = False, **kwargs):
        super().__init__(records.labels, **kwargs)
        self.records, self.strict = records, strict

    def _encoded(self, index: int) -> tuple[bytes, str]:
        return self.records.image(index), self.records.where(index)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        try:
            return super().__getitem__(index)
        except ImageDecodeError as error:
            if self.strict:
                raise
            return self._instead(int(index), error)

    def _instead(self, index: int, error: ImageDecodeError) -> dict[str, np.ndarray]:
        same = np.flatnonzero(self._labels == self._labels[index])
        after = np.roll(same, -int(np.searchsorted(same, index)))[1:]  # the next ones, cyclically
        for other in after:
            try:
                record = super().__getitem__(other)
            except ImageDecodeError:
                continue
            warnings.warn(f"skipping {error}; serving {self.records.where(other)} of the same "
                          f"identity instead", SkippedImageWarning, stacklevel=2)
            return record
        raise ValueError(f"{error}; no other image of identity {self._labels[index]} in "
                         f"{self.records.rec} is readable either") from None

    def __repr__(self) -> str:
        return f"RecordIOSource({len(self)} images of {self.records.rec})"


def recordio_dataset(d: ml_collections.ConfigDict, image_size: int) -> FaceDataset:
    """The pack in `root`: train on it less `test_images` held out per identity (the closed-set
    test split); verification on `unseen_root`, another pack, if given. The number of classes is
    the one `property` gives."""
    records = pack.open_recordio(d.root)
    kept, held = split_per_identity(records.labels, d.test_images)
    decoding = dict(size=image_size, crop_fraction=d.crop_fraction, cache=d.cache,
                    strict=d.strict)
    unseen = None
    if d.unseen_root:
        unseen = RecordIOSource(pack.open_recordio(d.unseen_root), **decoding)
    return FaceDataset(f"recordio:{d.root}", records.num_classes,
                       RecordIOSource(records.subset(kept), **decoding),
                       RecordIOSource(records.subset(held), **decoding) if len(held) else None,
                       unseen)
