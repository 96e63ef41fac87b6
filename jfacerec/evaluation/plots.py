"""Plots written beside the JSON results: ROC curves, score histograms, training and validation
curves."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jfacerec import metrics  # noqa: E402
from jfacerec.core import workdir as workdir_files  # noqa: E402
from jfacerec.core.atomic import atomic_open  # noqa: E402


def _save(fig: plt.Figure, path: str, dpi: int) -> None:
    """Writes `fig` as a PNG atomically (a reader sees the old picture or the new one) and closes
    it."""
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
    finally:
        plt.close(fig)


def roc_plot(path: str, curves: dict[str, tuple[np.ndarray, np.ndarray]], *,
             min_far: float = 1e-4) -> None:
    """ROC curves on a log false-accept axis from `min_far` to 1. curves: label -> (scores,
    same)."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for label, (scores, same) in curves.items():
        fpr, tpr, _ = metrics.roc_curve(scores, same)
        auc = metrics.roc_auc(scores, same)
        ax.plot(np.maximum(fpr, min_far), tpr, label=f"{label} (AUC {auc:.3f})")
    ax.set_xscale("log")
    ax.set_xlim(min_far, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, path, 120)


def score_histogram(path: str, scores: np.ndarray, same: np.ndarray,
                    threshold: float | None = None) -> None:
    """Histograms of matched and mismatched pair scores, with the decision threshold."""
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    bins = np.linspace(min(scores.min(), -0.2), 1.0, 60)
    ax.hist(scores[same], bins=bins, alpha=0.6, density=True, label="same person")
    ax.hist(scores[~same], bins=bins, alpha=0.6, density=True, label="different people")
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    _save(fig, path, 120)


def training_curves(workdir: str) -> str | None:
    """Loss, accuracy and learning rate from WORKDIR/metrics.jsonl -> WORKDIR/training.png, and
    the validation figures, when there are any, -> WORKDIR/validation.png (`validation_curves`).
    Returns training.png's path (None without training records)."""
    records = workdir_files.read_metrics(workdir)
    validation_curves(workdir, [r for r in records if "loss" not in r])
    rows = [r for r in records if "loss" in r]  # validation records have their own figure
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    keys = [k for k in ("loss", "accuracy", "learning_rate") if k in rows[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, key in zip(np.atleast_1d(axes), keys):
        ax.plot(steps, [r[key] for r in rows])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = workdir_files.path(workdir, workdir_files.TRAINING_PLOT)
    _save(fig, out, 110)
    return out


def validation_curves(workdir: str, records: list[dict[str, float]]) -> str | None:
    """The `val/<set>/<metric>` records of metrics.jsonl -> WORKDIR/validation.png: one panel per
    metric (accuracy first, shaded by its fold spread), one line per set. Returns its path (None
    without such records)."""
    keys = sorted({k for r in records for k in r
                   if k.startswith("val/") and not k.endswith("_std")})
    if not keys:
        return None
    names = sorted({k.rsplit("/", 1)[1] for k in keys}, key=lambda m: (m != "accuracy", m))
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], names):
        for key in (k for k in keys if k.endswith(f"/{metric}")):
            rows = [r for r in records if key in r]
            steps, values = np.array([r["step"] for r in rows]), np.array([r[key] for r in rows])
            ax.plot(steps, values, marker="o", markersize=3, label=key.split("/")[1])
            if all(f"{key}_std" in r for r in rows):
                spread = np.array([r[f"{key}_std"] for r in rows])
                ax.fill_between(steps, values - spread, values + spread, alpha=0.2)
        ax.set_title(f"validation {metric}")
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    out = workdir_files.path(workdir, workdir_files.VALIDATION_PLOT)
    _save(fig, out, 110)
    return out
