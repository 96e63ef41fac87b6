"""RecordIO packs (mxnet's format, insightface's training sets) read as a dataset, and converted.

The packs are written here from the format's description, not with the reader's code: records of
magic, length word and payload, split wherever an aligned payload word equals the magic.
"""

import io
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from conftest import run_module, tiny_config
from jfacerec.core import workdir as workdir_files
from jfacerec.data import pack, records, sources
from jfacerec.data.folders import SkippedImageWarning
from jfacerec.data.images import ImageDecodeError
from jfacerec.data.recordio import RecordIOSource
from jfacerec.data.synthetic import render_faces
from jfacerec.training import train

MAGIC = struct.pack("<I", 0xCED7230A)
SIZE = 16


def rec_record(payload: bytes) -> bytes:
    """One record as mxnet writes it: the payload cut at every aligned word equal to the magic
    (the word dropped), each part behind magic and (continuation << 29 | length), padded to 4."""
    cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i:i + 4] == MAGIC]
    bounds = [0] + [c for cut in cuts for c in (cut, cut + 4)] + [len(payload)]
    parts = [payload[bounds[k]:bounds[k + 1]] for k in range(0, len(bounds), 2)]
    flags = [0] if len(parts) == 1 else [1] + [2] * (len(parts) - 2) + [3]
    return b"".join(MAGIC + struct.pack("<I", flag << 29 | len(part)) + part
                    + b"\0" * (-len(part) % 4) for flag, part in zip(flags, parts))


def payload(label: float, image: bytes, extra_labels: tuple[float, ...] = ()) -> bytes:
    """The image header: flag 0 with the label in the header, or flag k with k labels after it."""
    if not extra_labels:
        return struct.pack("<IfQQ", 0, label, 0, 0) + image
    labels = (label, *extra_labels)
    return (struct.pack("<IfQQ", len(labels), 0.0, 0, 0) + struct.pack(f"<{len(labels)}f", *labels)
            + image)


def write_pack(root, entries: list[tuple[int, bytes]], *, num_classes: int, header: bool,
               size: int = SIZE) -> list[int]:
    """train.rec, train.idx, property for (key, payload) entries; returns the byte offsets."""
    os.makedirs(root, exist_ok=True)
    blob, offsets, lines = b"", [], []
    for key, data in entries:
        offsets.append(len(blob))
        lines.append(f"{key}\t{len(blob)}\n")
        blob += rec_record(data)
    (root / "train.rec").write_bytes(blob)
    (root / "train.idx").write_text("".join(lines))
    (root / "property").write_text(f"{num_classes},{size},{size}")
    return offsets


def png(face: np.ndarray, magic_text: bool = False) -> bytes:
    """PNG bytes; with magic_text, a text chunk holding the magic word twice (with other bytes
    between them) at positions 4-aligned in the payload, so that the record is split in three."""
    buffer = io.BytesIO()
    info = None
    if magic_text:
        for shift in range(4):  # the 24-byte header keeps the PNG's alignment in the payload
            info = PngImagePlugin.PngInfo()
            text = ("x" * shift + (MAGIC + b"abcd" + MAGIC).decode("latin-1"))
            info.add_text("k", text)
            buffer = io.BytesIO()
            Image.fromarray(face).save(buffer, format="PNG", pnginfo=info)
            at = buffer.getvalue().find(MAGIC)
            if at % 4 == 0:
                break
        assert at % 4 == 0, "no padding puts the magic word at an aligned position"
    else:
        Image.fromarray(face).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(face: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(face).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def faces(identities=3, per_identity=3) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [n, SIZE, SIZE, 3] faces, int labels [n]), identity by identity."""
    labels = np.repeat(np.arange(identities), per_identity)
    images = render_faces(labels, np.tile(np.arange(per_identity), identities), image_size=SIZE)
    return images, labels


def insightface_pack(root, images, labels, encode, num_classes=None, magic_in=None):
    """insightface's layout: record 0 a header (labels N, M: images are keys [1, N), keys [N, M)
    hold each identity's key range), the image records written in shuffled key order."""
    n, ids = len(images), int(labels.max()) + 1
    entries = [(0, payload(float(n + 1), b"", (float(n + 1 + ids),)))]
    for k in np.random.default_rng(0).permutation(n):
        image = png(images[k], magic_text=True) if k == magic_in else encode(images[k])
        entries.append((int(k) + 1, payload(float(labels[k]), image, (1.0,))))
    for c in range(ids):
        members = np.flatnonzero(labels == c) + 1
        entries.append((n + 1 + c, payload(float(members[0]), b"", (float(members[-1] + 1),))))
    return write_pack(root, entries, num_classes=num_classes or ids, header=True)


