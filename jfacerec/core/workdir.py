"""The training workdir: the name and format of every file in it, in one place.

    WORKDIR/config.json          the resolved config (JSON)
    WORKDIR/identities.json      the training identities' names: class i is names[i]
    WORKDIR/metrics.jsonl        one JSON object per logged step
    WORKDIR/training.png         training curves drawn from metrics.jsonl
    WORKDIR/validation.png       validation curves (config.eval.every_steps), from metrics.jsonl
    WORKDIR/tb/                  TensorBoard events
    WORKDIR/checkpoints/<step>/  orbax checkpoints and their sha256.json (see checkpoint.py)
    WORKDIR/checkpoints/best.json the best validated step (see checkpoint.py)
    WORKDIR/.lock                held by the one process training in the workdir (see lock.py)
    WORKDIR/eval/metrics.json    evaluate's flat metrics; eval/roc.png, eval/scores.png,
                                 eval/roc_bin.png (one curve per .bin set of --bin)
    WORKDIR/eval/ijb_<target>.json IJB-B/C 1:1 TAR@FAR (evaluation/ijb.py), and its .png

Training writes them, evaluation adds `eval/`, and the recognizer (`jfacerec.load`) reads them.
config.json and identities.json are replaced atomically: a reader sees the old file or the new one.
A workdir may be local or on object storage (`gs://bucket/run`): every file goes through
`core.storage`.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import ml_collections

from jfacerec.core import config_base, storage
from jfacerec.core.atomic import append_text, atomic_open

CONFIG = "config.json"
IDENTITIES = "identities.json"
METRICS = "metrics.jsonl"
TRAINING_PLOT = "training.png"
VALIDATION_PLOT = "validation.png"
TENSORBOARD = "tb"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"
EVAL = "eval"
EVAL_METRICS = posixpath.join(EVAL, "metrics.json")
ROC_PLOT = posixpath.join(EVAL, "roc.png")
SCORES_PLOT = posixpath.join(EVAL, "scores.png")
ROC_BIN_PLOT = posixpath.join(EVAL, "roc_bin.png")


def ijb_results(target: str) -> str:
    """eval/ijb_<target> (lower case, as the release's meta files name the target): the stem of
    its .json and .png."""
    return posixpath.join(EVAL, f"ijb_{target.lower()}")


def path(workdir: str, name: str) -> str:
    """WORKDIR/name, for one of the names above."""
    return storage.join(workdir, *name.split("/"))


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    with atomic_open(path(workdir, CONFIG)) as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with; FileNotFoundError when it is not a workdir."""
    config_path = path(workdir, CONFIG)
    if not storage.isfile(config_path):
        raise FileNotFoundError(f"{config_path}: not a training workdir (no {CONFIG}); train "
                                f"with python -m jfacerec.train --config ... --workdir {workdir}")
    # An older workdir lacks the keys added since: the base config gives their defaults.
    return config_base.with_defaults(json.loads(storage.read_text(config_path)))


def write_identities(names: tuple[str, ...], workdir: str) -> None:
    with atomic_open(path(workdir, IDENTITIES)) as f:
        json.dump(list(names), f)


def read_identities(workdir: str) -> list[str] | None:
    """The training identities' names, or None when the dataset has none."""
    names_path = path(workdir, IDENTITIES)
    if not storage.isfile(names_path):
        return None
    return json.loads(storage.read_text(names_path))


def write_eval_metrics(results: dict[str, Any], workdir: str) -> str:
    """Writes eval/metrics.json; returns its path."""
    out = path(workdir, EVAL_METRICS)
    with atomic_open(out) as f:
        json.dump(results, f, indent=2, sort_keys=True)
    return out


def read_eval_metrics(workdir: str) -> dict[str, Any] | None:
    """eval/metrics.json, or None before the workdir was evaluated."""
    metrics_path = path(workdir, EVAL_METRICS)
    if not storage.isfile(metrics_path):
        return None
    return json.loads(storage.read_text(metrics_path))


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """The records of metrics.jsonl, in order ([] when there is none)."""
    metrics_path = path(workdir, METRICS)
    if not storage.isfile(metrics_path):
        return []
    return [json.loads(line) for line in storage.read_text(metrics_path).splitlines()
            if line.strip()]


def keep_metrics(workdir: str, last_step: int) -> None:
    """Drops the metrics.jsonl records after `last_step` (a resumed run logs them again)."""
    metrics_path = path(workdir, METRICS)
    if not storage.isfile(metrics_path):
        return
    kept = [line for line in storage.read_text(metrics_path).splitlines(keepends=True)
            if line.strip() and json.loads(line)["step"] <= last_step]
    with atomic_open(metrics_path) as f:
        f.write("".join(kept))


def append_metrics(record: dict[str, Any], workdir: str) -> None:
    """One line of metrics.jsonl."""
    append_text(path(workdir, METRICS), json.dumps(record) + "\n")


def tensorboard_writer(workdir: str):
    """A tensorboardX SummaryWriter on WORKDIR/tb, local or on an object store."""
    from tensorboardX import SummaryWriter  # deferred: only process 0 writes events
    from jfacerec.core import tensorboard_store
    tensorboard_store.register()
    return SummaryWriter(path(workdir, TENSORBOARD))
