"""Our jitted train step against the same network in PyTorch, and its model FLOPs utilisation.

python benchmarks/train_step.py [--models resnet_tiny,iresnet18,mobilefacenet] [--steps 5]
    [--warmup 1] [--batch resnet_tiny=128,iresnet18=16,mobilefacenet=16] [--sides jax,torch]
    [--quick]

For each backbone: jfacerec's real train step (`jfacerec.training`: models.from_config, make_optimizer,
init_state, make_train_step, jitted with the state donated as `train` does) on its config
(the base config for resnet_tiny, configs/zoo.py for the others), against an nn.Module in
benchmarks/torch_peers.py with the same layers, widths, norms, classifier, loss (softmax
cross-entropy, same label smoothing) and optimizer (SGD, same momentum, Nesterov and weight
decay on kernels only), in PyTorch's default NCHW layout and in channels_last. Ours runs as
`train` compiles it, and without each of the two CPU changes that made it faster (the
backbones' convs computed by layers.conv_general_dilated; xla_cpu.compiler_options), to show
what each buys. Steps of all of them alternate on one fixed batch, so load from other processes
hits each alike; figures are medians over the steps after warm-up.

MFU: the model's FLOPs per image for the whole step (forward, backward and update; about 3x the
forward), from XLA's cost analysis, times images/s, over the peak FLOP/s of a 4096^3 float32
matmul measured in the same run.

`--sides jax` times ours alone, without importing torch (the test suite runs it that way).

On a GPU (JAX and torch both see one) it compares bfloat16: ours with config.dtype="bfloat16",
torch with channels_last, bf16 autocast and torch.compile.

Last line: JSON with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Callable, Iterator

# On a GPU both frameworks share the device: JAX would otherwise take 75% of its memory up front
# and leave torch the rest. Set before JAX starts.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import REPO, parse_sides  # noqa: E402

sys.path.insert(0, REPO)

from jfacerec import models, training  # noqa: E402
from jfacerec.core import config_base  # noqa: E402
from jfacerec.models import layers, xla_cpu  # noqa: E402
from jfacerec.losses.objectives import Objective  # noqa: E402

MODELS = ("resnet_tiny", "iresnet18", "mobilefacenet")
# Per-step batch on the 2-core CPU: the demo's 128 for its 32-pixel backbone, less for the
# 112-pixel face backbones so that a step takes seconds, not minutes (MobileFaceNet's grouped
# convs take minutes per step of 64 in the unchanged step).
CPU_BATCH = {"resnet_tiny": 128, "iresnet18": 16, "mobilefacenet": 16}
GPU_BATCH = {"resnet_tiny": 512, "iresnet18": 256, "mobilefacenet": 512}
# Ours as training.train compiles it; without xla_cpu.compiler_options (XLA's default CPU
# options); and without those nor layers.conv_general_dilated (every conv lax's: the code before
# the performance work).
VARIANTS = ("ours", "default_xla_options", "lax_convs_default_xla_options")
# A variant stops being timed once it has a timed step and has run this many seconds (warm-up
# included), so that a pathologically slow one (MobileFaceNet with lax's grouped convs: minutes a
# step) does not hold the run.
VARIANT_BUDGET_S = 120.0


# ---- configs and the steps -----------------------------------------------------------------------

def get_config(name: str, batch: int, dtype: str):
    """The backbone's config (the base config's for resnet_tiny: the demo network without the
    demo recipe's moving average, which the torch peer lacks; the zoo's for the others)."""
    config = (config_base.base_config() if name == "resnet_tiny" else
              config_base.load(os.path.join(REPO, "configs", f"zoo.py:{name}")))
    config.batch_size = batch
    config.dtype = dtype
    config.num_devices = 1
    if config.loss.name != "softmax":
        raise ValueError("the torch peer mirrors the softmax loss")
    return config


@contextlib.contextmanager
def lax_convs(enabled: bool) -> Iterator[None]:
    """While enabled, the backbones' convs (layers.conv2d) compute with lax.conv_general_dilated,
    as they did before layers.conv_general_dilated."""
    original = layers.conv_general_dilated
    if enabled:
        layers.conv_general_dilated = jax.lax.conv_general_dilated
    try:
        yield
    finally:
        layers.conv_general_dilated = original


def jax_step(config, classes: int, variant: str) -> tuple[Callable[[], None], dict]:
    """(run one step and wait for it, facts: FLOPs of a step, parameter count and shapes).

    variant: one of VARIANTS; "ours" is training.train's jit (state donated, its options).
    """
    model = models.from_config(config, classes)
    tx = training.make_optimizer(config)
    size, batch = config.image_size, config.batch_size
    data = {"image": jax.random.normal(jax.random.key(1), (batch, size, size, 3)),
            "label": jax.random.randint(jax.random.key(2), (batch,), 0, classes)}
    with lax_convs(variant.startswith("lax_convs")):
        state = training.init_state(model, tx, size, jax.random.key(0),
                                    Objective.from_config(config))
        # As training.train jits it: the old state's buffers are reused for the new one.
        lowered = jax.jit(training.make_train_step(model, tx, config),
                          donate_argnums=0).lower(state, data)
    options = None if variant.endswith("default_xla_options") else xla_cpu.compiler_options()
    compiled = lowered.compile(compiler_options=options)
    cost = compiled.cost_analysis()
    facts = {
        # The model's FLOPs: XLA's count on the step as written. The compiled count also holds
        # XLA:CPU's rewrites (grouped convs expanded into dense ones: twice MobileFaceNet's).
        "flops": float(lowered.cost_analysis()["flops"]),
        "compiled_flops": float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]),
        "parameters": sum(int(p.size) for p in jax.tree.leaves(state.params)),
        "param_shapes": jax.tree.map(lambda p: p.shape, state.params),
    }
    holder = [state]

    def run() -> None:
        holder[0], metrics = compiled(holder[0], data)
        jax.block_until_ready((holder[0], metrics))

    return run, facts


def peak_flops(dtype: str, size: int, repeats: int = 5) -> float:
    """Median FLOP/s of a [size, size] @ [size, size] matmul in `dtype`."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.dtype(dtype))
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    times = [seconds(lambda: dot(a, b).block_until_ready()) for _ in range(repeats)]
    return 2 * size ** 3 / float(np.median(times))


