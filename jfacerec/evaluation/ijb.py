"""python -m jfacerec.evaluation.ijb --workdir W --root IJB_release/IJBC --target IJBC
    [--nodetector_score] [--nonorm_score] [--noflip]

IJB-B / IJB-C 1:1 verification, template against template, as the field reports it (insightface's
recognition/_evaluation_/ijb). The release's files, under ROOT (`t` = the target in lower case):

    meta/<t>_face_tid_mid.txt        image_name template_id media_id           (the faces)
    meta/<t>_template_pair_label.txt template_id template_id label (1 same)   (the pairs)
    meta/<t>_name_5pts_score.txt     image_name x1 y1 ... x5 y5 detection_score
    loose_crop/<image_name>

Every face is aligned by its five points and embedded with its mirror image (the sum of the two
embeddings, kept unnormalised: its norm says how face-like the model finds it), weighted by the
detector's score; a template's media (the frames of one video, or one photo) are averaged, its
media summed and the sum normalised; a pair's score is the cosine of its two templates. Reports
TAR at FAR 1e-6 ... 1e-1 and AUC in W/eval/ijb_<t>.json, and the ROC in W/eval/ijb_<t>.png.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from absl import flags

from jfacerec import metrics
from jfacerec.core import cli, storage
from jfacerec.core import workdir as workdir_files
from jfacerec.core.atomic import atomic_open
from jfacerec.data.align import check_landmarks
from jfacerec.evaluation import plots
from jfacerec.inference.recognizer import load

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
TARGETS = ("IJBB", "IJBC")


@dataclasses.dataclass(frozen=True)
class IjbRelease:
    """One target of the release, faces in the order of the face list.

    images: image paths [n]; templates, medias: int64 [n]; landmarks: float64 [n, 5, 2];
    faceness: float64 [n] (the detector's score); origins: the landmarks' file and line [n];
    first, second: int64 [p] template ids; same: bool [p].
    """

    images: tuple[str, ...]
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray
    faceness: np.ndarray
    origins: tuple[str, ...]
    first: np.ndarray
    second: np.ndarray
    same: np.ndarray


def meta_file(root: str, target: str, name: str) -> str:
    """ROOT/meta/<target in lower case>_<name>.txt, or FileNotFoundError naming it."""
    path = storage.join(root, "meta", f"{target.lower()}_{name}.txt")
    if not storage.isfile(path):
        raise FileNotFoundError(f"{path}: missing from the {target} release; --root must be the "
                                f"folder holding meta/ and loose_crop/ (e.g. IJB_release/{target})")
    return path


def _rows(path: str, fields: int) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-empty line; another number of fields is a ValueError."""
    rows = []
    with storage.open(path) as f:
        for number, line in enumerate(f, 1):
            if not (parts := line.split()):
                continue
            if len(parts) != fields:
                raise ValueError(f"{path} line {number}: expected {fields} fields separated by "
                                 f"spaces, got {len(parts)}")
            rows.append((number, parts))
    return rows


def _integers(path: str, number: int, values: list[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ValueError(f"{path} line {number}: {' '.join(values)} are not all integers") from None


def read_landmarks(path: str) -> dict[str, tuple[np.ndarray, float, str]]:
    """The five-points file: image name -> (landmarks [5, 2], detection score, "file line N")."""
    faces = {}
    for number, (name, *values) in _rows(path, 12):
        where = f"{path} line {number}"
        try:
            numbers = np.array([float(v) for v in values])
            faces[name] = (check_landmarks(numbers[:10].reshape(5, 2)), float(numbers[10]), where)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return faces


def read_release(root: str, target: str) -> IjbRelease:
    """The faces, their landmarks and the template pairs of `target` under `root`; a missing
    file, a face without landmarks or a pair naming an unknown template is an error naming the
    file and line."""
    faces_path = meta_file(root, target, "face_tid_mid")
    pairs_path = meta_file(root, target, "template_pair_label")
    points_path = meta_file(root, target, "name_5pts_score")
    points = read_landmarks(points_path)
    names, templates, medias = [], [], []
    for number, (name, *ids) in _rows(faces_path, 3):
        if name not in points:
            raise ValueError(f"{faces_path} line {number}: {name} has no line in {points_path}")
        template, media = _integers(faces_path, number, ids)
        names.append(name)
        templates.append(template)
        medias.append(media)
    known = set(templates)
    first, second, same = [], [], []
    for number, values in _rows(pairs_path, 3):
        a, b, label = _integers(pairs_path, number, values)
        if unknown := [t for t in (a, b) if t not in known]:
            raise ValueError(f"{pairs_path} line {number}: template {unknown[0]} is not in "
                             f"{faces_path}")
        if label not in (0, 1):
            raise ValueError(f"{pairs_path} line {number}: label {label} is not 0 or 1")
        first.append(a)
        second.append(b)
        same.append(label == 1)
    if not same:
        raise ValueError(f"{pairs_path} holds no template pairs")
    return IjbRelease(
        images=tuple(storage.join(root, "loose_crop", n) for n in names),
        templates=np.array(templates, np.int64), medias=np.array(medias, np.int64),
        landmarks=np.array([points[n][0] for n in names]).reshape(-1, 5, 2),
        faceness=np.array([points[n][1] for n in names], np.float64),
        origins=tuple(points[n][2] for n in names),
        first=np.array(first, np.int64), second=np.array(second, np.int64),
        same=np.array(same, bool))


def template_embeddings(features: np.ndarray, templates: np.ndarray,
                        medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pools face features [n, d] into (template ids [t] sorted, unit-norm embeddings [t, d]):
    the mean of each media's faces within a template, summed over the template's media,
    normalised. A media keeps one vote however many frames it has."""
    features = np.asarray(features, np.float64)
    keys, group = np.unique(np.stack([templates, medias], 1), axis=0, return_inverse=True)
    group = group.reshape(-1)
    media_sum = np.zeros((len(keys), features.shape[1]))
    np.add.at(media_sum, group, features)
    media_mean = media_sum / np.bincount(group, minlength=len(keys))[:, None]
    ids, owner = np.unique(keys[:, 0], return_inverse=True)
    pooled = np.zeros((len(ids), features.shape[1]))
    np.add.at(pooled, owner.reshape(-1), media_mean)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return ids, pooled / np.maximum(norms, np.finfo(np.float64).tiny)


def score_pairs(ids: np.ndarray, embeddings: np.ndarray, first: np.ndarray,
                second: np.ndarray) -> np.ndarray:
    """Cosine scores [p] of template pairs; ids [t] sorted, embeddings [t, d] unit norm."""
    a, b = np.searchsorted(ids, first), np.searchsorted(ids, second)
    return np.einsum("pd,pd->p", embeddings[a], embeddings[b])


def face_features(raw: np.ndarray, faceness: np.ndarray, *, norm_score: bool,
                  detector_score: bool) -> np.ndarray:
    """The features pooled into templates [n, d]: the raw (flip-summed) embeddings, their norm
    dropped unless `norm_score`, times the detection score with `detector_score`."""
    features = np.asarray(raw, np.float64)
    if not norm_score:
        features = features / np.linalg.norm(features, axis=1, keepdims=True)
    if detector_score:
        features = features * np.asarray(faceness, np.float64)[:, None]
    return features


def verification_metrics(scores: np.ndarray, same: np.ndarray) -> dict[str, float]:
    """TAR at each of FARS (the strictest threshold whose FAR is at most it) and AUC."""
    results = {f"tar@far=1e-{round(-np.log10(far))}": metrics.tar_at_far(scores, same, far)
               for far in FARS}
    results["auc"] = metrics.roc_auc(scores, same)
    return results


def run(workdir: str, root: str, target: str, *, detector_score: bool = True,
        norm_score: bool = True, flip: bool = True) -> dict:
    """Scores the release's template pairs with the model in `workdir`; writes
    eval/ijb_<target>.json and .png; returns the results."""
    if target not in TARGETS:
        raise ValueError(f"--target {target}: expected one of {', '.join(TARGETS)}")
    release = read_release(root, target)
    model = load(workdir)
    raw = model.features_files(release.images, landmarks=release.landmarks, flip=flip,
                               desc=f"{target} faces")
    features = face_features(raw, release.faceness, norm_score=norm_score,
                             detector_score=detector_score)
    ids, embeddings = template_embeddings(features, release.templates, release.medias)
    scores = score_pairs(ids, embeddings, release.first, release.second)
    results = {
        "target": target, "root": storage.absolute(root), "step": model.step,
        "fingerprint": model.fingerprint, "flip": flip, "norm_score": norm_score,
        "detector_score": detector_score, "num_faces": len(release.images),
        "num_templates": len(ids), "num_pairs": len(scores),
        "num_genuine": int(release.same.sum()), "num_impostor": int((~release.same).sum()),
        **verification_metrics(scores, release.same),
    }
    out = workdir_files.path(workdir, workdir_files.ijb_results(target))
    with atomic_open(out + ".json") as f:
        json.dump(results, f, indent=2)
    plots.roc_plot(out + ".png", {f"{model.config.model.name} ({target})": (scores, release.same)},
                   min_far=min(FARS))
    return results


def main(argv):
    del argv
    f = flags.FLAGS
    with cli.exit_on_user_error(output=f.workdir):
        results = run(f.workdir, f.root, f.target, detector_score=f.detector_score,
                      norm_score=f.norm_score, flip=f.flip)
    tars = ", ".join(f"{k.split('=')[1]}: {v:.4f}" for k, v in results.items()
                     if k.startswith("tar@far="))
    print(f"{results['target']} 1:1 verification, {results['num_pairs']} template pairs "
          f"({results['num_impostor']} impostor) of {results['num_templates']} templates: "
          f"TAR at FAR {tars}; AUC {results['auc']:.4f}")
    print(f"wrote {workdir_files.path(f.workdir, workdir_files.ijb_results(f.target))}.json "
          f"and .png")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "Training workdir of the model.")
    flags.DEFINE_string("root", None, "The target's release folder, holding meta/ and "
                        "loose_crop/ (IJB_release/IJBC).")
    flags.DEFINE_enum("target", "IJBC", TARGETS, "Which release: IJBB or IJBC.")
    flags.DEFINE_bool("detector_score", True, "Weigh each face by its detection score.")
    flags.DEFINE_bool("norm_score", True, "Keep each face's embedding norm as a weight "
                      "(--nonorm_score: normalise faces before pooling).")
    flags.DEFINE_bool("flip", True, "Add the embedding of the mirrored face.")
    flags.mark_flags_as_required(["workdir", "root"])
    cli.run(main)