def plain_pack(root, images, labels, encode, num_classes=None, magic_in=None):
    """The other layout: every indexed record an image, keys 0.., labels in the header's float
    (the last image with a label array instead)."""
    entries = []
    for k in range(len(images)):
        image = png(images[k], magic_text=True) if k == magic_in else encode(images[k])
        extra = (7.0,) if k == len(images) - 1 else ()
        entries.append((k, payload(float(labels[k]), image, extra)))
    return write_pack(root, entries, num_classes=num_classes or int(labels.max()) + 1,
                      header=False)


@pytest.mark.parametrize("layout", [insightface_pack, plain_pack])
def test_both_layouts_read_back_the_faces_written(tmp_path, layout):
    images, labels = faces()
    layout(tmp_path / "p", images, labels, png, magic_in=4)
    assert (tmp_path / "p" / "train.rec").stat().st_size % 4 == 0
    records_ = pack.open_recordio(str(tmp_path / "p"))
    assert (len(records_), records_.num_classes, records_.image_shape) == (9, 3, (SIZE, SIZE))
    np.testing.assert_array_equal(records_.labels, labels)
    source = RecordIOSource(records_, size=SIZE)
    for i in range(len(images)):  # PNG: exact pixels, the split record's included
        np.testing.assert_array_equal(source[i]["image"], images[i])
        assert source[i]["label"] == labels[i]
    assert MAGIC + b"abcd" + MAGIC in records_.image(4)
    # Picklable for grain's workers: the copy opens the file itself.
    copy = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(copy[4]["image"], images[4])


def test_jpeg_payloads_decode_as_pillow_decodes_them(tmp_path):
    images, labels = faces()
    plain_pack(tmp_path / "p", images, labels, jpeg)
    source = RecordIOSource(pack.open_recordio(str(tmp_path / "p")), size=SIZE)
    for i in range(len(images)):
        expected = np.asarray(Image.open(io.BytesIO(jpeg(images[i]))).convert("RGB"))
        np.testing.assert_array_equal(source[i]["image"], expected)
        # 16-pixel JPEGs lose colour detail (about 9 levels on average); another face is ~50 off.
        assert np.abs(source[i]["image"].astype(int) - images[i]).mean() < 15


def broken(tmp_path, name, magic_in=None):
    """A plain pack of 6 PNG faces at tmp_path/name to break: (root, its records' offsets)."""
    images, labels = faces(identities=2)
    root = tmp_path / name
    return root, plain_pack(root, images, labels, png, magic_in=magic_in)


def test_a_bad_magic_names_the_file_and_offset(tmp_path):
    root, offsets = broken(tmp_path, "p")
    blob = bytearray((root / "train.rec").read_bytes())
    blob[offsets[3]] ^= 0xFF
    (root / "train.rec").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=f"train.rec: the record at byte offset {offsets[3]} "
                                         f"does not start with the record magic"):
        pack.open_recordio(str(root))


def test_a_truncated_record_names_the_file_and_offset(tmp_path):
    root, offsets = broken(tmp_path, "p")
    blob = (root / "train.rec").read_bytes()
    (root / "train.rec").write_bytes(blob[:-10])
    with pytest.raises(ValueError, match=f"train.rec: the record at byte offset {offsets[-1]} "
                                         f"is truncated"):
        pack.open_recordio(str(root))
    # A split record cut in its last part: found when it is read.
    root, offsets = broken(tmp_path, "split", magic_in=5)
    blob = (root / "train.rec").read_bytes()
    (root / "train.rec").write_bytes(blob[:-10])
    source = RecordIOSource(pack.open_recordio(str(root)), size=SIZE)
    with pytest.raises(ValueError, match=f"record at byte offset {offsets[5]} is truncated"):
        source[5]


