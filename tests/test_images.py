"""Decoding image files: formats, colour modes, EXIF orientation, corrupt files, the face crop."""

import io

import chex
import numpy as np
import pytest
from PIL import Image

from jfacerec.data import images


def _gradient(h=12, w=20) -> np.ndarray:
    """uint8 [h, w, 3] with distinct rows and columns, to see rotations and crops."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([y * 20, x * 12, (x + y) * 5], -1).astype(np.uint8)


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("PPM", "ppm"), ("BMP", "bmp"),
                                     ("JPEG", "jpg")])
def test_rgb_formats_decode_to_the_same_pixels(tmp_path, fmt, ext):
    pixels = _gradient()
    path = tmp_path / f"face.{ext}"
    Image.fromarray(pixels).save(path, format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    out = images.decode(str(path))
    chex.assert_shape(out, (12, 20, 3))
    assert out.dtype == np.uint8
    tolerance = 12 if fmt == "JPEG" else 0  # lossy
    assert np.abs(out.astype(int) - pixels).max() <= tolerance


def test_grey_pgm_8_and_16_bit_become_rgb(tmp_path):
    grey = np.arange(0, 240, 2, dtype=np.uint8).reshape(10, 12)
    Image.fromarray(grey).save(tmp_path / "g.pgm")
    out = images.decode(str(tmp_path / "g.pgm"))
    chex.assert_shape(out, (10, 12, 3))
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, -1))
    # 16-bit PGM (maxval 65535): scaled to 8 bits, not clipped to white.
    deep = (grey.astype(np.uint16) * 257)
    header = b"P5\n12 10\n65535\n"
    (tmp_path / "d.pgm").write_bytes(header + deep.astype(">u2").tobytes())
    np.testing.assert_array_equal(images.decode(str(tmp_path / "d.pgm"))[..., 0], grey)


def test_rgba_la_palette_and_cmyk_become_rgb():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, ..., 3] = 255  # top half opaque red, bottom half transparent -> white
    out = images.as_rgb_array(Image.fromarray(rgba, "RGBA"))
    np.testing.assert_array_equal(out[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(out[3, 3], [255, 255, 255])
    la = Image.fromarray(np.full((3, 3, 2), [90, 255], np.uint8), "LA")
    np.testing.assert_array_equal(images.as_rgb_array(la)[1, 1], [90, 90, 90])
    palette = Image.fromarray(_gradient()).convert("P")
    chex.assert_shape(images.as_rgb_array(palette), (12, 20, 3))
    cmyk = Image.new("CMYK", (5, 6), (0, 255, 255, 0))  # pure red in CMYK
    buffer = io.BytesIO()
    cmyk.save(buffer, format="JPEG", quality=100)
    out = images.decode(buffer.getvalue())
    chex.assert_shape(out, (6, 5, 3))
    assert out[..., 0].min() > 230 and out[..., 1:].max() < 25


def test_exif_orientation_is_applied(tmp_path):
    pixels = _gradient(12, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90-degree clockwise turn
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = images.decode(str(tmp_path / "r.jpg"))
    chex.assert_shape(out, (20, 12, 3))
    expected = np.rot90(pixels, k=-1)
    assert np.abs(out.astype(int) - expected).mean() < 3


@pytest.mark.parametrize("content", [b"", b"this is a text file, not a picture", "truncated"])
def test_unreadable_files_raise_an_error_naming_them(tmp_path, content):
    path = tmp_path / "broken.jpg"
    if content == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
            buffer, format="JPEG")
        content = buffer.getvalue()[:len(buffer.getvalue()) // 2]
    path.write_bytes(content)
    with pytest.raises(images.ImageDecodeError, match="broken.jpg"):
        images.decode(str(path))


def test_center_crop_and_load_face(tmp_path):
    pixels = _gradient(40, 40)
    crop = images.center_crop(pixels, 0.5)
    np.testing.assert_array_equal(crop, pixels[10:30, 10:30])
    with pytest.raises(ValueError):
        images.center_crop(pixels, 0.0)
    Image.fromarray(pixels).save(tmp_path / "f.png")
    face = images.load_face(str(tmp_path / "f.png"), crop_fraction=0.5, size=8)
    chex.assert_shape(face, (8, 8, 3))
    np.testing.assert_allclose(face.mean(axis=(0, 1)), crop.mean(axis=(0, 1)), atol=3)


def test_draft_decoding_keeps_at_least_the_requested_side(tmp_path):
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (250, 250, 3), np.uint8)).save(
        tmp_path / "big.jpg")
    small = images.decode(str(tmp_path / "big.jpg"), min_side=60)
    assert min(small.shape[:2]) >= 60 and small.shape[0] < 250


def test_as_rgb_array_accepts_arrays_and_rejects_bad_ones():
    grey = np.full((5, 6), 0.5)
    np.testing.assert_array_equal(images.as_rgb_array(grey), np.full((5, 6, 3), 128, np.uint8))
    np.testing.assert_array_equal(images.as_rgb_array(np.full((5, 6, 1), 7, np.uint8)),
                                  np.full((5, 6, 3), 7, np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        images.as_rgb_array(np.full((5, 6, 3), 7.0))
    with pytest.raises(ValueError, match="shape"):
        images.as_rgb_array(np.zeros((5, 6, 2), np.uint8))
