"""Does the synthetic input pipeline keep up with training? Render and pipeline rates against the
rate at which the demo's train step consumes images, measured in one run.

python benchmarks/synthetic.py [--config configs/demo.py] [--steps 20] [--threads 0,2]

Last line: JSON with images/s of rendering (one at a time and in chunks), of the grain pipeline on
a fresh source (first epoch: renders) and a warm one (later epochs: cached) for each number of
reading threads in --threads (default: the config's), and of the train step jitted as `train`
jits it, plus the ratios pipeline / train step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jfacerec import training  # noqa: E402
from jfacerec.core import config_base, parallel  # noqa: E402
from jfacerec.models import xla_cpu  # noqa: E402
from jfacerec.data import pipeline, sources  # noqa: E402
from jfacerec.data.synthetic import render_faces  # noqa: E402


def rate(fn, n_items: int, repeats: int = 3) -> float:
    """Median items per second over `repeats` calls of fn()."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n_items / float(np.median(times))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", default="",
                        help="comma-separated reading-thread counts; default: the config's")
    args = parser.parse_args()
    config = config_base.load(args.config)  # "configs/NAME.py[:ARG]", as --config takes it
    threads = ([int(t) for t in args.threads.split(",")] if args.threads
               else [config.input.num_threads])
    size, batch = config.image_size, config.batch_size
    ids = np.arange(512)

    single = rate(lambda: [render_faces([i], [0], image_size=size) for i in ids[:100]], 100)
    chunked = rate(lambda: render_faces(ids, np.zeros_like(ids), image_size=size), len(ids))

    dataset = sources.get_dataset(config)

    def pipeline_rate(source, n_batches: int, num_threads: int) -> float:
        it = iter(pipeline.train_dataset(source, batch_size=batch, image_size=size,
                                         seed=0, num_threads=num_threads))
        t = time.perf_counter()
        for _ in range(n_batches):
            next(it)
        return n_batches * batch / (time.perf_counter() - t)

    epoch = len(dataset.train) // batch
    cold, warm = {}, {}
    for n in threads:
        # A fresh source renders as it goes (the first epoch); read again, it is cached.
        source = sources.get_dataset(config).train
        cold[n] = pipeline_rate(source, epoch, n)
        warm[n] = pipeline_rate(source, 2 * epoch, n)

    mesh = parallel.make_mesh(config.num_devices)
    model, tx, _ = training.abstract_train_state(config, dataset.num_classes, mesh)
    state = training.state_from_config(model, tx, config, jax.random.key(0))
    step = jax.jit(training.make_train_step(model, tx, config), donate_argnums=0,
                   compiler_options=xla_cpu.compiler_options())  # as training.train jits it
    b = {"image": jnp.zeros((batch, size, size, 3)), "label": jnp.zeros((batch,), jnp.int32)}
    state, m = step(state, b)
    jax.block_until_ready(m)

    def run_steps():
        nonlocal state
        for _ in range(args.steps):
            state, out = step(state, b)
        jax.block_until_ready(out)

    train = rate(run_steps, args.steps * batch, repeats=1)
    result = {
        "image_size": size, "batch_size": batch, "cpu_count": os.cpu_count(),
        "render_single_images_per_s": single, "render_chunked_images_per_s": chunked,
        "train_step_images_per_s": train,
        "pipeline": [{"num_threads": n, "first_epoch_images_per_s": cold[n],
                      "cached_images_per_s": warm[n],
                      "ratio_first_epoch_to_train": cold[n] / train,
                      "ratio_cached_to_train": warm[n] / train} for n in threads],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
