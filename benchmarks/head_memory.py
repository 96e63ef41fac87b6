"""Per-device memory of the train step's class head at field scale, from the compiler alone.

For each class count (MS1MV3 93,431; Glint360K 360,232; 2,000,000) x 512-d embeddings, PartialFC
sample rate and (data, model) mesh of 8 CPU devices, the train step is lowered on abstract inputs
(jax.ShapeDtypeStruct with their shardings: nothing is allocated, nothing trained) and compiled;
`memory_analysis()` gives the step's per-device arguments and temporaries. The head's share is the
classifier's kernel (+ bias) shard and its optimizer moments' shards, counted from the shapes.

    python benchmarks/head_memory.py [--classes 93431,360232,2000000] [--rates 1.0,0.3,0.1]

The backbone is resnet_tiny on 32-pixel crops (the head is what matters), a global batch of 256,
SGD with momentum (one moment per parameter), float32 weights. Ends with a JSON line of the rows.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from jfacerec.core import config_base, parallel  # noqa: E402
from jfacerec.training import abstract_train_state  # noqa: E402
from jfacerec.training.step import make_train_step  # noqa: E402

GIB = 2 ** 30
MESHES = [(8, 1), (1, 8)]  # (data, model)
DEVICE_MEMORY = 16 * GIB  # a TPU v5e chip
BATCH, IMAGE_SIZE, DIM = 256, 32, 512


def make_config(model_axis: int, sample_rate: float):
    here = os.path.dirname(os.path.abspath(__file__))
    config = config_base.load(os.path.join(here, "..", "configs", "demo.py:runlocal"))
    config.num_devices = 8
    config.image_size = IMAGE_SIZE
    config.batch_size = BATCH
    config.mesh.model = model_axis
    config.loss.name = "arcface"
    config.loss.sample_rate = sample_rate
    config.model.name = "resnet_tiny"
    config.model.embedding_dim = DIM
    return config


def head_bytes(tree, devices: int) -> int:
    """Per-device bytes of the classifier leaves of `tree` (abstract arrays with shardings)."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if "classifier" in jax.tree_util.keystr(path) and leaf.ndim:
            shard = leaf.sharding.shard_shape(leaf.shape)
            total += int(jnp.prod(jnp.array(shard))) * leaf.dtype.itemsize
    return total


def measure(classes: int, rate: float, shape: tuple[int, int]) -> dict:
    """One compile: the row of the table."""
    config = make_config(shape[1], rate)
    mesh = parallel.make_mesh(8, model=shape[1])
    model, tx, abstract = abstract_train_state(config, classes, mesh)
    batch = {
        "image": jax.ShapeDtypeStruct((BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32,
                                      sharding=parallel.data_sharding(mesh)),
        "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=parallel.data_sharding(mesh)),
    }
    state_sharding = jax.tree.map(lambda s: s.sharding, abstract)
    step = jax.jit(make_train_step(model, tx, config, mesh),
                   in_shardings=(state_sharding, parallel.data_sharding(mesh)),
                   out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=0)
    start = time.perf_counter()
    memory = step.lower(abstract, batch).compile().memory_analysis()
    kernel = abstract.params["classifier"]["kernel"]
    return {
        "classes": classes, "columns": kernel.shape[1], "sample_rate": rate,
        "mesh": f"{shape[0]}x{shape[1]}",
        "head_gib": head_bytes(abstract.params, 8) / GIB,
        "optimizer_head_gib": head_bytes(abstract.opt_state, 8) / GIB,
        "arguments_gib": memory.argument_size_in_bytes / GIB,
        "temporaries_gib": memory.temp_size_in_bytes / GIB,
        "outputs_gib": memory.output_size_in_bytes / GIB,
        "peak_gib": (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / GIB,
        "compile_s": time.perf_counter() - start,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="93431,360232,2000000")
    parser.add_argument("--rates", default="1.0,0.3,0.1")
    args = parser.parse_args(argv)
    if len(jax.devices()) < 8:
        raise SystemExit("error: needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count"
                         "=8, set before JAX starts)")
    grid = [(int(c), float(r), m) for c in args.classes.split(",") for r in args.rates.split(",")
            for m in MESHES]
    rows = [measure(*cell) for cell in tqdm(grid, desc="compile", unit="step")]
    print("| classes | columns | sample rate | mesh | head GiB | optimizer (head) GiB | "
          "temporaries GiB | arguments + temporaries GiB | fits 16 GiB |")
    print("| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['classes']:,} | {r['columns']:,} | {r['sample_rate']} | {r['mesh']} | "
              f"{r['head_gib']:.3f} | {r['optimizer_head_gib']:.3f} | {r['temporaries_gib']:.3f} | "
              f"{r['peak_gib']:.3f} | {'yes' if r['peak_gib'] * GIB <= DEVICE_MEMORY else 'no'} |")
    print(json.dumps({"backbone": "resnet_tiny", "image_size": IMAGE_SIZE, "batch": BATCH,
                      "embedding_dim": DIM, "optimizer": "config demo.py:runlocal",
                      "rows": rows}))


if __name__ == "__main__":
    main(sys.argv[1:])
