"""Five-point face alignment: a face warped onto the ArcFace template by a similarity transform.

Landmarks are [5, 2] (x, y) in pixel-index coordinates (pixel (0, 0)'s centre is (0, 0), as
OpenCV and the detectors use): left eye, right eye, nose tip, left and right mouth corners, "left"
meaning the left of the picture. The transform from the landmarks to the template is the
least-squares similarity (rotation, uniform scale, translation; Umeyama 1991, closed form), and
the face is resampled with Pillow's bilinear affine warp.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Sequence

import numpy as np
from PIL import Image

from jfacerec.core import storage
from jfacerec.data.folders import ImageFiles
from jfacerec.data.images import _open_rgb, as_rgb_array
from jfacerec.data.records import ImageFileSource

# The five points of a 112x112 ArcFace face (insightface's arcface_src).
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)

# Five points whose thinner spread is below this fraction of the wider one lie on a line: no
# face detector puts real eyes, nose and mouth there, and the rotation would be guesswork.
_COLLINEAR = 1e-3


def template(size: int = 112) -> np.ndarray:
    """The ArcFace template scaled to a size x size face: float64 [5, 2]."""
    if size < 1:
        raise ValueError(f"the aligned face's size must be a positive number of pixels, got {size}")
    return ARCFACE_TEMPLATE * (size / 112.0)


def check_landmarks(landmarks, image_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """landmarks as float64 [5, 2], or a one-line ValueError saying what is wrong with them: not
    [5, 2], NaN or infinite, all one point, on one line, or (given the image's [h, w, ...]
    shape) outside the image."""
    try:
        points = np.asarray(landmarks, np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"landmarks must be numbers, [5, 2] (x, y): {e}") from None
    if points.shape != (5, 2):
        raise ValueError(f"landmarks must be [5, 2] (x, y of the eyes, the nose and the mouth "
                         f"corners), got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError(f"landmarks hold NaN or infinite values: {points.tolist()}")
    spread = np.linalg.svd(points - points.mean(0), compute_uv=False)
    if spread[0] == 0.0:
        raise ValueError(f"the five landmarks are all the same point {points[0].tolist()}: not "
                         f"a detected face")
    if spread[1] < _COLLINEAR * spread[0]:
        raise ValueError(f"the five landmarks lie on one line ({points.tolist()}): not a "
                         f"detected face")
    if image_shape is not None:
        h, w = image_shape[:2]
        # Pixel i covers [i - 0.5, i + 0.5] in pixel-index coordinates.
        outside = (points < -0.5).any(1) | (points[:, 0] > w - 0.5) | (points[:, 1] > h - 0.5)
        if outside.any():
            raise ValueError(f"landmarks {points[outside].tolist()} lie outside the {w}x{h} "
                             f"image: were they detected on another image or scale?")
    return points


def similarity_transform(src, dst) -> np.ndarray:
    """The similarity (rotation, uniform scale, translation) mapping src onto dst with the least
    squared error (Umeyama's closed form): float64 [2, 3], dst ~ M[:, :2] @ src + M[:, 2].

    src, dst: [n, 2] points, n >= 2, src not all one point. Exact correspondences give the exact
    transform back.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"similarity_transform needs two [n, 2] point sets (n >= 2), got "
                         f"{src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    variance = np.mean(np.sum(src_c ** 2, axis=1))
    if variance == 0.0:
        raise ValueError("similarity_transform: the source points are all one point")
    u, s, vt = np.linalg.svd(dst_c.T @ src_c / len(src))
    # A reflection would fit better for mirrored points; a similarity must not flip.
    d = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ np.diag(d) @ vt
    scale = float(np.sum(s * d) / variance)
    return np.concatenate([scale * rotation, (dst_mean - scale * rotation @ src_mean)[:, None]],
                          axis=1)


def warp(image: np.ndarray | Image.Image, matrix: np.ndarray, size: int) -> np.ndarray:
    """The image moved by `matrix` ([2, 3], image pixel -> output pixel, pixel-index
    coordinates) into a size x size picture, bilinear; outside the image is black. uint8
    [size, size, 3]."""
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    matrix = np.asarray(matrix, np.float64)
    inverse = np.linalg.inv(matrix[:, :2])
    # Pillow maps output to input coordinates in which pixel i's centre is i + 0.5.
    offset = inverse @ (-matrix[:, 2] - 0.5) + 0.5
    coefficients = np.concatenate([inverse, offset[:, None]], axis=1).reshape(-1)
    out = picture.transform((size, size), Image.AFFINE, tuple(coefficients), Image.BILINEAR)
    return np.asarray(out)


def align(image, landmarks, size: int = 112) -> np.ndarray:
    """A face warped onto the ArcFace template (scaled by size / 112): uint8 [size, size, 3].

    image: uint8 [h, w, 3] or [h, w] (or float in [0, 1]), or a PIL image. landmarks: [5, 2]
    (x, y) of the left eye, right eye, nose, left and right mouth corners, e.g. insightface's
    `face.kps`. Landmarks that are not five distinct points of a face inside the image are a
    ValueError.
    """
    pixels = as_rgb_array(image)
    points = check_landmarks(landmarks, pixels.shape)
    return warp(pixels, similarity_transform(points, template(size)), size)


def load_aligned(data: bytes | str | os.PathLike, landmarks: np.ndarray, *, size: int,
                 name: str | None = None) -> np.ndarray:
    """Decode an encoded image (bytes or a path) and align it: uint8 [size, size, 3]."""
    picture = _open_rgb(data, name=name)
    points = check_landmarks(landmarks, (picture.height, picture.width))
    return warp(picture, similarity_transform(points, template(size)), size)


@dataclasses.dataclass(frozen=True)
class LandmarksFile:
    """A landmarks CSV read and checked: `points[image]` float64 [5, 2] and `lines[image]` (its
    line number), keyed by the image's absolute path."""

    path: str
    points: dict[str, np.ndarray]
    lines: dict[str, int]

    def lookup(self, paths: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """(landmarks [n, 5, 2], where each came from) for image paths; an image the CSV does
        not list is a ValueError naming it."""
        keys = [storage.absolute(p) for p in paths]
        if missing := [p for p, k in zip(paths, keys) if k not in self.points]:
            raise ValueError(f"{missing[0]}: no landmarks in {self.path} ({len(missing)} of "
                             f"{len(paths)} images have none); add a line path,x1,y1,...,x5,y5 "
                             f"for each image, or remove the images")
        points = np.stack([self.points[k] for k in keys]) if keys else np.zeros((0, 5, 2))
        return points, [f"{self.path} line {self.lines[k]}" for k in keys]


def read_landmarks_csv(path: str, root: str) -> LandmarksFile:
    """A CSV of lines `path,x1,y1,...,x5,y5` (an optional header line starting with `path`),
    image paths relative to `root` or absolute. A line that is not 11 fields of a path and
    numbers, repeats an image or holds landmarks that are not a face (see check_landmarks) is a
    ValueError naming the file and line."""
    if not storage.isfile(path):
        raise FileNotFoundError(f"{path}: no such landmarks file (a CSV path,x1,y1,...,x5,y5); "
                                f"check dataset.landmarks or --landmarks")
    points: dict[str, np.ndarray] = {}
    lines: dict[str, int] = {}
    with storage.open(path, newline="") as f:
        for number, row in enumerate(csv.reader(f), 1):
            if not row or (number == 1 and row[0].strip().lower() == "path"):
                continue
            where = f"{path} line {number}"
            if len(row) != 11:
                raise ValueError(f"{where}: expected 11 fields path,x1,y1,...,x5,y5, got "
                                 f"{len(row)}")
            try:
                values = np.array([float(v) for v in row[1:]]).reshape(5, 2)
                values = check_landmarks(values)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            image = storage.absolute(storage.join(root, row[0].strip()))
            if image in lines:
                raise ValueError(f"{where}: {row[0]} already has landmarks on line "
                                 f"{lines[image]}; keep one line per image")
            points[image], lines[image] = values, number
    return LandmarksFile(path, points, lines)


class AlignedFileSource(ImageFileSource):
    """Image files aligned by their landmarks while decoding.

    landmarks: [len(files), 5, 2], record i's in row i. origins: where each record's landmarks
    came from ("faces.csv line 7"), named with the file when aligning it fails.
    """

    def __init__(self, files: ImageFiles, landmarks: np.ndarray, *, size: int,
                 cache: bool = False, origins: Sequence[str] | None = None):
        landmarks = np.asarray(landmarks, np.float64)
        if landmarks.shape != (len(files), 5, 2):
            raise ValueError(f"landmarks for {len(files)} images must be [{len(files)}, 5, 2], "
                             f"got shape {landmarks.shape}")
        super().__init__(files, size=size, cache=cache)
        self.landmarks = landmarks
        self.origins = tuple(origins) if origins is not None else None

    def _decode(self, index: int) -> np.ndarray:
        """Record `index`'s face aligned by its landmarks, uint8 [size, size, 3]."""
        path = self.files.paths[index]
        try:
            return load_aligned(path, self.landmarks[index], size=self.size, name=path)
        except ValueError as e:
            where = f" (landmarks of {self.origins[index]})" if self.origins else ""
            raise ValueError(f"{path}{where}: {e}") from e

    def __repr__(self) -> str:
        return f"AlignedFileSource({self.files.summary()})"
