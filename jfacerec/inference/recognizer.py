"""The Python API: a trained model as an object that embeds, verifies and identifies faces.

    import jfacerec
    model = jfacerec.load("workdirs/demo")
    emb = model.embed(["a.jpg", "b.jpg"])           # float32 [2, dim], unit norm
    score, same = model.verify("a.jpg", "b.jpg")     # cosine, and same person at the threshold
    matches = model.identify(["q.jpg"], "gallery.npz")
    emb = model.embed(["a.jpg"], landmarks=kps)      # aligned by five points [n, 5, 2] first

Images may be file paths, PIL images or arrays (uint8, or float in [0, 1]; grey or RGB). They are
cropped to the face and resized exactly as in training (the workdir's config.json), or, given
their landmarks, aligned to the ArcFace template at the model's image size
(jfacerec/data/align.py).

In a multi-process run (`jax.distributed`, see `core.parallel.maybe_initialize_distributed`), the
model runs on every device of every process: every process makes the same calls with the same
images, each computes its own devices' rows of every batch, and each gets every result.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import jax
import numpy as np

from jfacerec.core import workdir as workdir_files
from jfacerec.core.checkpoint import select_step
from jfacerec.data import images as image_io
from jfacerec.data.align import AlignedFileSource, align, load_aligned
from jfacerec.data.folders import ImageFiles
from jfacerec.data.records import ArraySource, ImageFileSource, Source
from jfacerec.inference.gallery import Gallery, Match
from jfacerec.inference.restore import Restored, make_features_fn, make_logits_fn, restore
from jfacerec.inference.restore import run_over, to_host

ImageLike = Any  # a path, a PIL image, or an array [h, w] / [h, w, 1|3|4]


def fingerprint(params: Any) -> str:
    """A hash of every parameter's path, shape, dtype and values: equal exactly for the same
    weights, so embeddings from two models are never mixed up."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = to_host(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}{array.shape}{array.dtype}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def _landmarks_for(landmarks, n: int) -> np.ndarray | None:
    """landmarks as float64 [n, 5, 2] (None stays None), or a ValueError on a wrong shape."""
    if landmarks is None:
        return None
    points = np.asarray(landmarks, np.float64)
    if points.shape != (n, 5, 2):
        raise ValueError(f"landmarks for {n} images must be [{n}, 5, 2] (x, y of five points "
                         f"per face), got shape {points.shape}")
    return points


