"""python -m jfacerec.models.summary --model NAME [--image-size S] [--config configs/X.py[:ARG]]

Prints one row per stage of the backbone (output shape, parameters, FLOPs from XLA's cost
analysis) and the totals of one forward pass on one image. `--all` prints a markdown table of every
registered backbone at its native input size instead.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jfacerec.core import cli
from jfacerec.models import FaceModel, get_model, registered_models

# Native input sizes: face backbones take 112x112 crops, ImageNet-style ones 224x224.
NATIVE_SIZE = {"resnet_tiny": 32, "resnet_tiny_s2d": 64, "resnet18": 224, "resnet34": 224, "resnet50": 224,
               "mobilenetv2": 224, "convnext_tiny": 224, "convnext_nano": 224}


def native_size(name: str) -> int:
    return NATIVE_SIZE.get(name, 112)


def totals(model: FaceModel, image_size: int) -> dict[str, Any]:
    """Parameters (without the classifier) and forward FLOPs per image of the embedding."""
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    params = variables["params"]
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    head = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params["classifier"]))
    embed = jax.jit(lambda v, x: model.apply(v, x, return_feats=True))
    cost = embed.lower(variables, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"parameters": n - head, "flops": float(cost["flops"])}


def stage_table(model: FaceModel, image_size: int) -> str:
    """flax's module table two levels deep, with per-module FLOPs."""
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return nn.tabulate(model, jax.random.key(0), depth=2, compute_flops=True,
                       console_kwargs={"width": 160})(x, return_feats=True)


def define_flags() -> None:
    """The command's flags; defined only when it runs, so importing this module defines none."""
    flags.DEFINE_string("model", None, "Registered model name.")
    flags.DEFINE_integer("image_size", None, "Input side; default: the model's native size.")
    flags.DEFINE_alias("image-size", "image_size")
    flags.DEFINE_string("config", None, "A config file; its model and image_size are used.")
    flags.DEFINE_integer("embedding_dim", 512, "Embedding size (without --config).")
    flags.DEFINE_bool("all", False, "A table of every registered backbone.")


def zoo_table(embedding_dim: int) -> str:
    rows = ["| model | input | parameters (M) | GFLOPs (multiply-adds) |", "| --- | --- | --- | --- |"]
    for name in registered_models():
        size = native_size(name)
        t = totals(get_model(name, num_classes=2, embedding_dim=embedding_dim), size)
        rows.append(f"| `{name}` | {size}x{size} | {t['parameters'] / 1e6:.2f} | "
                    f"{t['flops'] / 2e9:.3f} |")
    return "\n".join(rows)


def _summarise(f: flags.FlagValues) -> None:
    name, size, kwargs = f.model, f.image_size, {"embedding_dim": f.embedding_dim}
    if f.config:
        path, _, arg = f.config.partition(":")  # configs/X.py[:ARG], as --config takes it
        spec = importlib.util.spec_from_file_location("config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        c = module.get_config(*([arg] if arg else []))
        name, size = name or c.model.name, size or c.image_size
        kwargs = dict(embedding_dim=c.model.embedding_dim, norm=c.model.norm,
                      width_multiplier=c.model.width_multiplier)
    if not name:
        raise app.UsageError("give --model NAME or --config FILE")
    size = size or native_size(name)
    model = get_model(name, num_classes=2, **kwargs)
    print(stage_table(model, size))
    t = totals(model, size)
    print(f"{name} at {size}x{size}: {t['parameters']:,} parameters (without the classifier), "
          f"{t['flops'] / 1e9:.3f} GFLOPs ({t['flops'] / 2e9:.3f} G multiply-adds) per image")


def main(argv):
    del argv
    f = flags.FLAGS
    with cli.exit_on_user_error():
        if f.all:
            print(zoo_table(f.embedding_dim))
        else:
            _summarise(f)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
