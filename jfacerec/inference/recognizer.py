"""The Python API: a trained model as an object that embeds, verifies and identifies faces.

    import jfacerec
    model = jfacerec.load("workdirs/demo")
    emb = model.embed(["a.jpg", "b.jpg"])           # float32 [2, dim], unit norm
    score, same = model.verify("a.jpg", "b.jpg")     # cosine, and same person at the threshold
    matches = model.identify(["q.jpg"], "gallery.npz")

Images may be file paths, PIL images or arrays (uint8, or float in [0, 1]; grey or RGB). They are
cropped to the face and resized exactly as in training (the workdir's config.json).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import jax
import numpy as np

from jfacerec.core import workdir as workdir_files
from jfacerec.core.checkpoint import Checkpointer
from jfacerec.data import images as image_io
from jfacerec.data.folders import ImageFiles
from jfacerec.data.records import ArraySource, ImageFileSource, Source
from jfacerec.inference.gallery import Gallery, Match
from jfacerec.inference.restore import Restored, make_embed_fn, make_logits_fn, restore, run_over

ImageLike = Any  # a path, a PIL image, or an array [h, w] / [h, w, 1|3|4]


def fingerprint(params: Any) -> str:
    """A hash of every parameter's path, shape, dtype and values: equal exactly for the same
    weights, so embeddings from two models are never mixed up."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}{array.shape}{array.dtype}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


class FaceRecognizer:
    """A trained model restored from a workdir (see `load`)."""

    def __init__(self, workdir: str, *, threshold: float | None = None, step: int | None = None,
                 batch_size: int = 64):
        self.workdir = workdir
        self.config = workdir_files.read_config(workdir)
        meta = Checkpointer(workdir, read_only=True).meta(step)
        kernel = next(shape for key, shape in meta["param_shapes"].items()
                      if key.startswith("['classifier']") and key.endswith("['kernel']"))
        self.num_classes = kernel[-1]
        self._restored: Restored = restore(self.config, workdir, self.num_classes, step=step)
        self.step = self._restored.step
        self.image_size = int(self.config.image_size)
        self.crop_fraction = float(self.config.dataset.crop_fraction)
        self.flip = bool(self.config.eval.flip)
        self.batch_size = batch_size
        self.embedding_dim = int(self._restored.model.embedding_dim)
        self.fingerprint = fingerprint(self._restored.variables["params"])
        self.threshold = threshold if threshold is not None else self._calibrated_threshold()
        self._embed = make_embed_fn(self._restored.model, flip=self.flip)
        self._logits = make_logits_fn(self._restored.model, flip=self.flip)
        self.class_names = workdir_files.read_identities(workdir)

    def _calibrated_threshold(self) -> float | None:
        results = workdir_files.read_eval_metrics(self.workdir)
        return None if results is None else results.get("verification/threshold")

    def __repr__(self) -> str:
        return (f"FaceRecognizer({self.config.model.name}, step {self.step}, "
                f"dim {self.embedding_dim}, fingerprint {self.fingerprint})")

    # -- Embeddings ------------------------------------------------------------------------------

    def preprocess(self, image: ImageLike) -> np.ndarray:
        """One image -> uint8 [size, size, 3], cropped to the face as in training."""
        if isinstance(image, (str, os.PathLike)):
            return image_io.load_face(image, crop_fraction=self.crop_fraction,
                                      size=self.image_size)
        return image_io.crop_face(image_io.as_rgb_array(image), self.crop_fraction,
                                  self.image_size)

    def embed(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Unit-norm embeddings float32 [n, dim] (flip-averaged when the config says so).

        A single image gives [1, dim]; a uint8 array [n, h, w, 3] is n images.
        """
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            return np.zeros((0, self.embedding_dim), np.float32)
        if all(isinstance(x, (str, os.PathLike)) for x in images):
            return self.embed_files([os.fspath(x) for x in images])
        return self._run_images(self._embed, images, "embed")

    def _run(self, fn, source: Source, desc: str) -> np.ndarray:
        """fn over every record of `source`, in fixed-size batches (one compilation)."""
        outputs, _ = run_over(fn, self._restored.variables, source, batch_size=self.batch_size,
                              image_size=self.image_size, mesh=self._restored.mesh, desc=desc)
        return outputs

    def _run_images(self, fn, images: Sequence[ImageLike], desc: str) -> np.ndarray:
        """fn over in-memory images (or a mix with paths), preprocessed one by one."""
        return self._run(fn, ArraySource(np.stack(self._preprocess_all(images))), desc)

    def _preprocess_all(self, images: Sequence[ImageLike]) -> list[np.ndarray]:
        """`preprocess` of each image; a ValueError names the position of the image it is about,
        which an array's error cannot do by itself."""
        faces = []
        for i, image in enumerate(images):
            try:
                faces.append(self.preprocess(image))
            except ValueError as e:
                raise ValueError(f"image {i} of {len(images)}: {e}") from e
        return faces

    def _run_files(self, fn, paths: Sequence[str], desc: str) -> np.ndarray:
        """fn over image files, decoded in parallel by the input pipeline."""
        files = ImageFiles("", (), tuple(paths), np.zeros(len(paths), np.int32))
        source = ImageFileSource(files, size=self.image_size, crop_fraction=self.crop_fraction)
        return self._run(fn, source, desc)

    def embed_files(self, paths: Sequence[str], *, desc: str = "embed") -> np.ndarray:
        """Embeddings float32 [n, dim] of image files."""
        return self._run_files(self._embed, paths, desc)

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
                 threshold: float | None = None, k: int = 1) -> list[Match]:
        """The best enrolled identity of each image, UNKNOWN below the threshold (the given one,
        else the gallery's, else the calibrated verification threshold). `gallery`: a Gallery or
        the path of a gallery file made with this model."""
        if isinstance(gallery, (str, os.PathLike)):
            gallery = Gallery.load(os.fspath(gallery))
        gallery.check_compatible(self)
        threshold = gallery.resolve_threshold(threshold, self.threshold)
        return gallery.identify(self.embed(images), k=k, threshold=threshold)


def load(workdir: str, *, threshold: float | None = None, step: int | None = None,
         batch_size: int = 64) -> FaceRecognizer:
    """The model trained in `workdir` (newest checkpoint, or `step`)."""
    return FaceRecognizer(workdir, threshold=threshold, step=step, batch_size=batch_size)