def interleave(runs: dict[str, Callable[[], None]], steps: int, warmup: int,
               budget_s: float = float("inf")) -> dict[str, list[float]]:
    """Seconds of each run's timed steps, the runs' steps taken in turn so that load from other
    processes falls on all of them alike. A run is not stepped again once it has a timed step
    and has spent budget_s."""
    times = {k: [] for k in runs}
    spent = dict.fromkeys(runs, 0.0)
    for i in range(warmup + steps):
        for key, run in runs.items():
            if times[key] and spent[key] > budget_s:
                continue
            t = seconds(run)
            spent[key] += t
            # A step longer than the whole budget is its own sample, warm-up or not (XLA has
            # compiled already; the first run's extra cost is small against minutes).
            if i >= warmup or t > budget_s:
                times[key].append(t)
    return times


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name: str, batch: int, steps: int, warmup: int, gpu: bool, with_torch: bool) -> dict:
    """Our variants and (with_torch) torch's layouts, steps interleaved; medians, ratios, FLOPs."""
    config = get_config(name, batch, "bfloat16" if gpu else "float32")
    classes = config.dataset.num_identities
    runs, facts = {}, {}
    # On the GPU only ours runs (the tap convs and the options are CPU-only: off there by
    # themselves), and torch gets its best set-up directly.
    for variant in ("ours",) if gpu else VARIANTS:
        runs[f"jax_{variant}"], facts[variant] = jax_step(config, classes, variant)
        assert facts[variant]["param_shapes"] == facts["ours"]["param_shapes"], variant
    jax_params = facts["ours"]["parameters"]
    if with_torch:
        import torch_peers

        for layout in ("channels_last",) if gpu else ("contiguous", "channels_last"):
            runs[f"torch_{layout}"], torch_params = torch_peers.torch_step(
                config, classes, layout == "channels_last", gpu)
        print(f"{name}: parameters jax {jax_params:,}, torch {torch_params:,}", flush=True)
        assert torch_params == jax_params, (name, jax_params, torch_params)

    times = interleave(runs, steps, warmup, VARIANT_BUDGET_S)
    rates = {k: batch / float(np.median(v)) for k, v in times.items()}
    # Model FLOPs from lax's convs: the tap convs' elementwise multiply-adds count alike, but the
    # model is the same whichever way a conv is computed.
    model_facts = facts.get("lax_convs_default_xla_options", facts["ours"])
    flops = model_facts["flops"] / batch
    result = {"batch": batch, "image_size": config.image_size, "dtype": config.dtype,
              "parameters": jax_params, "flops_per_image": flops,
              "compiled_flops_per_image": {v: f["compiled_flops"] / batch
                                           for v, f in facts.items()},
              **{f"{k}_images_per_s": v for k, v in rates.items()},
              "step_seconds": {k: [round(t, 4) for t in v] for k, v in times.items()}}
    if with_torch:
        torch_best = max((k for k in rates if k.startswith("torch_")), key=rates.get)
        result["torch_best"] = torch_best.removeprefix("torch_")
        result.update({f"ratio_{k}_to_torch_best": rates[k] / rates[torch_best]
                       for k in rates if k.startswith("jax_")})
    print(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()) + " img/s",
          flush=True)
    return result


