"""Peak temporary memory of the compiled train step with and without `model.remat`.

XLA's memory analysis of the jitted step (`compiled.memory_analysis().temp_size_in_bytes`: the
buffers live during the step beyond its arguments and outputs, which is where the activations
kept for the backward pass go) for a model, a batch size and an image size; nothing is run.

    python benchmarks/remat_memory.py --model resnet50 --batch_size 64 --image_size 112

prints a table and ends with a JSON line `{"model", "batch_size", "image_size",
"temp_bytes": {"remat": int, "no_remat": int}}`.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

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
    temp = {}
    for remat in (False, True):
        config.model.remat = remat
        temp["remat" if remat else "no_remat"] = step_temp_bytes(config, args.num_classes)
    print(f"{args.model}, batch {args.batch_size}, {args.image_size}x{args.image_size}: "
          f"temp {temp['no_remat'] / 2**20:.1f} MiB without remat, "
          f"{temp['remat'] / 2**20:.1f} MiB with ({temp['remat'] / temp['no_remat']:.2f}x)")
    print(json.dumps({"model": args.model, "batch_size": args.batch_size,
                      "image_size": args.image_size, "temp_bytes": temp}))


if __name__ == "__main__":
    main()