class FaceRecognizer:
    """A trained model restored from a workdir (see `load`)."""

    def __init__(self, workdir: str, *, threshold: float | None = None, step: int | None = None,
                 checkpoint: str = "latest", batch_size: int = 64):
        self.workdir = workdir
        self.config = workdir_files.read_config(workdir)
        step = select_step(workdir, step=step, checkpoint=checkpoint)
        self._restored: Restored = restore(self.config, workdir, step=step)
        self.num_classes = self._restored.model.num_classes
        self.step = self._restored.step
        self.image_size = int(self.config.image_size)
        self.crop_fraction = float(self.config.dataset.crop_fraction)
        self.flip = bool(self.config.eval.flip)
        self.batch_size = batch_size
        self.embedding_dim = int(self._restored.model.embedding_dim)
        self.fingerprint = fingerprint(self._restored.variables["params"])
        self.threshold = threshold if threshold is not None else self._calibrated_threshold()
        model = self._restored.model
        self._embed = make_features_fn(model, flip=self.flip, normalize=True)
        self._logits = make_logits_fn(model, flip=self.flip)
        self._features = {f: make_features_fn(model, flip=f, normalize=False) for f in (False, True)}
        self.class_names = workdir_files.read_identities(workdir)

    def _calibrated_threshold(self) -> float | None:
        results = workdir_files.read_eval_metrics(self.workdir)
        return None if results is None else results.get("verification/threshold")

    def __repr__(self) -> str:
        return (f"FaceRecognizer({self.config.model.name}, step {self.step}, "
                f"dim {self.embedding_dim}, fingerprint {self.fingerprint})")

    # -- Embeddings ------------------------------------------------------------------------------

    def preprocess(self, image: ImageLike, landmarks: np.ndarray | None = None) -> np.ndarray:
        """One image -> uint8 [size, size, 3], cropped to the face as in training, or aligned by
        its landmarks [5, 2]."""
        if landmarks is not None:
            if isinstance(image, (str, os.PathLike)):
                return load_aligned(image, landmarks, size=self.image_size)
            return align(image, landmarks, self.image_size)
        if isinstance(image, (str, os.PathLike)):
            return image_io.load_face(image, crop_fraction=self.crop_fraction,
                                      size=self.image_size)
        return image_io.crop_face(image_io.as_rgb_array(image), self.crop_fraction,
                                  self.image_size)

    def embed(self, images: ImageLike | Sequence[ImageLike],
              landmarks: np.ndarray | None = None) -> np.ndarray:
        """Unit-norm embeddings float32 [n, dim] (flip-averaged when the config says so).

        A single image gives [1, dim]; a uint8 array [n, h, w, 3] is n images. landmarks:
        [n, 5, 2] (x, y) per image (a detector's five points: eyes, nose, mouth corners); each
        image is then aligned to the ArcFace template (jfacerec.align) instead of cropped.
        """
        images = _as_list(images)
        if landmarks is not None and len(images) == 1 and np.ndim(landmarks) == 2:
            landmarks = np.asarray(landmarks)[None]
        landmarks = _landmarks_for(landmarks, len(images))
        if not images:
            return np.zeros((0, self.embedding_dim), np.float32)
        if all(isinstance(x, (str, os.PathLike)) for x in images):
            return self.embed_files([os.fspath(x) for x in images], landmarks=landmarks)
        return self._run_images(self._embed, images, "embed", landmarks)

    def _run(self, fn, source: Source, desc: str) -> np.ndarray:
        """fn over every record of `source`, in fixed-size batches (one compilation)."""
        outputs, _ = run_over(fn, self._restored.variables, source, batch_size=self.batch_size,
                              image_size=self.image_size, mesh=self._restored.mesh, desc=desc)
        return outputs

    def _run_images(self, fn, images: Sequence[ImageLike], desc: str,
                    landmarks: np.ndarray | None = None) -> np.ndarray:
        """fn over in-memory images (or a mix with paths), preprocessed one by one."""
        return self._run(fn, ArraySource(np.stack(self._preprocess_all(images, landmarks))), desc)

    def _preprocess_all(self, images: Sequence[ImageLike],
                        landmarks: np.ndarray | None = None) -> list[np.ndarray]:
        """`preprocess` of each image; a ValueError names the position of the image it is about,
        which an array's error cannot do by itself."""
        faces = []
        for i, image in enumerate(images):
            try:
                faces.append(self.preprocess(image, None if landmarks is None else landmarks[i]))
            except ValueError as e:
                raise ValueError(f"image {i} of {len(images)}: {e}") from e
        return faces

    def _run_files(self, fn, paths: Sequence[str], desc: str,
                   landmarks: np.ndarray | None = None) -> np.ndarray:
        """fn over image files, decoded (and aligned, given landmarks [n, 5, 2]) in parallel by
        the input pipeline."""
        files = ImageFiles("", (), tuple(paths), np.zeros(len(paths), np.int32))
        landmarks = _landmarks_for(landmarks, len(paths))
        if landmarks is None:
            source = ImageFileSource(files, size=self.image_size, crop_fraction=self.crop_fraction)
        else:
            source = AlignedFileSource(files, landmarks, size=self.image_size)
        return self._run(fn, source, desc)

    def embed_files(self, paths: Sequence[str], *, landmarks: np.ndarray | None = None,
                    desc: str = "embed") -> np.ndarray:
        """Embeddings float32 [n, dim] of image files (aligned by landmarks [n, 5, 2] if
        given)."""
        return self._run_files(self._embed, paths, desc, landmarks)

    def features_files(self, paths: Sequence[str], *, landmarks: np.ndarray | None = None,
                       flip: bool = True, desc: str = "features") -> np.ndarray:
        """Embeddings float32 [n, dim] of image files before normalisation: embed(x) +
        embed(flip_lr(x)) with `flip` (aligned by landmarks [n, 5, 2] if given)."""
        return self._run_files(self._features[flip], paths, desc, landmarks)

    # -- The three jobs --------------------------------------------------------------------------

    def verify(self, image_a: ImageLike, image_b: ImageLike,
               threshold: float | None = None) -> tuple[float, bool]:
        """(cosine score, same person?) at `threshold`, or the one calibrated by evaluate."""
        threshold = self.threshold if threshold is None else threshold
        if threshold is None:
            raise ValueError(f"no calibrated threshold for {self.workdir}: run python -m "
                             f"jfacerec.evaluate on it, or pass threshold= to load() or verify()")
        a, b = self.embed([image_a, image_b])
        score = float(np.dot(a, b))
        return score, score >= threshold

    def classify(self, images: ImageLike | Sequence[ImageLike]) -> list[str]:
        """The training identity of each image (closed set), by name where names are known."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if all(isinstance(x, (str, os.PathLike)) for x in images):
            return self.classify_files([os.fspath(x) for x in images])
        return self._names(self._run_images(self._logits, images, "classify"))

    def classify_files(self, paths: Sequence[str], *, desc: str = "classify") -> list[str]:
        return self._names(self._run_files(self._logits, paths, desc))

    def _names(self, logits: np.ndarray) -> list[str]:
        best = np.argmax(logits, -1)
        return [self.class_names[i] if self.class_names else str(i) for i in best]

    def identify(self, images: ImageLike | Sequence[ImageLike], gallery, *,
                 threshold: float | None = None, k: int = 1,
                 landmarks: np.ndarray | None = None) -> list[Match]:
        """The best enrolled identity of each image, UNKNOWN below the threshold (the given one,
        else the gallery's, else the calibrated verification threshold). `gallery`: a Gallery or
        the path of a gallery file made with this model. landmarks: as for `embed`. A gallery of
        more than `gallery.SHARD_ABOVE` rows is searched split over every device."""
        if isinstance(gallery, (str, os.PathLike)):
            gallery = Gallery.load(os.fspath(gallery))
        gallery.check_compatible(self)
        threshold = gallery.resolve_threshold(threshold, self.threshold)
        return gallery.identify(self.embed(images, landmarks), k=k, threshold=threshold)


def _as_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    """images as a list: a uint8 array [n, h, w, 3] is n images, anything else not a list one."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    return list(images) if isinstance(images, (list, tuple)) else [images]


def load(workdir: str, *, threshold: float | None = None, step: int | None = None,
         checkpoint: str = "latest", batch_size: int = 64) -> FaceRecognizer:
    """The model trained in `workdir`: its newest intact checkpoint, checkpoint `step`, or with
    `checkpoint="best"` the best by validation during training (config.eval.every_steps)."""
    return FaceRecognizer(workdir, threshold=threshold, step=step, checkpoint=checkpoint,
                          batch_size=batch_size)