def machine(with_torch: bool) -> dict:
    """The machine and the versions; with_torch: torch's too, and its thread count."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    model_name = next((line.split(":", 1)[1].strip() for line in lscpu
                       if line.startswith("Model name")), platform.processor())
    facts = {"cpu_count": os.cpu_count(), "cpu_model": model_name,
             "jax": jax.__version__, "python": platform.python_version(),
             "xla_flags": os.environ.get("XLA_FLAGS", ""), "device": str(jax.devices()[0]),
             "date": datetime.date.today().isoformat()}
    if with_torch:
        import torch

        facts.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    return facts


def parse_batches(text: str, defaults: dict[str, int]) -> dict[str, int]:
    """"iresnet18=16,mobilefacenet=32", or one number for every model -> {model: batch}."""
    if text and "=" not in text:
        return {k: int(text) for k in defaults}
    batches = dict(defaults)
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        batches[key] = int(value)
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--batch", default="", help="one number, or model=batch,...")
    parser.add_argument("--quick", action="store_true", help="2 steps, 1 warm-up, batches / 4")
    parser.add_argument("--sides", default="jax,torch",
                        help="jax (ours, with its ablations) and torch, or jax alone")
    args = parser.parse_args()
    with_torch = "torch" in parse_sides(parser, args.sides, ("jax", "torch"), required=("jax",))

    gpu = jax.devices()[0].platform == "gpu"
    if with_torch:
        import torch

        gpu = gpu and torch.cuda.is_available()
        # Torch's intra-op threads = the cores, as XLA's CPU thread pool.
        torch.set_num_threads(os.cpu_count())
    defaults = GPU_BATCH if gpu else CPU_BATCH
    if args.quick:
        args.steps, args.warmup = 2, 1
        defaults = {k: max(4, v // 4) for k, v in defaults.items()}
    batches = parse_batches(args.batch, defaults)
    dtype = "bfloat16" if gpu else "float32"
    size = 8192 if gpu else 4096
    load_before = os.getloadavg()[0]
    peak = peak_flops(dtype, size)
    print(f"peak matmul {peak / 1e9:.1f} GFLOP/s ({dtype})", flush=True)

    results = {}
    for name in args.models.split(","):
        r = compare(name, batches[name], args.steps, args.warmup, gpu, with_torch)
        for k in [k for k in r if k.startswith("jax_") and k.endswith("_images_per_s")]:
            r[k.replace("_images_per_s", "_mfu")] = r["flops_per_image"] * r[k] / peak
        results[name] = r
    # Measured again: the drift between the two readings shows how the machine's load changed.
    peak_after = peak_flops(dtype, size)

    variants = [k.removesuffix("_images_per_s") for k in next(iter(results.values()))
                if k.startswith("jax_") and k.endswith("_images_per_s")]
    print()
    peer_column = "torch img/s (NCHW / channels_last) | " if with_torch else ""
    ratio = " (x torch best)" if with_torch else ""
    print(f"| model | batch | {peer_column}"
          + " | ".join(f"{v} img/s{ratio}" for v in variants)
          + " | train-step GFLOP/image | MFU " + " / ".join(variants) + " |")
    print("| --- " * (3 + with_torch + len(variants)) + "| --- |")
    for name, r in results.items():
        peers = " / ".join(f"{r[k]:.1f}" for k in ("torch_contiguous_images_per_s",
                                                     "torch_channels_last_images_per_s") if k in r)
        peers = f"{peers} | " if with_torch else ""
        ours = " | ".join(f"{r[f'{v}_images_per_s']:.1f}"
                          + (f" ({r[f'ratio_{v}_to_torch_best']:.2f}x)" if with_torch else "")
                          for v in variants)
        mfu = " / ".join(f"{100 * r[f'{v}_mfu']:.1f}%" for v in variants)
        print(f"| {name} ({r['image_size']} px) | {r['batch']} | {peers}{ours} | "
              f"{r['flops_per_image'] / 1e9:.3f} | {mfu} |")
    threads = f"torch threads {torch.get_num_threads()}; " if with_torch else ""
    print(f"\npeak {peak / 1e9:.1f} GFLOP/s before, {peak_after / 1e9:.1f} after; {threads}"
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(json.dumps({"peak_flops": peak, "peak_flops_after": peak_after, "steps": args.steps,
                      "warmup": args.warmup, "xla_options": xla_cpu.compiler_options(),
                      "load_average": [load_before, os.getloadavg()[0]],
                      "machine": machine(with_torch), "results": results}))


if __name__ == "__main__":
    main()