def test_an_index_past_the_end_or_of_another_pack_names_the_offset(tmp_path):
    root, offsets = broken(tmp_path, "p")
    size = (root / "train.rec").stat().st_size
    (root / "train.idx").write_text((root / "train.idx").read_text() + f"6\t{size + 64}\n")
    with pytest.raises(ValueError, match=f"train.idx: key 6 points at byte offset {size + 64}, "
                                         f"past the end of .*train.rec"):
        pack.open_recordio(str(root))
    # Another pack's index: its offsets land inside this pack's records.
    other, _ = broken(tmp_path, "other", magic_in=1)
    (root / "train.idx").write_text((other / "train.idx").read_text())
    with pytest.raises(ValueError, match="train.rec: the record at byte offset [0-9]+ does not "
                                         "start with the record magic .*another pack"):
        pack.open_recordio(str(root))
    (root / "train.idx").write_text("0\t0\n1\tnot-a-number\n")
    with pytest.raises(ValueError, match="train.idx line 2: expected 'key<TAB>byte offset'"):
        pack.open_recordio(str(root))


def test_a_label_outside_the_classes_names_the_offset(tmp_path):
    root, offsets = broken(tmp_path, "p")
    (root / "property").write_text(f"1,{SIZE},{SIZE}")  # labels 0 and 1 in the pack
    with pytest.raises(ValueError, match=f"train.rec: the record at byte offset {offsets[3]} has "
                                         f"label 1, not an identity in \\[0, 1\\).*property"):
        pack.open_recordio(str(root))
    with pytest.raises(FileNotFoundError, match="nothing.*no such folder"):
        pack.open_recordio(str(tmp_path / "nothing"))


def test_an_undecodable_image_is_skipped_with_a_warning_unless_strict(tmp_path):
    images, labels = faces(identities=2)
    entries = [(k, payload(float(labels[k]), b"garbage" if k == 1 else png(images[k])))
               for k in range(len(images))]
    offsets = write_pack(tmp_path / "p", entries, num_classes=2, header=False)
    records_ = pack.open_recordio(str(tmp_path / "p"))
    with pytest.warns(SkippedImageWarning, match=f"byte offset {offsets[1]}.*byte offset "
                                                 f"{offsets[2]} of the same identity"):
        record = RecordIOSource(records_, size=SIZE)[1]
    np.testing.assert_array_equal(record["image"], images[2])
    assert record["label"] == 0
    with pytest.raises(ImageDecodeError, match=f"train.rec record at byte offset {offsets[1]}"):
        RecordIOSource(records_, size=SIZE, strict=True)[1]


@pytest.mark.parametrize("layout", [insightface_pack, plain_pack])
def test_training_two_steps_on_each_layout(tmp_path, layout):
    images, labels = faces(identities=4, per_identity=5)
    layout(tmp_path / "p", images, labels, jpeg, magic_in=2)
    config = tiny_config(total_steps=2, checkpoint_every_steps=2, log_every_steps=1)
    config.dataset.update(name="recordio", root=str(tmp_path / "p"), test_images=1)
    data = sources.get_dataset(config)
    assert (data.num_classes, len(data.train), len(data.test)) == (4, 16, 4)
    np.testing.assert_array_equal(data.test.labels(), [0, 1, 2, 3])
    train(config, str(tmp_path / "w"))
    rows = workdir_files.read_metrics(str(tmp_path / "w"))
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)


def test_the_conversion_reads_back_equal_through_the_arrayrecord_source(tmp_path):
    images, labels = faces(identities=3, per_identity=3)
    insightface_pack(tmp_path / "p", images, labels, jpeg, magic_in=7)
    out = run_module("jfacerec.data.pack", "--from-recordio", str(tmp_path / "p"),
                     str(tmp_path / "ar"))
    assert out.returncode == 0, out.stderr
    assert "packed 9 images of 3 identities" in out.stdout
    assert not [p for p in os.listdir(tmp_path) if ".partial" in p]
    converted = records.ArrayRecordSource(str(tmp_path / "ar"), size=SIZE)
    direct = RecordIOSource(pack.open_recordio(str(tmp_path / "p")), size=SIZE)
    assert converted.names == ["0", "1", "2"]
    np.testing.assert_array_equal(converted.labels(), direct.labels())
    for i in range(len(direct)):
        np.testing.assert_array_equal(converted[i]["image"], direct[i]["image"])
    config = tiny_config()
    config.dataset.update(name="arrayrecord", root=str(tmp_path / "ar"), test_images=1)
    assert sources.get_dataset(config).num_classes == 3
    # The options that re-encode images do not apply to a conversion.
    usage = run_module("jfacerec.data.pack", "--from-recordio", "--size", "8",
                       str(tmp_path / "p"), str(tmp_path / "ar2"))
    assert usage.returncode == 2 and "--size" in usage.stderr
