"""python -m jfacerec.gallery enroll | identify: 1:N search of queries against known people.

    python -m jfacerec.gallery enroll --workdir DIR --images KNOWN_ROOT --out gallery.npz \
        [--keep mean|all] [--threshold T]
    python -m jfacerec.gallery identify --gallery gallery.npz --images QUERY_DIR \
        --out matches.csv [--threshold T] [--top-k K] [--workdir DIR]

KNOWN_ROOT is an identity-folder tree (`<name>/<image>`). QUERY_DIR is a folder of images, or a
tree of identity folders (then accuracy is reported: a query whose name is not enrolled should come
out unknown). matches.csv: `id,label,score` (label `n000000` for unknown) and, with --top-k K > 1,
`label_2,score_2 ... label_K,score_K`.

A gallery file is a NumPy .npz (no pickle): identity names, unit-norm embeddings, the fingerprint of
the model that made them, their dimension and a format version. A gallery is refused by a model
with another fingerprint or dimension.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os

import numpy as np
from absl import app, flags, logging

from jfacerec import matcher
from jfacerec.api import UNKNOWN, FaceRecognizer, Match, load
from jfacerec.atomic import atomic_open
from jfacerec.cli import exit_on_user_error, strict_flag
from jfacerec.data.folders import ImageFiles, scan_flat_folder, scan_identity_folders

FORMAT_VERSION = 1
KEEP = ("mean", "all")


@dataclasses.dataclass(frozen=True)
class Gallery:
    """Enrolled identities. names: str [g] (one row per identity with keep="mean", per image with
    keep="all"); embeddings: float32 [g, dim], unit norm."""

    names: np.ndarray
    embeddings: np.ndarray
    fingerprint: str
    model: str
    keep: str
    threshold: float | None = None
    workdir: str = ""

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @property
    def identities(self) -> list[str]:
        return sorted(set(self.names.tolist()))

    def save(self, path: str) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, format_version=np.int64(FORMAT_VERSION), names=self.names.astype(str),
                 embeddings=self.embeddings.astype(np.float32), dim=np.int64(self.dim),
                 fingerprint=np.str_(self.fingerprint), model=np.str_(self.model),
                 keep=np.str_(self.keep), workdir=np.str_(self.workdir),
                 threshold=np.float64(np.nan if self.threshold is None else self.threshold))
        with atomic_open(path, "wb") as f:
            f.write(buffer.getvalue())

    @classmethod
    def load(cls, path: str) -> Gallery:
        """Reads and validates a gallery file (version, keys, shapes)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such gallery file; make one with "
                                    f"python -m jfacerec.gallery enroll")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (ValueError, OSError) as e:
            raise ValueError(f"{path}: not a gallery file ({e})") from None
        required = {"format_version", "names", "embeddings", "dim", "fingerprint", "model", "keep"}
        if missing := required - set(data):
            raise ValueError(f"{path}: not a gallery file (missing {sorted(missing)})")
        if int(data["format_version"]) != FORMAT_VERSION:
            raise ValueError(f"{path} has gallery format version {int(data['format_version'])}; "
                             f"this jfacerec reads version {FORMAT_VERSION}: enroll again")
        names, embeddings = data["names"], data["embeddings"]
        if (embeddings.ndim != 2 or embeddings.shape[1] != int(data["dim"])
                or names.shape != (embeddings.shape[0],)):
            raise ValueError(f"{path}: inconsistent shapes (names {names.shape}, embeddings "
                             f"{embeddings.shape}, dim {int(data['dim'])})")
        threshold = float(data["threshold"]) if "threshold" in data else float("nan")
        return cls(names=names.astype(str), embeddings=embeddings.astype(np.float32),
                   fingerprint=str(data["fingerprint"]), model=str(data["model"]),
                   keep=str(data["keep"]), threshold=None if np.isnan(threshold) else threshold,
                   workdir=str(data.get("workdir", "")))

    def check_compatible(self, recognizer: FaceRecognizer) -> None:
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
        for threshold in (given, self.threshold, fallback):
            if threshold is not None:
                return float(threshold)
        raise ValueError("no threshold for unknown queries: pass --threshold (threshold=), "
                         "enroll with one, or run python -m jfacerec.evaluate on the workdir")

    def identify(self, queries: np.ndarray, *, k: int = 1, threshold: float) -> list[Match]:
        """queries: unit-norm float32 [n, dim] -> the best k distinct identities of each."""
        counts = np.unique(self.names, return_counts=True)[1]
        rows = min(len(self.names), k * int(counts.max()))  # enough rows for k distinct names
        scores, indices = matcher.top_k_cosine(queries, self.embeddings, k=rows)
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


