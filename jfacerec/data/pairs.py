"""LFW pairs files (`pairsDevTest.txt`, `pairs.txt`): which image pairs a protocol verifies.

Pairs files and image roots may be local or on an object store (gs://, jfacerec.core.storage).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jfacerec.core import storage


@dataclasses.dataclass(frozen=True)
class LfwPair:
    """One line of an LFW pairs file: two images, of one person (`same`) or of two."""

    names: tuple[str, str]
    numbers: tuple[int, int]
    same: bool

    def paths(self, root: str) -> tuple[str, str]:
        """The two image files under LFW's `root/<name>/<name>_<number:04d>.jpg`."""
        return tuple(storage.join(root, n, f"{n}_{i:04d}.jpg")  # type: ignore[return-value]
                     for n, i in zip(self.names, self.numbers))


def pair_images(pairs: list[LfwPair], root: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(the distinct image files of `pairs` under `root`, sorted; each pair's first and second
    int64 [pairs] indices into them): an image in several pairs is embedded once."""
    paths = [path for pair in pairs for path in pair.paths(root)]
    unique = sorted(set(paths))
    position = {path: i for i, path in enumerate(unique)}
    index = np.array([position[path] for path in paths], np.int64).reshape(-1, 2)
    return unique, index[:, 0], index[:, 1]


def read_lfw_pairs(path: str) -> list[list[LfwPair]]:
    """An LFW pairs file -> its folds, each a list of pairs (matched first, then mismatched).

    The header says the format: `N` (View 1: one set of N matched then N mismatched pairs) or
    `FOLDS<tab>N` (View 2: FOLDS identity-disjoint folds of 2N pairs each).
    """
    with storage.open(path) as f:
        lines = [line.split() for line in f if line.strip()]
    if not lines or not all(x.isdigit() for x in lines[0]) or len(lines[0]) not in (1, 2):
        raise ValueError(f"{path}: the first line must be 'N' (View 1) or 'FOLDS<tab>N' (View 2)")
    folds, n = (1, int(lines[0][0])) if len(lines[0]) == 1 else map(int, lines[0])
    body = lines[1:]
    if len(body) != folds * 2 * n:
        raise ValueError(f"{path}: the header promises {folds} x {2 * n} pairs, the file holds "
                         f"{len(body)}")
    pairs = []
    for number, fields in enumerate(body, start=2):
        try:
            if len(fields) == 3:
                pairs.append(LfwPair((fields[0], fields[0]), (int(fields[1]), int(fields[2])), True))
            elif len(fields) == 4:
                pairs.append(LfwPair((fields[0], fields[2]), (int(fields[1]), int(fields[3])),
                                     False))
            else:
                raise ValueError(f"{len(fields)} fields")
        except ValueError as e:
            raise ValueError(f"{path}, line {number}: expected 'name n1 n2' or "
                             f"'name1 n1 name2 n2' ({e})") from None
    out = [pairs[i * 2 * n:(i + 1) * 2 * n] for i in range(folds)]
    for i, fold in enumerate(out):
        if [p.same for p in fold] != [True] * n + [False] * n:
            raise ValueError(f"{path}: fold {i} is not {n} matched then {n} mismatched pairs")
    return out
