"""The training objective: one loss or a weighted sum of losses, declared in the config.

`config.loss.name` is an expression such as "arcface", "0.7*softmax + 0.3*triplet" or
"softmax + 0.01*center". Each term's options live under `config.loss.<name>` (for example
`config.loss.arcface.margin`); `config.loss.label_smoothing` applies to every cross-entropy term.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jfacerec.losses import functions as losses
from jfacerec.losses import sharded_softmax

_TERM = re.compile(r"^\s*(?:([0-9.eE+-]+)\s*\*\s*)?([a-z_]+)\s*$")

# Options that configure how a term is driven rather than the loss function itself.
_SPHEREFACE_SCHEDULE = ("lambda_base", "lambda_gamma", "lambda_power", "lambda_min")
_CENTER_OPTIONS = ("method", "alpha", "learning_rate")


def parse_terms(expression: str) -> list[tuple[float, str]]:
    """ "0.7*softmax + 0.3*triplet" -> [(0.7, "softmax"), (0.3, "triplet")]."""
    terms = []
    for part in expression.split("+"):
        match = _TERM.match(part)
        if not match:
            raise ValueError(f"cannot read loss term {part!r} of {expression!r}; write terms like "
                             f"'0.7*softmax + 0.3*triplet'")
        weight, name = match.groups()
        losses.loss_kind(name)  # raises on an unknown name
        terms.append((float(weight) if weight else 1.0, name))
    names = [n for _, n in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"loss {expression!r} names a term twice")
    return terms


@dataclasses.dataclass(frozen=True)
class Objective:
    """Weighted loss terms and what they need from the model."""

    terms: tuple[tuple[float, str, dict[str, Any]], ...]
    label_smoothing: float
    explicit_triplets: bool  # batches are [anchors; positives; negatives]
    sphereface_schedule: dict[str, float]
    center_update: str  # "rule" or "param"
    center_alpha: float
    center_learning_rate: float

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "Objective":
        loss_cfg = config.loss
        terms = []
        for weight, name in parse_terms(loss_cfg.name):
            # Every loss has its block in the base config (jfacerec/core/config_base.py).
            options = {k: v for k, v in dict(loss_cfg[name]).items()
                       if k not in _SPHEREFACE_SCHEDULE + _CENTER_OPTIONS}
            # A term's own label_smoothing, where a config adds one, overrides the loss's.
            options.setdefault("label_smoothing", loss_cfg.label_smoothing)
            terms.append((weight, name, options))
        sphere, center = loss_cfg.sphereface, loss_cfg.center
        explicit = config.input.sampler == "triplets"
        if explicit and not any(name == "triplet" for _, name, _ in terms):
            raise ValueError("input.sampler='triplets' needs a 'triplet' term in loss.name")
        return cls(
            terms=tuple(terms), label_smoothing=loss_cfg.label_smoothing,
            explicit_triplets=explicit,
            sphereface_schedule={k: sphere[k] for k in _SPHEREFACE_SCHEDULE},
            center_update=center.method, center_alpha=center.alpha,
            center_learning_rate=center.learning_rate)

    def kinds(self) -> set[str]:
        return {losses.loss_kind(name) for _, name, _ in self.terms}

    @property
    def uses_centers(self) -> bool:
        return losses.CENTER in self.kinds()

    @property
    def head(self) -> tuple[str, float]:
        """("cosine", scale) when a margin loss trains the class weights, else ("linear", 1)."""
        for _, name, options in self.terms:
            if losses.loss_kind(name) == losses.MARGIN:
                scale = options.get("scale")
                return "cosine", float(scale) if scale else 64.0
        return "linear", 1.0

    def sphereface_lambda(self, step: jax.Array) -> jax.Array:
        """max(lambda_min, lambda_base * (1 + gamma * step) ** -power); 0 when lambda_base is 0."""
        s = self.sphereface_schedule
        if not s["lambda_base"]:
            return jnp.zeros((), jnp.float32)
        value = s["lambda_base"] * (1.0 + s["lambda_gamma"] * step) ** (-s["lambda_power"])
        return jnp.maximum(value, s["lambda_min"]).astype(jnp.float32)

    def __call__(self, *, embeddings: jax.Array, logits: jax.Array | None,
                 class_weights: jax.Array, centers: jax.Array, labels: jax.Array,
                 step: jax.Array, sharded_head: sharded_softmax.ShardedHead | None = None):
        """Returns (total loss, {name: term loss}). embeddings [B, D], logits [B, C].

        With `sharded_head` the cross-entropy terms run over class weights split across the mesh
        (and PartialFC's sampled classes), never forming `logits`, which may then be None.
        """
        parts = {}
        for weight, name, options in self.terms:
            kind = losses.loss_kind(name)
            fn = losses.get_loss(name)
            smoothing = options["label_smoothing"]
            kw = {k: v for k, v in options.items() if k != "label_smoothing"}
            if kind == losses.MARGIN and name == "sphereface":
                kw["anneal_lambda"] = self.sphereface_lambda(step)
            if kind in (losses.LOGITS, losses.MARGIN) and sharded_head is not None:
                margin = sharded_softmax.margin_fn(name, kw) if kind == losses.MARGIN else None
                value = sharded_softmax.cross_entropy(sharded_head, embeddings, labels,
                                                      margin=margin, label_smoothing=smoothing)
            elif kind == losses.LOGITS:
                value = fn(logits, labels, label_smoothing=smoothing, **kw)
            elif kind == losses.MARGIN:
                value = fn(embeddings, class_weights, labels, label_smoothing=smoothing, **kw)
            elif kind == losses.METRIC and self.explicit_triplets:
                # Each process's rows are [anchors; positives; negatives]; regroup globally.
                blocks = jnp.split(embeddings, 3 * jax.process_count())
                a, p, n = (jnp.concatenate(blocks[i::3]) for i in range(3))
                value = losses.explicit_triplet_loss(a, p, n, margin=kw["margin"])
            elif kind == losses.METRIC:
                value = fn(embeddings, labels, **kw)
            else:
                value = fn(embeddings, centers, labels)
            parts[name] = value
        total = sum(weight * parts[name] for weight, name, _ in self.terms)
        return total, parts
