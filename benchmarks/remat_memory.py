"""The memory of a train step with and without `model.remat`, from shapes and the compiler alone
(nothing is run).

Two figures for each setting:
- `temp_bytes`: XLA's memory analysis of the compiled train step
  (`compiled.memory_analysis().temp_size_in_bytes`: the buffers live during the step beyond its
  arguments and outputs, where the activations kept for the backward pass go), on the default
  backend. XLA:CPU folds the recomputation back into the forward pass, so on a CPU both settings
  give about the same figure; on GPU and TPU the saving shows here.
- `kept_bytes`: what the forward pass keeps for the backward one, the residuals of the loss's
  vjp as JAX traces it (the parameters included), the same on every backend.

    python benchmarks/remat_memory.py --model resnet50 --batch_size 64 --image_size 112

prints a line and ends with a JSON line `{"model", "batch_size", "image_size", "backend",
"temp_bytes": {"no_remat": int, "remat": int}, "kept_bytes": {"no_remat": int, "remat": int}}`.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from jfacerec import models
from jfacerec.core import config_base, parallel
from jfacerec.training import abstract_train_state, make_train_step


def step_temp_bytes(config, num_classes: int) -> int:
    """Temporary bytes of the compiled train step of `config` (one device), from XLA's memory
    analysis of the compiled step: nothing is run."""
    mesh = parallel.make_mesh(1)
    model, tx, abstract = abstract_train_state(config, num_classes, mesh)
    size = config.image_size
    batch = {"image": jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)}
    step = jax.jit(make_train_step(model, tx, config, mesh), donate_argnums=0)
    return step.lower(abstract, batch).compile().memory_analysis().temp_size_in_bytes


def kept_bytes(config, num_classes: int) -> int:
    """Bytes of the residuals of the loss's vjp at the config's batch (the activations and
    parameters the backward pass reads), from shapes alone."""
    model = models.from_config(config, num_classes)
    size = config.image_size
    images = jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.float32)

    def residuals(images):
        variables = model.init(jax.random.key(0), images)

        def loss(params):
            out, _ = model.apply({"params": params,
                                  "batch_stats": variables.get("batch_stats", {})},
                                 images, train=True, mutable=["batch_stats"])
            return jnp.mean(out)

        return jax.vjp(loss, variables["params"])[1]

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(residuals,
                                                                                  images)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet_tiny")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--width_multiplier", type=float, default=1.0)
    parser.add_argument("--num_classes", type=int, default=1000)
    args = parser.parse_args()
    config = config_base.base_config()
    config.update(batch_size=args.batch_size, image_size=args.image_size, num_devices=1)
    config.model.update(name=args.model, width_multiplier=args.width_multiplier)
    temp, kept = {}, {}
    for remat in (False, True):
        config.model.remat = remat
        name = "remat" if remat else "no_remat"
        temp[name] = step_temp_bytes(config, args.num_classes)
        kept[name] = kept_bytes(config, args.num_classes)
    mib = lambda figures: (f"{figures['no_remat'] / 2**20:.1f} MiB without remat, "  # noqa: E731
                           f"{figures['remat'] / 2**20:.1f} MiB with "
                           f"({figures['remat'] / figures['no_remat']:.2f}x)")
    print(f"{args.model}, batch {args.batch_size}, {args.image_size}x{args.image_size}, "
          f"{jax.default_backend()}: compiled step's temp {mib(temp)}; kept for the backward "
          f"pass {mib(kept)}")
    print(json.dumps({"model": args.model, "batch_size": args.batch_size,
                      "image_size": args.image_size, "backend": jax.default_backend(),
                      "temp_bytes": temp, "kept_bytes": kept}))


if __name__ == "__main__":
    main()
