"""python -m jfacerec.gallery enroll | identify: 1:N search of queries against known people.

    python -m jfacerec.gallery enroll --workdir DIR --images KNOWN_ROOT --out gallery.npz \
        [--keep mean|all] [--threshold T] [--landmarks CSV] [--wccn SHRINKAGE]
    python -m jfacerec.gallery identify --gallery gallery.npz --images QUERY_DIR \
        --out matches.csv [--threshold T] [--top-k K] [--workdir DIR] [--landmarks CSV]

KNOWN_ROOT is an identity-folder tree (`<name>/<image>`). QUERY_DIR is a folder of images, or a
tree of identity folders (then accuracy is reported: a query whose name is not enrolled should come
out unknown). matches.csv: `id,label,score` (label `n000000` for unknown) and, with --top-k K > 1,
`label_2,score_2 ... label_K,score_K`. With --landmarks (a CSV `path,x1,y1,...,x5,y5`, paths
relative to --images or absolute), every image is aligned by its five points first. With --wccn
(a shrinkage, e.g. 0.2 as configs/lfw.py's eval.wccn), enroll fits WCCN on the enrolled images
(identities need two or more) and the gallery and every query are whitened by it: scores then
run on another scale than the cosine, so give such a gallery its own --threshold.

enroll embeds the images batch by batch as they are read (never all of them in memory at once).
identify searches a gallery of more than SHARD_ABOVE rows (65,536; in
jfacerec/inference/gallery.py) split by rows over every device, with the answers of one device:
one threshold, whichever way the gallery is searched.

Several processes (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, as for
python -m jfacerec.train) run one command together, each given the same flags: the model runs on
every device of every process, each process reading its own rows of every batch, and process 0
alone writes --out.

The gallery file's format and the search are in jfacerec/inference/gallery.py.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, flags

from jfacerec.core import cli, parallel, storage
from jfacerec.data.align import read_landmarks_csv
from jfacerec.data.folders import scan_identity_folders
from jfacerec.inference.gallery import KEEP, UNKNOWN, Gallery, enroll, query_files
from jfacerec.inference.gallery import write_matches
from jfacerec.inference.recognizer import load


def _landmarks(f, paths) -> np.ndarray | None:
    """--landmarks' points of each image [n, 5, 2], or None without the flag."""
    if not f.landmarks:
        return None
    return read_landmarks_csv(f.landmarks, f.images).lookup(paths)[0]


def _enroll_main(f) -> None:
    recognizer = load(f.workdir)
    files = scan_identity_folders(storage.absolute(f.images), strict=f.strict)
    gallery = enroll(recognizer, files, keep=f.keep, threshold=f.threshold,
                     landmarks=_landmarks(f, files.paths), wccn=f.wccn)
    if jax.process_index() != 0:
        return
    gallery.save(f.out)
    skipped = f"; skipped {len(files.skipped)} unreadable files" if files.skipped else ""
    whitened = f", WCCN {f.wccn:g}" if f.wccn else ""
    print(f"enrolled {len(gallery.identities)} identities ({len(files)} images, keep="
          f"{gallery.keep}, dim {gallery.dim}{whitened}) with {recognizer!r} into {f.out}"
          f"{skipped}")


def _identify_main(f) -> None:
    gallery = Gallery.load(f.gallery)
    workdir = f.workdir or gallery.workdir
    if not workdir:
        raise ValueError("the gallery does not name its model's workdir: pass --workdir")
    recognizer = load(workdir)
    files, ids = query_files(f.images, strict=f.strict)
    k = f["top-k"].value
    matches = recognizer.identify(list(files.paths), gallery, threshold=f.threshold, k=k,
                                  landmarks=_landmarks(f, files.paths))
    if jax.process_index() != 0:
        return
    write_matches(f.out, ids, matches, k)
    unknown = sum(not m.known for m in matches)
    devices = gallery.search_devices()
    print(f"{len(matches)} queries: {len(matches) - unknown} matched, {unknown} unknown "
          f"({UNKNOWN}) -> {f.out} (searched {len(gallery.names):,} gallery rows on {devices} "
          f"device{'s' if devices > 1 else ''})")
    if files.names:
        enrolled = set(gallery.identities)
        truth = [files.names[c] if files.names[c] in enrolled else UNKNOWN for c in files.labels]
        accuracy = np.mean([m.name == t for m, t in zip(matches, truth)])
        print(f"accuracy against the query folders' names: {accuracy:.4f}")


def main(argv):
    if len(argv) != 2 or argv[1] not in ("enroll", "identify"):
        raise app.UsageError("usage: python -m jfacerec.gallery enroll|identify [flags]")
    f = flags.FLAGS
    required = (["workdir", "images", "out"] if argv[1] == "enroll"
                else ["gallery", "images", "out"])
    if missing := [name for name in required if not getattr(f, name)]:
        raise app.UsageError(f"{argv[1]} needs --{', --'.join(missing)}")
    parallel.maybe_initialize_distributed()
    with cli.exit_on_user_error(output=f.out):
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
    flags.DEFINE_string("landmarks", None, "A CSV path,x1,y1,...,x5,y5 of five landmarks per "
                        "image (paths relative to --images): align each face by them.")
    flags.DEFINE_float("wccn", 0.0, "enroll: whiten the gallery and the queries by WCCN fitted "
                       "on the enrolled images, shrunk by this much toward the identity (0: off).")
    cli.strict_flag()
    cli.run(main)
