"""The gallery of known people: enrolled embeddings, saved without pickle, and the 1:N search.

A gallery file is a NumPy .npz (no pickle): identity names, unit-norm embeddings, the fingerprint of
the model that made them, their dimension and a format version. A gallery is refused by a model
with another fingerprint or dimension.

Enrolled with `wccn` (a shrinkage), a gallery also holds the WCCN whitening (inference/wccn.py)
fitted on its own enrolled images: its rows are whitened, and so is every query before the search.
Such a file has format version 2, so that a reader of version 1 refuses it instead of matching
unwhitened queries against whitened rows.

The search runs on one device for a gallery of up to `SHARD_ABOVE` rows, and split by rows over
every device of every process (`matcher.shard_gallery`) above it, with the same answers: the same
scores, so one threshold means the same thing either way (a query scoring below it is UNKNOWN).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import zipfile
from typing import Protocol, Sequence

import jax
import ml_collections
import numpy as np

from jfacerec.core import parallel, storage
from jfacerec.core.atomic import atomic_open
from jfacerec.data.folders import ImageFiles, scan_flat_folder, scan_identity_folders
from jfacerec.inference import matcher
from jfacerec.inference.wccn import Wccn
from jfacerec.inference.wccn import apply as whiten
from jfacerec.inference.wccn import fit as fit_whitening

# The label of a query that matches no enrolled identity (the HW2P2 course's convention).
UNKNOWN = "n000000"

# Galleries of more rows than this (identities with keep="mean", images with keep="all") are
# searched split by rows over every device; smaller ones on one device. 65,536 x 512 float32 rows
# are 128 MiB, at home on any device, and split 8 ways each device would search two 4,096-row
# chunks (matcher.top_k_cosine's default): the split would save little memory and add a gather and
# a merge. The answers are the same either way (tests/test_gallery_sharded.py).
SHARD_ABOVE = 65_536


@dataclasses.dataclass(frozen=True)
class Match:
    """The best enrolled identity for a query: `name` is UNKNOWN below the threshold."""

    name: str
    score: float
    candidates: tuple[tuple[str, float], ...]  # the top-k (name, score), best first

    @property
    def known(self) -> bool:
        return self.name != UNKNOWN


class Embedder(Protocol):
    """What enrolling needs of a model: `jfacerec.load(workdir)` is one."""

    workdir: str
    config: ml_collections.ConfigDict
    step: int
    fingerprint: str
    embedding_dim: int

    def embed_files(self, paths: Sequence[str], *, landmarks: np.ndarray | None = None,
                    desc: str = "embed") -> np.ndarray: ...


FORMAT_VERSION = 1
# the version of a gallery that holds a WCCN whitening (and the newest this module reads)
WHITENED_FORMAT_VERSION = 2
KEEP = ("mean", "all")


@dataclasses.dataclass(frozen=True)
class Gallery:
    """Enrolled identities. names: str [g] (one row per identity with keep="mean", per image with
    keep="all"); embeddings: float32 [g, dim], unit norm (whitened by `whitening` when there is
    one, which `identify` then applies to the queries too)."""

    names: np.ndarray
    embeddings: np.ndarray
    fingerprint: str
    model: str
    keep: str
    threshold: float | None = None
    workdir: str = ""
    whitening: Wccn | None = None

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @property
    def identities(self) -> list[str]:
        return sorted(set(self.names.tolist()))

    def save(self, path: str) -> None:
        buffer = io.BytesIO()
        whitening = ({} if self.whitening is None else
                     dict(wccn_mean=np.asarray(self.whitening.mean, np.float64),
                          wccn_transform=np.asarray(self.whitening.transform, np.float64)))
        version = FORMAT_VERSION if self.whitening is None else WHITENED_FORMAT_VERSION
        np.savez(buffer, format_version=np.int64(version), names=self.names.astype(str),
                 embeddings=self.embeddings.astype(np.float32), dim=np.int64(self.dim),
                 fingerprint=np.str_(self.fingerprint), model=np.str_(self.model),
                 keep=np.str_(self.keep), workdir=np.str_(self.workdir),
                 threshold=np.float64(np.nan if self.threshold is None else self.threshold),
                 **whitening)
        with atomic_open(path, "wb") as f:
            f.write(buffer.getvalue())

    @classmethod
    def load(cls, path: str) -> Gallery:
        """Reads and validates a gallery file (keys, version, shapes, values): a file that is
        not one `save` wrote whole is a ValueError saying to enroll again, never garbage
        matches."""
        data = _read_npz(path)
        required = {"format_version", "names", "embeddings", "dim", "fingerprint", "model", "keep"}
        if missing := required - set(data):
            raise ValueError(f"{path}: not a gallery file (missing {sorted(missing)}); make one "
                             f"with python -m jfacerec.gallery enroll")
        version = _integer(data, "format_version", path)
        if version not in (FORMAT_VERSION, WHITENED_FORMAT_VERSION):
            raise ValueError(f"{path} has gallery format version {version}; this jfacerec reads "
                             f"versions {FORMAT_VERSION} and {WHITENED_FORMAT_VERSION}: enroll "
                             f"again")
        names, embeddings, dim = data["names"], data["embeddings"], _integer(data, "dim", path)
        if embeddings.ndim != 2 or embeddings.shape[1] != dim or names.shape != (len(embeddings),):
            raise ValueError(f"{path}: inconsistent shapes (names {names.shape}, embeddings "
                             f"{embeddings.shape}, dim {dim}); enroll again")
        if not len(names):
            raise ValueError(f"{path}: the gallery is empty (no enrolled identity); enroll again")
        if not np.issubdtype(embeddings.dtype, np.floating) or not np.isfinite(embeddings).all():
            raise ValueError(f"{path}: the gallery's embeddings are not all finite numbers (NaN "
                             f"or infinite); enroll again")
        threshold = float(data["threshold"]) if "threshold" in data else float("nan")
        whitening = _whitening(data, path, dim) if version == WHITENED_FORMAT_VERSION else None
        return cls(names=names.astype(str), embeddings=embeddings.astype(np.float32),
                   fingerprint=str(data["fingerprint"]), model=str(data["model"]),
                   keep=str(data["keep"]), threshold=None if np.isnan(threshold) else threshold,
                   workdir=str(data.get("workdir", "")), whitening=whitening)

    def check_compatible(self, recognizer: Embedder) -> None:
        """Raises ValueError unless the gallery was enrolled by this very model."""
        if self.dim != recognizer.embedding_dim:
            raise ValueError(f"the gallery holds {self.dim}-dimensional embeddings and the model "
                             f"in {recognizer.workdir} makes {recognizer.embedding_dim}-"
                             f"dimensional ones: enroll the gallery again with this model")
        if self.fingerprint != recognizer.fingerprint:
            raise ValueError(f"the gallery was enrolled by another model (fingerprint "
                             f"{self.fingerprint}, {self.model}) than the one in "
                             f"{recognizer.workdir} ({recognizer.fingerprint}, step "
                             f"{recognizer.step}): enroll the gallery again with this model")

    def resolve_threshold(self, given: float | None, fallback: float | None) -> float:
        """The given threshold, else the gallery's, else `fallback` (the model's calibrated
        cosine threshold), which does not hold for whitened scores."""
        for threshold in (given, self.threshold):
            if threshold is not None:
                return float(threshold)
        if self.whitening is not None:
            raise ValueError("no threshold for unknown queries: the gallery is whitened by WCCN, "
                             "so the model's calibrated cosine threshold does not apply; pass "
                             "--threshold (threshold=) or enroll with one")
        if fallback is not None:
            return float(fallback)
        raise ValueError("no threshold for unknown queries: pass --threshold (threshold=), "
                         "enroll with one, or run python -m jfacerec.evaluate on the workdir")

    def search_devices(self) -> int:
        """How many devices `identify` searches on: every device of every process above
        `SHARD_ABOVE` rows, else one."""
        return 1 if len(self.embeddings) <= SHARD_ABOVE else jax.device_count()

    def searched(self) -> np.ndarray | matcher.ShardedGallery:
        """The embeddings as `matcher.top_k_cosine` searches them: split over the
        `search_devices()` devices (jax.devices()) when there are several, else as they are."""
        if self.search_devices() == 1:
            return self.embeddings
        return matcher.shard_gallery(self.embeddings, parallel.make_mesh())

    def identify(self, queries: np.ndarray, *, k: int = 1, threshold: float) -> list[Match]:
        """queries: unit-norm float32 [n, dim] -> the best k distinct identities of each.

        With several processes, every process passes the same queries and gets every match."""
        if self.whitening is not None:
            queries = whiten(self.whitening, queries)
        counts = np.unique(self.names, return_counts=True)[1]
        rows = min(len(self.names), k * int(counts.max()))  # enough rows for k distinct names
        scores, indices = matcher.top_k_cosine(queries, self.searched(), k=rows)
        scores, indices = np.asarray(scores), np.asarray(indices)
        matches = []
        for row_scores, row_indices in zip(scores, indices):
            candidates: dict[str, float] = {}
            for s, i in zip(row_scores, row_indices):
                candidates.setdefault(str(self.names[i]), float(s))
            best = list(candidates.items())[:k]
            name, score = best[0]
            matches.append(Match(name if score >= threshold else UNKNOWN, score, tuple(best)))
        return matches


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of a .npz file, read without pickle."""
    if not storage.isfile(path):
        raise FileNotFoundError(f"{path}: no such gallery file; make one with "
                                f"python -m jfacerec.gallery enroll")
    data = io.BytesIO(storage.read_bytes(path))
    not_a_gallery = (f"{path}: not a gallery file, or a truncated one (not a whole .npz archive); "
                     f"enroll again with python -m jfacerec.gallery enroll")
    if not zipfile.is_zipfile(data):
        raise ValueError(not_a_gallery)
    try:
        with np.load(data, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        # numpy's own message would suggest allow_pickle=True, which a gallery never needs.
        raise ValueError(not_a_gallery) from e


def _whitening(data: dict[str, np.ndarray], path: str, dim: int) -> Wccn:
    """The WCCN of a version-2 gallery file, its shapes and values checked."""
    if missing := {"wccn_mean", "wccn_transform"} - set(data):
        raise ValueError(f"{path}: a whitened gallery (format version {WHITENED_FORMAT_VERSION}) "
                         f"without its whitening (missing {sorted(missing)}); enroll again")
    mean, transform = data["wccn_mean"], data["wccn_transform"]
    if mean.shape != (dim,) or transform.shape != (dim, dim):
        raise ValueError(f"{path}: the whitening's shapes (mean {mean.shape}, transform "
                         f"{transform.shape}) do not fit {dim}-dimensional embeddings; enroll "
                         f"again")
    if not all(np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all()
               for a in (mean, transform)):
        raise ValueError(f"{path}: the whitening is not all finite numbers; enroll again")
    return Wccn(mean.astype(np.float64), transform.astype(np.float64))


def _integer(data: dict[str, np.ndarray], key: str, path: str) -> int:
    value = data[key]
    if value.shape != () or not np.issubdtype(value.dtype, np.integer):
        raise ValueError(f"{path}: not a gallery file ({key} is a {value.dtype} array of shape "
                         f"{value.shape}, not an integer); enroll again")
    return int(value)


def enroll(recognizer: Embedder, files: ImageFiles, *, keep: str = "mean",
           threshold: float | None = None, landmarks: np.ndarray | None = None,
           wccn: float = 0.0) -> Gallery:
    """Embeds every image of an identity-folder scan (aligned by landmarks [n, 5, 2], one per
    file, if given); keeps each identity's normalised mean embedding, or every embedding. With
    `wccn` (a shrinkage in (0, 1]; 0: off), whitened first by WCCN fitted on these images."""
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
    embeddings = recognizer.embed_files(list(files.paths), landmarks=landmarks, desc="enroll")
    return from_embeddings(recognizer, files, embeddings, keep=keep, threshold=threshold,
                           wccn=wccn)


def from_embeddings(recognizer: Embedder, files: ImageFiles, embeddings: np.ndarray, *,
                    keep: str = "mean", threshold: float | None = None,
                    wccn: float = 0.0) -> Gallery:
    """`enroll` of embeddings [len(files), dim] the caller made of `files` with `recognizer`."""
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
    if len(embeddings) != len(files.paths):
        raise ValueError(f"{len(embeddings)} embeddings for {len(files.paths)} files")
    whitening = None
    if wccn:
        whitening = fit_whitening(embeddings, files.labels, wccn)
        embeddings = whiten(whitening, embeddings)
    names = np.array(files.names)[files.labels]
    if keep == "mean":
        sums = np.zeros((len(files.names), embeddings.shape[1]), np.float64)
        np.add.at(sums, files.labels, embeddings)
        embeddings = (sums / np.linalg.norm(sums, axis=1, keepdims=True)).astype(np.float32)
        names = np.array(files.names)
    return Gallery(names=names.astype(str), embeddings=embeddings,
                   fingerprint=recognizer.fingerprint, model=recognizer.config.model.name,
                   keep=keep, threshold=threshold, workdir=storage.absolute(recognizer.workdir),
                   whitening=whitening)


def query_files(root: str, *, strict: bool) -> tuple[ImageFiles, list[str]]:
    """(files, ids): a flat folder of queries, or an identity tree (labelled queries); ids are
    paths relative to `root`."""
    root = storage.absolute(root)
    has_images = any(storage.isfile(storage.join(root, n)) for n in storage.listdir(root)) \
        if storage.isdir(root) else True
    files = (scan_flat_folder(root, strict=strict) if has_images
             else scan_identity_folders(root, strict=strict))
    return files, [storage.relative(p, root) for p in files.paths]


def write_matches(path: str, ids: list[str], matches: list[Match], k: int) -> None:
    with atomic_open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["id", "label", "score"] + [c for r in range(2, k + 1)
                                                 for c in (f"label_{r}", f"score_{r}")])
        for query_id, m in zip(ids, matches):
            extra = [v for name, score in m.candidates[1:k] for v in (name, f"{score:.6f}")]
            out.writerow([query_id, m.name, f"{m.score:.6f}"] + extra)
