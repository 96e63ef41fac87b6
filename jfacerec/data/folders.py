"""Scanning image trees on disk: identity folders (`ROOT/<identity>/<image>`) and flat folders.

Every file is checked by decoding it once (JPEGs at 1/8 scale, which is fast), so that a corrupt,
truncated or non-image file is found before training starts: it is skipped with a warning naming
it, or, with `strict`, raises `ImageDecodeError`. Empty identity folders and empty trees raise
ValueError with the folder's name.

A root on an object store (gs://) is listed with one listing of its objects and its files read
through jfacerec.core.storage: the records are those of a local copy of the tree.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm.auto import tqdm

from jfacerec.core import storage
from jfacerec.data.images import EXTENSIONS, ImageDecodeError, decode, is_image_name


class SkippedImageWarning(UserWarning):
    """An unreadable file was left out of a dataset."""


@dataclasses.dataclass(frozen=True)
class ImageFiles:
    """Image files with their identities.

    names: identity names; label i is names[i]. paths: one file per record. labels: int32 [n]
    (-1 everywhere for a flat folder of unlabelled images). skipped: unreadable files left out.
    """

    root: str
    names: tuple[str, ...]
    paths: tuple[str, ...]
    labels: np.ndarray
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: np.ndarray, relabel: bool = False) -> ImageFiles:
        """The records at `indices`; with `relabel`, labels renumbered 0.. over the identities
        present (in the order of `names`)."""
        indices = np.asarray(indices, np.int64)
        labels, names = self.labels[indices], self.names
        if relabel:
            present = np.unique(labels)
            labels = np.searchsorted(present, labels).astype(np.int32)
            names = tuple(self.names[i] for i in present)
        return ImageFiles(self.root, names, tuple(self.paths[i] for i in indices), labels,
                          self.skipped)

    def select(self, names: tuple[str, ...], min_images: int = 1) -> ImageFiles:
        """The records of the identities `names` having `min_images` or more, relabelled 0.. in
        the order of `self.names`: a part of a scanned tree without scanning it again."""
        position = {n: i for i, n in enumerate(self.names)}
        if missing := sorted(set(names) - set(position)):
            raise FileNotFoundError(f"{self.root}: no readable images of {missing[:3]} "
                                    f"({len(missing)} identities)")
        wanted = np.zeros(len(self.names), bool)
        wanted[[position[n] for n in names]] = True
        wanted &= np.bincount(self.labels, minlength=len(self.names)) >= max(1, min_images)
        if not wanted.any():
            raise ValueError(f"{self.root}: no identity has {max(1, min_images)} or more "
                             f"readable images")
        return self.subset(np.flatnonzero(wanted[self.labels]), relabel=True)

    def summary(self) -> str:
        skipped = f", skipped {len(self.skipped)} unreadable files" if self.skipped else ""
        return f"{len(self.paths)} images of {len(self.names)} identities in {self.root}{skipped}"


# (path, size, mtime) -> the decoding error or None: trees are often scanned more than once
# (a dataset's splits, a protocol's folds) and checking is the slow part of a scan.
_CHECKED: dict[tuple[str, int, int], ImageDecodeError | None] = {}


def _stat_key(path: str) -> tuple[str, int, int]:
    if storage.is_remote(path):
        stat = storage.epath_of(path).stat()
        return path, stat.length, int(stat.mtime * 1e9)
    stat = os.stat(path)
    return path, stat.st_size, stat.st_mtime_ns


def _check(path: str) -> ImageDecodeError | None:
    key = _stat_key(path)
    if key not in _CHECKED:
        try:
            decode(path, min_side=8)
            _CHECKED[key] = None
        except ImageDecodeError as e:
            _CHECKED[key] = e
    return _CHECKED[key]


def check_files(paths: list[str], *, strict: bool, desc: str) -> list[str]:
    """Decodes every file once; returns the unreadable ones (warning about each), or, with
    `strict`, raises ImageDecodeError for the first."""
    # Pillow releases the GIL while decoding, so threads overlap the work.
    with ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
        errors = list(tqdm(pool.map(_check, paths, chunksize=64), total=len(paths), desc=desc,
                           unit="img", leave=False, disable=len(paths) < 500))
    bad = []
    for error in errors:
        if error is None:
            continue
        if strict:
            raise error
        warnings.warn(f"skipping {error}", SkippedImageWarning, stacklevel=2)
        bad.append(error.name)
    return bad


def _remote_tree(root: str) -> dict[str, list[str]]:
    """The folders of an object-store `root` ('' for root itself, else each subfolder's name)
    -> the sorted names of the files directly in each; {} when nothing is stored under `root`."""
    tree: dict[str, list[str]] = {}
    for name in storage.files_under(root):
        parts = name.split("/")
        if len(parts) == 1:
            tree.setdefault("", []).append(parts[0])
        else:
            files = tree.setdefault(parts[0], [])
            if len(parts) == 2 and parts[1]:
                files.append(parts[1])
    if tree:
        tree.setdefault("", [])
    return {folder: sorted(names) for folder, names in tree.items()}


class _Listing:
    """What a scan needs to know of a tree: its subfolders and their image files (os calls for a
    local root, as before; one listing for a remote one)."""

    def __init__(self, root: str):
        self.root = root
        self.tree = _remote_tree(root) if storage.is_remote(root) else None

    def is_folder(self, name: str = "") -> bool:
        if self.tree is None:
            return os.path.isdir(os.path.join(self.root, name) if name else self.root)
        return name in self.tree

    def subfolders(self) -> tuple[str, ...]:
        if self.tree is None:
            return tuple(sorted(n for n in os.listdir(self.root) if not n.startswith(".")
                                and os.path.isdir(os.path.join(self.root, n))))
        return tuple(n for n in sorted(self.tree) if n and not n.startswith("."))

    def image_paths(self, name: str = "") -> list[str]:
        """The image files of subfolder `name` (of the root itself when ''), sorted."""
        folder = storage.join(self.root, name) if name else self.root
        if self.tree is None:
            return [os.path.join(folder, n) for n in sorted(os.listdir(folder))
                    if is_image_name(n) and os.path.isfile(os.path.join(folder, n))]
        return [storage.join(folder, n) for n in self.tree[name] if is_image_name(n)]


def _require_folder(listing: _Listing, name: str, layout: str) -> None:
    if not listing.is_folder(name):
        path = storage.join(listing.root, name) if name else listing.root
        raise FileNotFoundError(f"{path}: no such folder (expected {layout}); check the path or "
                                f"set JFACEREC_DATA")


@functools.lru_cache(maxsize=32)
def scan_identity_folders(root: str, *, identities: tuple[str, ...] | None = None,
                          min_images: int = 1, check: bool = True,
                          strict: bool = False) -> ImageFiles:
    """`root/<identity>/<image>` -> ImageFiles, identities in sorted order (label = position).

    identities: only these (each must exist). min_images: identities with fewer readable images
    are left out (they are not errors). An identity folder with no image files is an error.
    """
    root = root.rstrip("/") if storage.is_remote(root) else root
    listing = _Listing(root)
    _require_folder(listing, "", "ROOT/<identity>/<image>.jpg")
    if identities is None:
        identities = listing.subfolders()
    if not identities:
        raise ValueError(f"{root} holds no identity folders; expected "
                         f"{root}/<identity>/<image>{{{','.join(EXTENSIONS)}}}")
    per_identity = []
    for name in identities:
        _require_folder(listing, name, f"an identity folder of {root}")
        files = listing.image_paths(name)
        if not files:
            raise ValueError(f"identity folder {storage.join(root, name)} holds no images "
                             f"({', '.join(EXTENSIONS)}); add images or remove the folder")
        per_identity.append(files)
    all_paths = [p for files in per_identity for p in files]
    skipped = set(check_files(all_paths, strict=strict, desc=f"checking {root}") if check else ())
    names, paths, labels = [], [], []
    for name, files in zip(identities, per_identity):
        readable = [p for p in files if p not in skipped]
        if len(readable) < max(1, min_images):
            if not readable:
                warnings.warn(f"leaving out {storage.join(root, name)}: none of its images is "
                              f"readable", SkippedImageWarning, stacklevel=2)
            continue
        labels += [len(names)] * len(readable)
        names.append(name)
        paths += readable
    if not paths:
        raise ValueError(f"{root}: no identity has {max(1, min_images)} or more readable images")
    return ImageFiles(root, tuple(names), tuple(paths), np.asarray(labels, np.int32),
                      tuple(sorted(skipped)))


@functools.lru_cache(maxsize=32)
def scan_flat_folder(root: str, *, check: bool = True, strict: bool = False) -> ImageFiles:
    """`root/<image>` (unlabelled queries, e.g. HW2P2's test folders) -> ImageFiles, labels -1."""
    root = root.rstrip("/") if storage.is_remote(root) else root
    listing = _Listing(root)
    _require_folder(listing, "", "a folder of images")
    paths = listing.image_paths()
    if not paths:
        raise ValueError(f"{root} holds no images ({', '.join(EXTENSIONS)})")
    skipped = set(check_files(paths, strict=strict, desc=f"checking {root}") if check else ())
    paths = [p for p in paths if p not in skipped]
    if not paths:
        raise ValueError(f"{root}: none of its images is readable")
    return ImageFiles(root, (), tuple(paths), np.full(len(paths), -1, np.int32),
                      tuple(sorted(skipped)))


def split_per_identity(labels: np.ndarray, held_out: int,
                       rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held) record indices: `held_out` images of every identity with more than that many
    go to `held` (the last ones in file order, or a random choice with `rng`)."""
    # One stable sort groups every identity's records in file order: a mask per identity would
    # cost a pass over all labels for each of MS1M's 93k identities.
    order = np.argsort(labels, kind="stable")
    starts = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]])
    kept, held = [], []
    for members in np.split(order, starts[1:]) if len(order) else []:
        if rng is not None:
            members = rng.permutation(members)
        if held_out and len(members) > held_out:
            kept.append(members[:-held_out])
            held.append(members[-held_out:])
        else:
            kept.append(members)
    concat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)  # noqa: E731
    return concat(kept), concat(held)