def enroll(recognizer: FaceRecognizer, files: ImageFiles, *, keep: str = "mean",
           threshold: float | None = None) -> Gallery:
    """Embeds every image of an identity-folder scan; keeps each identity's normalised mean
    embedding, or every embedding."""
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
    embeddings = recognizer.embed_files(list(files.paths), desc="enroll")
    names = np.array(files.names)[files.labels]
    if keep == "mean":
        sums = np.zeros((len(files.names), embeddings.shape[1]), np.float64)
        np.add.at(sums, files.labels, embeddings)
        embeddings = (sums / np.linalg.norm(sums, axis=1, keepdims=True)).astype(np.float32)
        names = np.array(files.names)
    return Gallery(names=names.astype(str), embeddings=embeddings,
                   fingerprint=recognizer.fingerprint, model=recognizer.config.model.name,
                   keep=keep, threshold=threshold, workdir=os.path.abspath(recognizer.workdir))


def query_files(root: str, *, strict: bool) -> tuple[ImageFiles, list[str]]:
    """(files, ids): a flat folder of queries, or an identity tree (labelled queries); ids are
    paths relative to `root`."""
    has_images = any(os.path.isfile(os.path.join(root, n)) for n in os.listdir(root)) \
        if os.path.isdir(root) else True
    files = (scan_flat_folder(os.path.abspath(root), strict=strict) if has_images
             else scan_identity_folders(os.path.abspath(root), strict=strict))
    return files, [os.path.relpath(p, os.path.abspath(root)) for p in files.paths]


def write_matches(path: str, ids: list[str], matches: list[Match], k: int) -> None:
    with atomic_open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["id", "label", "score"] + [c for r in range(2, k + 1)
                                                 for c in (f"label_{r}", f"score_{r}")])
        for query_id, m in zip(ids, matches):
            extra = [v for name, score in m.candidates[1:k] for v in (name, f"{score:.6f}")]
            out.writerow([query_id, m.name, f"{m.score:.6f}"] + extra)


def _enroll_main(f) -> None:
    recognizer = load(f.workdir)
    files = scan_identity_folders(os.path.abspath(f.images), strict=f.strict)
    gallery = enroll(recognizer, files, keep=f.keep, threshold=f.threshold)
    gallery.save(f.out)
    skipped = f"; skipped {len(files.skipped)} unreadable files" if files.skipped else ""
    print(f"enrolled {len(gallery.identities)} identities ({len(files)} images, keep="
          f"{gallery.keep}, dim {gallery.dim}) with {recognizer!r} into {f.out}{skipped}")


def _identify_main(f) -> None:
    gallery = Gallery.load(f.gallery)
    workdir = f.workdir or gallery.workdir
    if not workdir:
        raise ValueError("the gallery does not name its model's workdir: pass --workdir")
    recognizer = load(workdir)
    files, ids = query_files(f.images, strict=f.strict)
    k = f["top-k"].value
    matches = recognizer.identify(list(files.paths), gallery, threshold=f.threshold, k=k)
    write_matches(f.out, ids, matches, k)
    unknown = sum(not m.known for m in matches)
    print(f"{len(matches)} queries: {len(matches) - unknown} matched, {unknown} unknown "
          f"({UNKNOWN}) -> {f.out}")
    if files.names:
        enrolled = set(gallery.identities)
        truth = [files.names[c] if files.names[c] in enrolled else UNKNOWN for c in files.labels]
        accuracy = np.mean([m.name == t for m, t in zip(matches, truth)])
        print(f"accuracy against the query folders' names: {accuracy:.4f}")


def main(argv):
    if len(argv) != 2 or argv[1] not in ("enroll", "identify"):
        raise app.UsageError("usage: python -m jfacerec.gallery enroll|identify [flags]")
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    required = (["workdir", "images", "out"] if argv[1] == "enroll"
                else ["gallery", "images", "out"])
    if missing := [name for name in required if not getattr(f, name)]:
        raise app.UsageError(f"{argv[1]} needs --{', --'.join(missing)}")
    with exit_on_user_error():
        (_enroll_main if argv[1] == "enroll" else _identify_main)(f)


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "Training workdir of the model (identify: defaults to "
                        "the one that enrolled the gallery).")
    flags.DEFINE_string("images", None, "enroll: identity-folder tree; identify: query folder.")
    flags.DEFINE_string("out", None, "enroll: gallery .npz to write; identify: matches .csv.")
    flags.DEFINE_string("gallery", None, "identify: the gallery file.")
    flags.DEFINE_enum("keep", "mean", KEEP, "enroll: each identity's mean embedding, or all.")
    flags.DEFINE_float("threshold", None, "Cosine below which a query is unknown (enroll: stored "
                       "in the gallery; identify: overrides it).")
    flags.DEFINE_integer("top-k", 1, "identify: candidates written per query.")
    strict_flag()
    app.run(main)
